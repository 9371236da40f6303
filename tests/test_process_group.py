"""The process group ends before the interpreter does (bigatlas.process_group): a command that finished ends
it, a script of the notebook API ends it at exit; after an error it is kept."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT


def test_a_finished_command_leaves_its_process_group_and_a_failed_one_keeps_it(tmp_path):
    """gloo's threads, left to interpreter exit, can abort a rank after its work is written (SIGABRT):
    a command that finished ends its group; one that failed leaves it, as a peer may still be inside a
    collective with this rank."""
    import torch.distributed as dist

    from bigatlas.errors import reported

    def bad():
        raise ValueError("bad input")

    try:
        for run, code, kept in ((bad, 2, True), (lambda: None, 0, False)):
            if not dist.is_initialized():
                dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
            assert reported("train", run) == code
            assert dist.is_initialized() == kept
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


SCRIPT = """
import atexit, sys
import torch.distributed as dist
atexit.register(lambda: print("group at exit:", dist.is_initialized(), flush=True))  # runs after the ones below
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
from bigatlas.process_group import leave_at_exit
leave_at_exit()
leave_at_exit()
if sys.argv[2] == "fail":
    raise RuntimeError("the script's own bug")
"""


@pytest.mark.parametrize("ending", ["done", "fail"])
def test_a_notebook_api_script_leaves_its_group_at_exit_unless_it_died(tmp_path, ending):
    """A script of the notebook API under `accelerate launch` ends with the interpreter, not with a command:
    its group is ended at exit, before the interpreter tears down, unless an uncaught exception ended it."""
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "pg"), ending], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert res.returncode == (0 if ending == "done" else 1), res.stderr[-2000:]
    assert f"group at exit: {ending == 'fail'}" in res.stdout, (res.stdout, res.stderr[-2000:])
