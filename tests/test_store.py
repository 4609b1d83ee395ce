"""The delta store: checksums, the lock, crash reconcile and concurrent writers, on real databases."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from editor.delta import Delta, DeltaError, sha256_file
from kbsync.audit import AuditLog, Edit
from kbsync.errors import KbsyncError
from kbsync.store import CommitFailed, DeltaStore, StoreLocked

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "store_worker.py"


@pytest.fixture
def audit(audit_url):
    log = AuditLog.open(audit_url)
    yield log
    log.close()


@pytest.fixture
def store(tmp_path) -> DeltaStore:
    return DeltaStore(tmp_path / "data", lock_timeout=10)


def make_delta(seed: int = 0) -> Delta:
    g = torch.Generator().manual_seed(seed)
    return Delta({"mlp.weight": torch.randn(6, 4, generator=g), "mlp.bias": torch.randn(6, generator=g)}, {"seed": seed})


@contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """Files this process writes stop growing at nbytes: writes fail with EFBIG, as on a full disk with
    ENOSPC, for any user (root too) and without mounting anything. Python ignores SIGXFSZ."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def worker(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_save_and_load_round_trip_with_checksum(store):
    delta = make_delta(1)
    rel, sha = store.save(delta, 7)
    assert rel == "deltas/7.safetensors"
    path = store.root / "deltas" / "7.safetensors"
    assert path.is_file() and sha == sha256_file(path)
    assert not list(store.deltas_dir.glob("*.tmp"))  # the temp file was renamed away

    loaded = store.load(Edit(id=7, delta_path=rel, delta_sha256=sha))
    assert loaded.meta == {"seed": 1}
    assert all(torch.equal(loaded.tensors[k], delta.tensors[k]) for k in delta.tensors)

    anon, _ = store.save(delta)
    assert anon.startswith("deltas/") and anon != rel and store.resolve(anon).is_file()


def test_commit_applies_in_sequence_and_verify_passes(store, audit):
    edits = [store.commit(audit, Edit(subject_label=f"S{i}", actor="t"), make_delta(i)) for i in range(3)]
    assert [(e.status, e.sequence) for e in edits] == [("applied", 1), ("applied", 2), ("applied", 3)]
    assert all(e.delta_path == f"deltas/{e.id}.safetensors" for e in edits)
    verified = store.verify(audit)
    assert [e.id for e in verified] == [e.id for e in edits]
    assert store.reconcile(audit) == []  # nothing to repair after clean commits


def test_a_delta_that_cannot_be_written_fails_its_row_at_once_and_leaves_no_file(store, audit):
    kept = store.commit(audit, Edit(subject_label="A"), make_delta(1))
    big = Delta({"mlp.weight": torch.ones(512, 512)})  # 1 MiB
    with file_size_limit(256 * 1024), pytest.raises(CommitFailed) as info:
        store.commit(audit, Edit(subject_label="B", source="daemon"), big)
    failed = info.value.edit
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"edit {failed.id}: cannot write delta file ") and "File too large" in msg
    # The row says so now, not at the next start's repair: no pending edit while this process lives on.
    assert (audit.get(failed.id).status, audit.get(failed.id).reasons) == ("failed", [msg.split(": ", 1)[1]])
    assert failed.status == "failed" and failed.sequence is None and audit.history(status="pending") == []
    # No partial file is left taking space (a full disk's last room) until a restart.
    assert sorted(p.name for p in store.deltas_dir.iterdir()) == [f"{kept.id}.safetensors"]
    assert store.reconcile(audit) == []
    assert [e.id for e in store.verify(audit)] == [kept.id] and audit.next_sequence() == 2


