"""The one exception type the CLI turns into a one-line error and exit code 2."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""
