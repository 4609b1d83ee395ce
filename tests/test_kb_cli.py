"""`kbsync kb ...` end to end, in subprocesses, with data under a temporary directory."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbsync.kb.local import LocalKB

REPO = Path(__file__).resolve().parent.parent


def kbsync(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m kbsync.cli ARGS` the way a user would."""
    return subprocess.run([sys.executable, "-m", "kbsync.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (asserting that it is one, without a traceback)."""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("cli")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KBSYNC_")}
    environ.update(KBSYNC_STORE_DATA_DIR=str(root / "data"), KBSYNC_STORE_CACHE_DIR=str(root / "cache"),
                   PYTHONPATH=str(REPO))
    yield environ
    running = LocalKB.find_running(root / "data" / "kb")
    if running is not None:  # a failed test must not leave a server behind
        running.stop()


def test_not_running_is_a_one_line_error(env: dict[str, str]) -> None:
    status = kbsync(env, "kb", "status")
    assert status.returncode == 1 and status.stdout.strip() == "not running"
    proc = kbsync(env, "kb", "get", "capital of Namibia")
    assert proc.returncode == 1
    assert one_line_error(proc) == "kbsync: error: the local KB is not running; start it with `kbsync kb start`"


def test_unknown_relation_is_a_one_line_error(env: dict[str, str]) -> None:
    proc = kbsync(env, "kb", "set", "mayor of Namibia", "Windhoek")
    assert proc.returncode == 2
    assert one_line_error(proc).startswith("kbsync: error: unknown relation in 'mayor of Namibia'")


def test_start_set_get_stop(env: dict[str, str]) -> None:
    started = kbsync(env, "kb", "start")
    assert started.returncode == 0, started.stderr
    endpoint = started.stdout.strip()
    assert endpoint.startswith("http://127.0.0.1:") and endpoint.endswith("/query")
    try:
        again = kbsync(env, "kb", "start")
        assert again.stdout.startswith(f"already running: {endpoint}")
        status = kbsync(env, "kb", "status")
        assert status.returncode == 0 and endpoint in status.stdout

        got = kbsync(env, "kb", "get", "capital of Namibia")
        assert got.stdout.strip() == "capital of Namibia: Windhoek (revision 1)"
        changed = kbsync(env, "kb", "set", "capital of Namibia", "Okahandja")
        assert changed.stdout.strip() == "capital of Namibia: Windhoek -> Okahandja (revision 2)"
        got = kbsync(env, "kb", "get", "Namibia's capital")
        assert got.stdout.strip() == "capital of Namibia: Okahandja (revision 2)"
        same = kbsync(env, "kb", "set", "capital of Namibia", "Okahandja")
        assert same.stdout.strip() == "capital of Namibia: already Okahandja (revision 2)"

        missing = kbsync(env, "kb", "set", "capital of Atlantis", "Poseidonis")
        assert missing.returncode == 2
        assert one_line_error(missing) == "kbsync: error: no entity labelled 'Atlantis' in the knowledge base"
    finally:
        stopped = kbsync(env, "kb", "stop")
    assert stopped.returncode == 0 and stopped.stdout.startswith("stopped")
    assert kbsync(env, "kb", "status").returncode == 1


def test_kb_commands_take_config_and_data_dir(env: dict[str, str], tmp_path: Path) -> None:
    other = tmp_path / "other data"
    cfg = tmp_path / "kbsync.toml"
    cfg.write_text(f"[store]\ndata_dir = {str(other)!r}\n")
    # KBSYNC_STORE_DATA_DIR would override the file's data_dir.
    bare = {k: v for k, v in env.items() if k != "KBSYNC_STORE_DATA_DIR"}
    started = kbsync(env, "kb", "start", "--data-dir", str(other))
    assert started.returncode == 0, started.stderr
    endpoint = started.stdout.strip()
    try:
        assert kbsync(env, "kb", "status").returncode == 1  # not the KB of the environment's data dir
        status = kbsync(bare, "kb", "status", "--config", str(cfg))
        assert status.returncode == 0 and endpoint in status.stdout and str(other / "kb") in status.stdout
        changed = kbsync(bare, "kb", "set", "capital of Namibia", "Okahandja", "--config", str(cfg))
        assert changed.stdout.strip() == "capital of Namibia: Windhoek -> Okahandja (revision 2)", changed.stderr
        got = kbsync(env, "kb", "get", "capital of Namibia", "--data-dir", str(other))
        assert got.stdout.strip() == "capital of Namibia: Okahandja (revision 2)"
        bad = kbsync(env, "kb", "status", "--config", str(tmp_path / "missing.toml"))
        assert bad.returncode == 2 and one_line_error(bad) == f"kbsync: error: config file not found: {tmp_path / 'missing.toml'}"
    finally:
        stopped = kbsync(bare, "kb", "stop", "--config", str(cfg))
        running = LocalKB.find_running(other / "kb")
        if running is not None:
            running.stop()
    assert stopped.returncode == 0 and stopped.stdout.startswith("stopped"), stopped.stderr
    assert kbsync(env, "kb", "status", "--data-dir", str(other)).returncode == 1
