"""Errors a user can fix, beyond ValueError (bad input) and OSError (disk, permissions): the command
line prints them as one line, without a traceback."""


class LaunchError(RuntimeError):
    """The processes started are not the processes asked for."""
