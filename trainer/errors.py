"""User-facing errors and the exit codes (docs/architecture.md: this module owns them).

The operator's `restartPolicy: ExitCode` restarts a replica only on codes >= 128,
so permanent failures stay below 128 and retryable ones above.
"""

EXIT_OK = 0
EXIT_FAILURE = 1  # code error, NaN loss: permanent
EXIT_USAGE = 2  # bad values, unknown task, missing credentials: permanent
EXIT_HANG = 142  # a collective or step exceeded its deadline: retryable
EXIT_STORAGE_UNAVAILABLE = 144  # checkpoint store unreachable: retryable
EXIT_PREEMPTED = 143  # SIGTERM after the checkpoint was committed: retryable
EXIT_INTERRUPTED = 130  # `kubetrain run` stopped with Ctrl-C (the replicas checkpointed as for SIGTERM)


def is_retryable(code: int) -> bool:
    return code >= 128


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit 2, no traceback."""

    exit_code = EXIT_USAGE


class CorruptCheckpoint(UserError):
    """A committed checkpoint step whose files fail verification (missing, wrong size, wrong
    checksum, unreadable): resume falls back to an older step rather than stop."""


class RetryableError(Exception):
    """A transient condition (storage down, hang) the operator should retry."""

    def __init__(self, message: str, exit_code: int = EXIT_STORAGE_UNAVAILABLE):
        super().__init__(message)
        self.exit_code = exit_code
