"""Ending torch.distributed's process group before the interpreter does.

Left to interpreter exit, gloo's threads can be destroyed while still joinable, and a rank then aborts
after its work is written ("terminate called without an active exception", SIGABRT): the launcher reports a
failed run. Every command ends the group when it is done (errors.reported); a script of the notebook API
under `accelerate launch` ends it at exit (leave_at_exit). Neither does after an error: a peer may still be
inside a collective with this rank. at_exit_after_peers runs a last action once every process has reached its exit
(the notebook API's temporary run dir, which every process read, is removed then).
"""

from __future__ import annotations

import atexit
import sys

_failed = False  # an uncaught exception reached the interpreter (sys.excepthook)
_registered = False


def leave_process_group() -> None:
    """Ends this process's group, if it has one (a process that never imported torch has none)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def keep_at_exit() -> None:
    """This process failed (a command's error, caught before the interpreter sees it): keep the group."""
    global _failed
    _failed = True


def leave_at_exit() -> None:
    """At interpreter exit, end the group unless the script died of an uncaught exception. Registered once
    per process, when a group may have been made (Accelerator, PartialState)."""
    global _registered
    if _registered:
        return
    _registered = True
    previous = sys.excepthook

    def hook(kind, value, tb):
        global _failed
        _failed = True
        previous(kind, value, tb)

    sys.excepthook = hook
    atexit.register(lambda: None if _failed else leave_process_group())


def at_exit_after_peers(action) -> None:
    """At interpreter exit, once every process of the group has reached its own exit, run `action` (the main
    process removing what every process read). Registered after leave_at_exit, so it runs while the group is
    still there; skipped after an uncaught exception, where a peer may never arrive."""

    def run():
        if _failed:
            return
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.barrier()
        action()

    atexit.register(run)
