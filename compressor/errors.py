"""Errors that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a one-line message naming the problem (and the fix when known)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
