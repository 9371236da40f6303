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
    keep theirs); Ctrl-C is 130."""
    from .preempt import PREEMPTED_EXIT, Preempted

    try:
        run()
    except Preempted as e:  # a checkpoint is written: the scheduler may requeue with --resume
        print(f"bigatlas {command}: preempted: {e}", file=sys.stderr)
        leave_process_group()
        return PREEMPTED_EXIT
    except USER_ERRORS as e:
        print(f"bigatlas {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bigatlas {command}: interrupted", file=sys.stderr)
        return 130
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """Ends this process's torch.distributed group, if it has one, once a command has finished on every
    rank (done, or preempted with its checkpoint written). Left to interpreter exit, gloo's threads
    can be destroyed while still joinable, and the process then aborts after its work is written
    ("terminate called without an active exception", SIGABRT), so the launcher reports a failed run.
    Not after an error: a peer may still be inside a collective with this rank."""
    dist = sys.modules.get("torch.distributed")  # a command that never imported torch has no group
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
