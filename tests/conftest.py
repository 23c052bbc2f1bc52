"""Fixtures shared by every test; the helpers live in tests/support.py."""

from support import values_file  # noqa: F401  (a fixture)
