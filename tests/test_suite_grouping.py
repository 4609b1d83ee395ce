"""The suite's own scheduling: tests marked with one xdist_group run on one worker.

scripts/test.sh runs `--dist loadgroup` so that an expensive module fixture (the trained editor,
the 50-edit stack) is built once; a pytest/xdist pair that drops the group (pytest-dev/pytest-xdist#1386)
builds it on every worker and quietly costs CI minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_a_group_runs_on_one_worker_under_loadgroup(tmp_path):
    (tmp_path / "test_grouped.py").write_text(textwrap.dedent("""
        import os
        import pytest

        def record(name):
            with open(os.environ["GROUP_LOG"], "a") as f:
                f.write(f"{name} {os.environ.get('PYTEST_XDIST_WORKER', 'none')}\\n")

        @pytest.mark.xdist_group("one")
        @pytest.mark.parametrize("i", range(4))
        def test_grouped(i):
            record(f"grouped{i}")

        @pytest.mark.parametrize("i", range(4))
        def test_free(i):
            record(f"free{i}")
    """))
    log = tmp_path / "log.txt"
    env = {**os.environ, "GROUP_LOG": str(log)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                          "--dist", "loadgroup", str(tmp_path / "test_grouped.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:]
    rows = [line.split() for line in log.read_text().splitlines()]
    grouped = {worker for name, worker in rows if name.startswith("grouped")}
    assert len(rows) == 8 and all(w.startswith("gw") for _, w in rows), rows
    assert len(grouped) == 1, f"the group's tests ran on {sorted(grouped)}: {rows}"
