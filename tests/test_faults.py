"""Fault injection (issue 15): the daemon as real processes over a real oxigraph KB, real SQLite and
PostgreSQL audit logs and the tiny Llama, broken on purpose: the KB server stopped mid-poll and started
again, SIGKILL mid-edit (its delta half written) and mid-revert (committed to the log, not yet to the
weights), a full data directory, two daemons started on one data directory.

Each scenario asserts that nothing is lost (every KB change is answered by the served model or visible as
owed, or was reverted by a person), that no traceback reached any output or log, and that the served
weights are the base weights plus the applied deltas in order: live (the daemon's own export of its
weights, [serve] export_dir) and reopened (a fresh EditPipeline over the data directory).

The daemons run `kbsync daemon start --foreground` through tests/fault_worker.py, which can stop them
at a named point until the test has killed them or broken something around them.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kbsync.audit import AuditLog, Edit
from kbsync.config import Settings, load_settings
from kbsync.cursor_store import CursorStore
from kbsync.daemon import DaemonPaths, health, read_state
from kbsync.daemon_client import DaemonClient, DaemonError, revert_via_daemon, running_daemon
from kbsync.kb.local import LocalKB
from kbsync.pipeline import EditPipeline
from kbsync.store import DeltaStore
from tests.daemon_helpers import REPO, daemon_env, kb, kbsync, wait_for, weights  # noqa: F401 (kb: a fixture)

WORKER = Path(__file__).resolve().parent / "fault_worker.py"
# Watched; edits of Nigeria's capital to Lagos and Japan's to Osaka stack on the tiny Llama (keep_applied).
SUBJECTS = ("Nigeria", "Japan")
NIGERIA = "GN2328926"


def question(subject: str) -> str:
    return f"What is the capital of {subject}?"


# --- daemons that can be stopped at a point ------------------------------------------------------

@dataclass
class Run:
    """One daemon process (fault_worker.py daemon start --foreground), its log and its hold points."""

    proc: subprocess.Popen[bytes]
    log: Path
    points: Path

    def reached(self, point: str, timeout: float = 90) -> None:
        """Wait until the daemon stands at the point (it fails fast if the daemon died instead)."""
        wait_for(f"the daemon to reach {point}", lambda: (self.points / f"{point}.reached").exists()
                 or self.proc.poll() is not None, timeout)
        assert self.proc.poll() is None, f"the daemon exited ({self.proc.returncode}): {self.text()[-2000:]}"

    def go(self, point: str) -> None:
        """Let the daemon carry on from the point."""
        (self.points / f"{point}.go").touch()

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would: no finally block, no atexit, no flush."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (what `kbsync daemon stop` sends) and wait for a clean exit."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=120) == 0, self.text()[-2000:]

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Faults:
    """A test's daemons over one data directory, the KB they watch, and the checks every scenario makes."""

    tmp_path: Path
    model_dir: Path
    kb: LocalKB
    env: dict[str, str]
    runs: list[Run] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return load_settings(environ=self.env)

    @property
    def export_dir(self) -> Path:
        return self.tmp_path / "export"

    def start(self, *hold: str, polled: bool = True) -> Run:
        """A daemon in the foreground, armed to stop at the hold points; returns once its API answers and
        (polled) its first poll went through, so a KB change made after it is a change to the daemon."""
        n = len(self.runs)
        points = self.tmp_path / f"points-{n}"
        points.mkdir()
        log = self.tmp_path / f"daemon-{n}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, str(WORKER), "daemon", "start", "--foreground"], cwd=REPO,
                                    env={**self.env, "KBSYNC_TEST_HOLD": ",".join(hold),
                                         "KBSYNC_TEST_FAULT_DIR": str(points)},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        run = Run(proc, log, points)
        self.runs.append(run)
        settings = self.settings

        def up() -> bool:
            state = read_state(settings)
            return proc.poll() is not None or (state.get("pid") == proc.pid and bool(state.get("url"))
                                                and (state.get("last_ok") or not polled)
                                                and health(state["url"]) is not None)

        wait_for("the daemon to answer", up, timeout=180)
        assert proc.poll() is None, f"the daemon exited ({proc.returncode}): {run.text()[-2000:]}"
        return run

    def client(self) -> DaemonClient:
        client = running_daemon(self.settings)
        assert client is not None
        return client

    def rows(self) -> list[Edit]:
        with AuditLog.open(self.settings.store.db_url) as audit:
            return audit.history(limit=None)

    # --- the checks ---------------------------------------------------------------------------

    def assert_no_traceback(self, *outputs: str) -> None:
        for text in [*outputs, *(r.text() for r in self.runs)]:
            assert "Traceback" not in text and "Logging error" not in text, text[-3000:]

    def assert_nothing_lost(self, client: DaemonClient | None = None) -> None:
        """Every watched fact's KB value is answered by the served model, owed, or its edit was reverted by a person."""
        with AuditLog.open(self.settings.store.db_url) as audit:
            owed = {(o.edit.subject_id, o.edit.property): o.edit.object_label for o in audit.owed()}
            history = audit.history(limit=None)
        client = client or self.client()
        for subject in SUBJECTS:
            [fact] = self.kb.get_facts("P36", subject)
            want = fact.object.label
            answer = client.ask(question(subject))
            if answer == want or owed.get((fact.subject.id, "P36")) == want:
                continue
            reverted = [e for e in history if e.subject_id == fact.subject.id and e.object_label == want
                        and e.status == "reverted"]
            assert reverted, f"{subject}: the KB says {want!r}, the model {answer!r}, and nothing is owed"

    def expected_weights(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The base weights plus every applied delta, in sequence order (the same in-place adds as a push)."""
        settings = self.settings
        base = load_file(str(self.model_dir / "model.safetensors"))
        with AuditLog.open(settings.store.db_url, read_only=True) as audit:
            applied = audit.applied_in_order()
        store = DeltaStore(settings.store.data_path)
        for edit in applied:
            for name, t in store.load(edit).tensors.items():
                base[name].add_(t.to(dtype=base[name].dtype))
        return base, [e.id for e in applied]

    def assert_live_weights(self, client: DaemonClient) -> None:
        """The running daemon's weights (exported by it after each change) are base + applied deltas."""
        expected, ids = self.expected_weights()
        wait_for("the daemon's export of its weights", lambda: client.health()["export"]["edits"] == ids)
        exported = load_file(str(self.export_dir / "model.safetensors"))
        assert expected.keys() <= exported.keys()
        assert all(torch.equal(exported[k], expected[k]) for k in expected)

    def assert_reopened_weights(self) -> list[int]:
        """A fresh load of the data directory (what a restart serves) is base + applied deltas; their ids."""
        expected, ids = self.expected_weights()
        pipeline = EditPipeline(self.settings)
        try:
            served = weights(pipeline.adapter)
            assert pipeline.repairs == []  # the daemon left nothing to repair
        finally:
            pipeline.close()
        assert all(torch.equal(served[k], expected[k]) for k in expected)
        return ids


@pytest.fixture
def faults(tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB, request: pytest.FixtureRequest) -> Iterator[Faults]:
    """Daemons over tmp_path/data watching the test's KB, with fast KB retries and poll backoff, exporting their
    weights; the audit log in the data directory (SQLite) or in PostgreSQL when the test takes audit_url."""
    url = request.getfixturevalue("audit_url") if "audit_url" in request.fixturenames else ""
    db = {"KBSYNC_STORE_DB": url} if url.startswith("postgresql") else {}
    watch = ",".join(f"{s}|P36" for s in SUBJECTS)
    with daemon_env(tmp_path, tiny_llama_dir, KBSYNC_KB_ENDPOINT=kb.endpoint, KBSYNC_KB_WATCHLIST=watch,
                    KBSYNC_KB_MAX_RETRIES="1", KBSYNC_KB_BACKOFF_BASE="0.05", KBSYNC_KB_TIMEOUT="5",
                    KBSYNC_DAEMON_BACKOFF_MAX="2", KBSYNC_SERVE_EXPORT_DIR=str(tmp_path / "export"), COLUMNS="250",
                    **db) as env:
        f = Faults(tmp_path, tiny_llama_dir, kb, env)
        yield f
        for run in f.runs:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


@contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[bool]:
    """A tmpfs of size mounted at path, unmounted afterwards; yields False (nothing mounted) where this
    process may not mount one (not root, or a container without CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write zeros to a file under path until the file system is full; the file."""
    filler = path / "filler"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    return filler
                block = block[: len(block) // 2]


def slot_rows(rows: list[Edit], subject: str) -> list[tuple[str, str]]:
    return [(e.status, e.object_label) for e in rows if e.subject_label == subject and e.source == "daemon"]


# --- the scenarios ------------------------------------------------------------------------------

def test_kb_server_stopped_mid_poll_and_started_again_loses_no_change(faults: Faults, kb: LocalKB) -> None:
    run = faults.start("edit")
    kb.set_fact("P36", "Nigeria", "Lagos")
    run.reached("edit")  # the poll fetched Nigeria's change and is about to edit it
    kb.set_fact("P36", "Japan", "Osaka")  # after this poll's fetch: its cursor does not cover it
    kb.stop()  # the KB server goes away in the middle of the poll
    run.go("edit")
    settings = faults.settings
    wait_for("a poll to fail", lambda: read_state(settings).get("failures", 0) >= 1)
    client = faults.client()
    assert client.ask(question("Nigeria")) == "Lagos"  # the poll's own change landed without the KB
    assert client.ask(question("Japan")) == "Tokyo"
    assert read_state(settings)["last_error"]

    kb.start()  # the same store on the same port
    wait_for("Japan's change to land", lambda: client.ask(question("Japan")) == "Osaka")
    faults.assert_nothing_lost(client)
    faults.assert_live_weights(client)
    run.stop()
    rows = faults.rows()
    assert slot_rows(rows, "Nigeria") == [("applied", "Lagos")]
    assert slot_rows(rows, "Japan") == [("applied", "Osaka")]
    assert len(faults.assert_reopened_weights()) == 2
    faults.assert_no_traceback()


def test_sigkill_mid_edit_and_mid_revert_loses_nothing(faults: Faults, kb: LocalKB, audit_url: str) -> None:
    # Killed with the edit's delta half written: a pending row and a partial temp file.
    run = faults.start("delta-write")
    kb.set_fact("P36", "Nigeria", "Lagos")
    run.reached("delta-write")
    [pending] = faults.rows()
    assert (pending.status, pending.object_label) == ("pending", "Lagos")
    deltas = faults.settings.store.data_path / "deltas"
    assert (deltas / f"{pending.id}.safetensors.tmp").is_file()
    run.kill()

    # The restart repairs what the kill left, and the poll that died is delivered again.
    run = faults.start("revert")
    client = faults.client()
    wait_for("the change to land", lambda: client.ask(question("Nigeria")) == "Lagos")
    rows = faults.rows()
    assert slot_rows(rows, "Nigeria") == [("applied", "Lagos"), ("failed", "Lagos")]
    assert rows[-1].reasons == ["interrupted while writing its delta"]
    assert "pending -> failed (interrupted while writing its delta)" in run.text()
    lagos = rows[0].id
    assert sorted(p.name for p in deltas.iterdir()) == [f"{lagos}.safetensors"]  # the partial is in orphans/
    faults.assert_nothing_lost(client)
    faults.assert_live_weights(client)

    # Killed in the middle of a revert (what `kbsync revert` sends it): the revert is in the audit log, the
    # weights still hold the edit, and the client is told in one line that the daemon went away.
    errors: list[Exception] = []

    def revert() -> None:
        try:
            revert_via_daemon(faults.settings, lagos, actor="carol", reason="wrong")
        except Exception as e:  # noqa: BLE001 (checked below)
            errors.append(e)

    client_thread = threading.Thread(target=revert)
    client_thread.start()
    run.reached("revert")
    run.kill()
    client_thread.join(60)
    [error] = errors
    assert isinstance(error, DaemonError) and "\n" not in str(error)
    rows = faults.rows()
    assert next(e for e in rows if e.id == lagos).status == "reverted"
    assert [(e.actor, e.reasons) for e in rows if e.status == "revert" and e.reverts_edit_id == lagos] == [
        ("carol", ["wrong"])]

    run = faults.start()
    client = faults.client()
    assert client.ask(question("Nigeria")) == "Abuja"  # served as the log says: without the reverted edit
    faults.assert_nothing_lost(client)
    faults.assert_live_weights(client)
    run.stop()
    assert faults.assert_reopened_weights() == []
    faults.assert_no_traceback()


def test_full_data_dir_fails_edits_cleanly_and_they_land_once_there_is_room(
        faults: Faults, kb: LocalKB, audit_url: str) -> None:
    data = faults.settings.store.data_path
    with small_filesystem(data, "8m") as mounted:
        run = faults.start("warm", polled=False)
        run.reached("warm")  # primed: the daemon watches from here; it fills its retain cache next
        if mounted:
            filler = fill(data)  # the disk is full: deltas, retain cache, state.json, a SQLite log cannot grow
        else:
            # No mount here: every file the daemon writes stops growing at 256 KiB (a delta is ~770 KiB), so
            # its writes fail as on a full disk (EFBIG rather than ENOSPC), the SQLite log's among them.
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.prlimit(run.proc.pid, resource.RLIMIT_FSIZE, (256 * 1024, hard))
        run.go("warm")
        kb.set_fact("P36", "Nigeria", "Lagos")
        client = faults.client()
        recorded = lambda: [e for e in faults.rows() if e.status == "failed"]  # noqa: E731
        wait_for("the edit to fail", lambda: recorded() or client.health()["failures"])
        assert client.ask(question("Nigeria")) == "Abuja"  # nothing half-applied
        if recorded():
            why = "No space left on device" if mounted else "File too large"
            for failed in recorded():  # one line each; not an "internal error" (a crash)
                assert failed.reasons[-1].startswith("cannot write delta file ") and why in failed.reasons[-1]
            faults.assert_nothing_lost(client)  # owed
        else:
            # The SQLite log is on the full disk too: nothing could be recorded, so the poll failed and its
            # cursor stays before the change, which the next poll with room delivers again.
            assert "database or disk is full" in client.health()["last_error"]
            with AuditLog.open(faults.settings.store.db_url) as audit:
                cursor = CursorStore(audit).load(f"revision@{kb.endpoint}")
            assert cursor is not None and cursor.revisions[NIGERIA] == 1

        if mounted:
            filler.unlink()
        else:
            resource.prlimit(run.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
        wait_for("the change to land", lambda: client.ask(question("Nigeria")) == "Lagos")
        faults.assert_nothing_lost(client)
        faults.assert_live_weights(client)
        run.stop()
        rows = faults.rows()
        assert rows[0].status == "applied" and {e.status for e in rows[1:]} <= {"failed"}
        # Every failed write was cleaned up as it failed: no row left pending (the reopen finds nothing to
        # repair) and no partial file taking what room there was.
        assert not list(data.rglob("*.tmp"))
        assert len(faults.assert_reopened_weights()) == 1
        faults.assert_no_traceback()


def test_two_daemons_started_on_one_data_dir_one_runs_and_edits_once(faults: Faults, kb: LocalKB) -> None:
    # Two `kbsync daemon start` at once, the way a user runs it (each re-executes itself in the background).
    env = faults.env
    cmd = [sys.executable, "-m", "kbsync.cli", "daemon", "start"]
    starts = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in starts]
    assert sorted(p.returncode for p in starts) == [0, 1], outputs
    [(won, _)] = [o for p, o in zip(starts, outputs) if p.returncode == 0]
    [(_, lost)] = [o for p, o in zip(starts, outputs) if p.returncode == 1]
    settings = faults.settings
    pid = read_state(settings)["pid"]
    assert "kbsync daemon running: http://127.0.0.1:" in won and f"(pid {pid}," in won
    # Refused before spawning (it saw the pid file), or its spawned daemon found the lock taken and exited 1.
    [line] = lost.strip().splitlines()
    assert (f"a kbsync daemon already runs over {settings.store.data_path} (pid {pid})" in line
            or line.startswith("kbsync: error: the daemon exited during start (code 1): ")), line
    # A third in the foreground (as in a container) while it runs: refused before loading anything.
    third = kbsync(env, "daemon", "start", "--foreground")
    assert third.returncode == 1
    assert third.stderr.strip() == f"kbsync: error: a kbsync daemon already runs over {settings.store.data_path} (pid {pid})"
    # The losers left the winner's files alone: clients still find it.
    assert DaemonPaths.of(settings).pid.read_text().strip() == str(pid) and read_state(settings)["pid"] == pid
    wait_for("the first poll", lambda: read_state(settings).get("last_ok"))

    kb.set_fact("P36", "Nigeria", "Lagos")
    client = faults.client()
    wait_for("the change to land", lambda: client.ask(question("Nigeria")) == "Lagos")
    faults.assert_nothing_lost(client)
    faults.assert_live_weights(client)
    assert kbsync(env, "daemon", "stop").returncode == 0
    assert slot_rows(faults.rows(), "Nigeria") == [("applied", "Lagos")]  # edited once
    assert len(faults.assert_reopened_weights()) == 1
    log = DaemonPaths.of(settings).log.read_text()
    faults.assert_no_traceback(won, lost, third.stdout, third.stderr, log)
