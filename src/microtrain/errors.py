"""Errors that reach the user as one line (no traceback): bad files, bad arguments, infeasible requests."""


class MicrotrainError(Exception):
    """Base of every error the CLI reports as `microtrain: error: <message>` with a non-zero exit code."""
