"""The benchmark's CPU accounting (tests.bench.harness.tree_cpu_s, tests.bench.api.cpu_figures):
what the HTTP figures' CPU ceilings are computed from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.bench.api import CORES, cpu_figures, cpu_ms_each
from tests.bench.harness import cpu_s, tree_cpu_s

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\nprint('done', flush=True)\n"


def _grandchild_tree() -> subprocess.Popen[str]:
    """A child that starts a grandchild burning 0.3 s of CPU; on a line from the test it ends and
    reaps the grandchild, says so, and waits for its own stdin to close."""
    inner = BUSY + "import sys; sys.stdin.read()\n"
    outer = ("import subprocess, sys\n"
             f"p = subprocess.Popen([sys.executable, '-c', {inner!r}], stdin=subprocess.PIPE, stdout=subprocess.PIPE, "
             "text=True)\nprint(p.stdout.readline().strip(), p.pid, flush=True)\nsys.stdin.readline()\n"
             "p.stdin.close()\np.wait()\nprint('reaped', flush=True)\nsys.stdin.read()\n")
    return subprocess.Popen([sys.executable, "-c", outer], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_a_process_tree_counts_its_live_descendants_and_its_reaped_children() -> None:
    child = _grandchild_tree()
    try:
        assert child.stdout is not None and child.stdin is not None
        done, grandchild = child.stdout.readline().split()
        assert done == "done"
        burned = cpu_s(int(grandchild))
        assert burned >= 0.25
        assert tree_cpu_s(child.pid) >= cpu_s(child.pid) + burned - 0.02  # a live descendant's CPU
        child.stdin.write("end it\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "reaped"
        assert not Path(f"/proc/{grandchild}").exists()
        assert cpu_s(child.pid) < burned  # the child's own CPU does not hold the grandchild's
        assert tree_cpu_s(child.pid) >= burned - 0.02  # its reaped children's account does
    finally:
        child.kill()
        child.wait(30)


def test_the_ceiling_is_the_cores_over_the_median_cpu_per_request() -> None:
    before = {"api": 1.0, "postgres": 2.0}
    runs = [cpu_ms_each(before, {"api": 1.5, "postgres": 2.25, "gone": 9.0}, 1000),  # 0.5 + 0.25 ms
            cpu_ms_each(before, {"api": 1.7, "postgres": 2.3}, 1000),  # 0.7 + 0.3 ms
            cpu_ms_each(before, {"api": 1.2, "postgres": 2.1}, 1000)]  # 0.2 + 0.1 ms
    results: dict[str, object] = {}
    ceiling = cpu_figures(results, "requests", runs)
    assert results["requests_cpu_ms"] == 0.75
    assert results["requests_cpu_by_process"] == {"api": 0.5, "postgres": 0.25}
    assert abs(ceiling - CORES * 1000 / 0.75) < 1e-6
