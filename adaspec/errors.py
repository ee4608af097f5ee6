"""The one exception type a user can cause; CLIs print it as one line and exit non-zero."""


class UserError(Exception):
    """Bad input from the user: a message that names the bad value and the fix, no traceback."""
