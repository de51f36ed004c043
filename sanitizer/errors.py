"""The project's one user-facing exception."""


class SanitizeError(Exception):
    """Bad input or settings: the message names the file, sample or key, and the fix.

    `python -m stages` prints it as one line on stderr and exits 2; tracebacks are for bugs.
    """


class GateFailed(Exception):
    """The release gate's verdict: a check failed. `python -m stages` exits 1 naming it."""
