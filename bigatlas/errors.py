"""Errors a user can fix, beyond ValueError (bad input) and OSError (disk, permissions): the command
line prints them as one line, without a traceback."""

from __future__ import annotations

import sys


class LaunchError(RuntimeError):
    """The processes started are not the processes asked for."""


class MissingExtra(RuntimeError):
    """A command needs packages of an optional extra that is not installed."""


def require_extra(extra: str, modules: dict[str, str], what: str) -> None:
    """MissingExtra naming the pip command unless every module (import name → package) is importable;
    checked without importing them (jax and scanpy take seconds)."""
    from importlib.util import find_spec

    def present(name):
        try:
            return find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    missing = [pkg for name, pkg in modules.items() if not present(name)]
    if missing:
        raise MissingExtra(f"{what} needs {', '.join(missing)}: pip install 'bigatlas[{extra}]'")


# StoreError and EmbeddingError are ValueErrors; OSError covers a full disk, an I/O error or a missing
# permission, each naming its path
USER_ERRORS = (ValueError, OSError, FloatingPointError, LaunchError, MissingExtra)


def reported(command: str, run) -> int:
    """Exit code of run(): what the user can fix is one line on stderr, no traceback (exit 2; bugs
    keep theirs); Ctrl-C is 130. A command that finished (or was preempted, its checkpoint written)
    ends its process group (process_group.py); one that failed keeps it."""
    from .preempt import PREEMPTED_EXIT, Preempted
    from .process_group import keep_at_exit, leave_process_group

    try:
        run()
    except Preempted as e:  # a checkpoint is written: the scheduler may requeue with --resume
        print(f"bigatlas {command}: preempted: {e}", file=sys.stderr)
        leave_process_group()
        return PREEMPTED_EXIT
    except USER_ERRORS as e:
        print(f"bigatlas {command}: error: {e}", file=sys.stderr)
        keep_at_exit()
        return 2
    except KeyboardInterrupt:
        print(f"bigatlas {command}: interrupted", file=sys.stderr)
        keep_at_exit()
        return 130
    except BaseException:  # a bug: its traceback follows
        keep_at_exit()
        raise
    leave_process_group()
    return 0
