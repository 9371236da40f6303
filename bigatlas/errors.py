"""Errors a user can fix, beyond ValueError (bad input) and OSError (disk, permissions): the command
line prints them as one line, without a traceback."""

from __future__ import annotations

import sys


class LaunchError(RuntimeError):
    """The processes started are not the processes asked for."""


# StoreError and EmbeddingError are ValueErrors; OSError covers a full disk, an I/O error or a missing
# permission, each naming its path
USER_ERRORS = (ValueError, OSError, FloatingPointError, LaunchError)


def reported(command: str, run) -> int:
    """Exit code of run(): what the user can fix is one line on stderr, no traceback (exit 2; bugs
    keep theirs); Ctrl-C is 130."""
    try:
        run()
    except USER_ERRORS as e:
        print(f"bigatlas {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bigatlas {command}: interrupted", file=sys.stderr)
        return 130
    return 0
