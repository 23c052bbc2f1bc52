"""A worked example of a kubetrain custom task (see docs/tasks.md)."""
