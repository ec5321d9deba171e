"""Children of a SIGKILLed server die with it: a real parent forks a child and a grandchild (the way vLLM
starts its engine core and workers), is SIGKILLed, and within 5 s nothing of its tree is left. Without the
lifeline the same tree survives (the check can fail). A `spawn` child detects itself at import."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

TREE = """
import multiprocessing as mp, sys, time
from effllm.server import lifeline

def grandchild():
    time.sleep(120)

def child():
    mp.get_context("fork").Process(target=grandchild).start()
    time.sleep(120)

if __name__ == "__main__":
    if sys.argv[1] == "on":
        lifeline.install()
    mp.get_context("fork").Process(target=child).start()
    print("started", flush=True)
    time.sleep(120)
"""


def _tree_after_sigkill(tmp_path: Path, mode: str) -> list[psutil.Process]:
    """The parent's descendants still alive 5 s after its SIGKILL (the caller kills any left)."""
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    parent = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE)
    assert parent.stdout is not None and parent.stdout.readline().strip() == b"started"
    deadline = time.monotonic() + 60
    while len(descendants := psutil.Process(parent.pid).children(recursive=True)) < 2:
        assert time.monotonic() < deadline, "the child and grandchild never started"
        time.sleep(0.1)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    _, alive = psutil.wait_procs(descendants, timeout=5)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_forked_children_die_within_5s_of_a_sigkill(tmp_path: Path) -> None:
    left = _tree_after_sigkill(tmp_path, "on")
    for p in left:
        p.kill()
    assert left == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_without_the_lifeline_the_tree_outlives_its_parent(tmp_path: Path) -> None:
    left = _tree_after_sigkill(tmp_path, "off")
    for p in left:
        p.kill()
    assert len(left) == 2


def test_a_spawned_child_knows_it_is_one(tmp_path: Path) -> None:
    script = tmp_path / "spawn.py"
    script.write_text(
        "import multiprocessing as mp\n"
        "from effllm.server import lifeline\n"
        "FLAG = lifeline.spawned_child()\n"
        "def child(q): q.put(FLAG)\n"
        "if __name__ == '__main__':\n"
        "    ctx = mp.get_context('spawn'); q = ctx.Queue()\n"
        "    p = ctx.Process(target=child, args=(q,)); p.start()\n"
        "    print(FLAG, q.get(timeout=60)); p.join()\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stderr