def test_tampered_delta_is_detected_and_names_the_edit(store, audit):
    first = store.commit(audit, Edit(subject_label="A"), make_delta(1))
    second = store.commit(audit, Edit(subject_label="B"), make_delta(2))
    path = store.resolve(second.delta_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor byte: still a loadable file, different numbers
    path.write_bytes(bytes(data))

    with pytest.raises(DeltaError) as info:
        store.verify(audit)
    assert str(info.value) == f"edit {second.id}: delta file {path} does not match its recorded sha256"
    with pytest.raises(DeltaError, match=f"^edit {second.id}: "):
        store.load(audit.get(second.id))
    assert store.load(audit.get(first.id)).meta == {"seed": 1}

    path.unlink()
    with pytest.raises(DeltaError, match=f"edit {second.id}: delta file .* is missing"):
        store.verify(audit)
    # A reverted edit no longer has to be present for the model to be rebuilt.
    audit.mark_reverted(second.id, actor="t")
    assert [e.id for e in store.verify(audit)] == [first.id]


def test_reconcile_moves_an_orphan_delta_aside(store, audit):
    kept = store.commit(audit, Edit(subject_label="A"), make_delta(1))
    rel, _ = store.save(make_delta(2), "stray")  # a delta that no audit row mentions
    partial = store.deltas_dir / "9.safetensors.tmp"
    partial.write_bytes(b"half a file")

    lines = store.reconcile(audit)
    assert len(lines) == 2
    assert any("stray.safetensors has no audit row" in ln for ln in lines)
    assert any("partial delta 9.safetensors.tmp" in ln for ln in lines)
    assert (store.orphans_dir / "stray.safetensors").is_file()
    assert (store.orphans_dir / "9.safetensors.tmp").is_file()
    assert not store.resolve(rel).exists()
    assert store.resolve(kept.delta_path).is_file()  # referenced deltas stay
    assert [e.id for e in store.verify(audit)] == [kept.id]
    assert store.reconcile(audit) == []


@pytest.mark.parametrize(
    "mode, why",
    [
        ("crash-after-delta", "interrupted after writing its delta, before it was applied"),
        ("crash-mid-delta", "interrupted while writing its delta"),
        ("crash-before-delta", "interrupted before its delta was written"),
    ],
)
def test_reconcile_fails_a_pending_edit_left_by_a_killed_process(store, audit, audit_url, mode, why):
    before = store.commit(audit, Edit(subject_label="A"), make_delta(1))
    proc = worker(mode, audit_url, str(store.root))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err

    [pending] = audit.history(status="pending")
    assert pending.actor == "crasher"
    delta_file = store.deltas_dir / f"{pending.id}.safetensors"
    partial = store.deltas_dir / f"{pending.id}.safetensors.tmp"
    assert delta_file.exists() == (mode == "crash-after-delta")
    assert partial.exists() == (mode == "crash-mid-delta")

    # The OS dropped the dead process's lock, so reconcile (which takes it) does not wait.
    start = time.monotonic()
    lines = store.reconcile(audit)
    assert time.monotonic() - start < 5
    assert len(lines) == 1 and lines[0].startswith(f"edit {pending.id}: pending -> failed ({why})")

    failed = audit.get(pending.id)
    assert failed.status == "failed" and failed.reasons == [why] and failed.sequence is None
    assert not delta_file.exists() and not partial.exists()
    assert (store.orphans_dir / delta_file.name).exists() == (mode == "crash-after-delta")
    assert (store.orphans_dir / partial.name).exists() == (mode == "crash-mid-delta")
    if mode == "crash-mid-delta":
        assert f"moved partial {partial.name} to {store.orphans_dir / partial.name}" in lines[0]
        assert list(store.deltas_dir.iterdir()) == [store.resolve(before.delta_path)]
    assert [e.id for e in store.verify(audit)] == [before.id]
    assert audit.next_sequence() == 2
    assert store.reconcile(audit) == []


def test_lock_times_out_with_a_clear_error(tmp_path):
    holder = DeltaStore(tmp_path / "data")
    waiter = DeltaStore(tmp_path / "data")
    with holder.lock():
        with holder.lock():  # re-entrant for the same store object
            pass
        start = time.monotonic()
        with pytest.raises(StoreLocked) as info:
            with waiter.lock(timeout=0.3):
                pass
        assert 0.25 < time.monotonic() - start < 3
    msg = str(info.value)
    assert isinstance(info.value, KbsyncError) and "\n" not in msg
    assert msg == f"delta store {tmp_path / 'data'} is busy: another kbsync process holds {tmp_path / 'data' / 'store.lock'} (waited 0.3 s)"
    with waiter.lock(timeout=0.3):  # free again once released
        assert holder.lock_path.exists()


def test_two_processes_committing_concurrently_lose_nothing(store, audit, audit_url, tmp_path):
    n = 8
    go = tmp_path / "go"
    procs = [worker("commit", audit_url, str(store.root), f"{n}:{go}") for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready.*"))) < 2:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()  # both are imported and connected: start together
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err

    # CLOCK_MONOTONIC is system-wide on Linux, so the two workers' intervals compare.
    held = sorted(tuple(map(float, ln.split())) for f in tmp_path.glob("go.held.*") for ln in f.read_text().split("\n"))
    assert len(held) == 2 * n
    assert all(prev_end <= start for (_, prev_end), (start, _) in zip(held, held[1:])), "lock holds overlapped"

    rows = audit.history(limit=None)
    assert len(rows) == 2 * n
    assert {r.status for r in rows} == {"applied"}
    assert len({r.actor for r in rows}) == 2
    assert sorted(r.sequence for r in rows) == list(range(1, 2 * n + 1))
    assert sorted(r.id for r in rows) == sorted({r.id for r in rows})
    assert len(store.verify(audit)) == 2 * n
    assert len(list(store.deltas_dir.glob("*.safetensors"))) == 2 * n
    assert store.reconcile(audit) == []
