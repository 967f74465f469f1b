"""The one exception type for bad user input: the CLIs print its message as one line, no traceback."""


class UserError(Exception):
    """A problem with what the user gave us (a path, a flag, a file), explained in one sentence."""
