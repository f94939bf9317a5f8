"""The one error type the command line turns into a message instead of a traceback."""

EXIT_STACK_ERROR = 3


class StackError(Exception):
    """Something the user can fix: bad input, a missing program, a stack in the wrong state."""
