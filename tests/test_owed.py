"""Nothing lost (issue 15, items 1 and 3): which KB changes are owed, read from the audit rows (SQLite,
and PostgreSQL when KBSYNC_TEST_PG_URL is set); a revert that cannot rebuild the served weights changes
nothing (a real tiny Llama behind the real HTTP API, a real delta store, the CLI in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from kbsync.audit import AuditLog, Edit
from kbsync.audit.log import Owed
from kbsync.edit_engine import Engine
from kbsync.errors import BadInput
from kbsync.serve import ApiServer
from kbsync.store import DeltaStore
from tests.test_serve import TOKEN, call, tiny_settings

REPO = Path(__file__).resolve().parent.parent
NIGERIA = "What is the capital of Nigeria?"


def cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kbsync.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def weights(adapter) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the audit log: what is owed ------------------------------------------------------------

def _row(audit: AuditLog, status: str, target: str = "Lagos", source: str = "daemon", **kw: object) -> Edit:
    return audit.record(Edit(source=source, status=status, subject_id="GN2328926", subject_label="Nigeria",
                             property="P36", object_label=target, reasons=[f"{status} {target}"], **kw))


def test_owed_follows_attempts_settling_and_dismissal(audit_url: str) -> None:
    with AuditLog.open(audit_url) as audit:
        _row(audit, "applied", "Abuja")
        assert audit.owed() == []
        first = _row(audit, "failed")
        _row(audit, "failed", source="cli")  # a person's failed edit is not a KB change: not owed
        second = _row(audit, "rejected")
        [owed] = audit.owed()
        assert (owed.edit.id, owed.attempts, owed.run) == (second.id, 2, (first.id, second.id))

        # Backoff per fact: poll_interval doubled per attempt in a row, capped.
        assert owed.next_retry(10, 3600) - owed.edit.created_at == timedelta(seconds=20)
        assert Owed(owed.edit, 40).next_retry(10, 3600) - owed.edit.created_at == timedelta(seconds=3600)

        # A person's noop of another value does not settle it; of the owed value it does.
        _row(audit, "noop", "Abuja", source="cli")
        assert [o.edit.id for o in audit.owed()] == [second.id]
        _row(audit, "noop", " lagos ", source="api")
        assert audit.owed() == []

        # The KB moves on: a later daemon attempt of another value settles the older one and is owed itself.
        third = _row(audit, "failed", "Ibadan")
        assert [(o.edit.id, o.attempts) for o in audit.owed()] == [(third.id, 1)]
        _row(audit, "applied", "Kano")
        assert audit.owed() == []

        # Dismissal: audited with actor and reason; the attempt keeps its status and reason.
        fourth = _row(audit, "failed", "Ibadan")
        with pytest.raises(BadInput, match=f"edit {first.id} is not an owed KB change: its failed attempt was settled"):
            audit.mark_dismissed(first.id, "bob")
        with pytest.raises(BadInput, match="from the cli, not a daemon attempt"):
            audit.mark_dismissed(first.id + 1, "bob")
        dismissed = audit.mark_dismissed(fourth.id, "bob", reason="the KB is wrong")
        assert (dismissed.status, dismissed.actor, dismissed.reverts_edit_id, dismissed.reasons) == (
            "dismiss", "bob", fourth.id, ["the KB is wrong"])
        assert audit.get(fourth.id).status == "failed" and audit.owed() == []
        assert [e.status for e in audit.history(status="dismiss")] == ["dismiss"]


# --- the daemon, polls driven by hand -------------------------------------------------------

# --- the daemon as a user runs it -------------------------------------------------------------

# --- a revert that cannot be carried out changes nothing -----------------------------------

def test_revert_needing_a_corrupt_delta_fails_and_changes_nothing(
        tmp_path: Path, tiny_llama_dir: Path, kbsync_env: dict[str, str]) -> None:
    settings = tiny_settings(tmp_path, tiny_llama_dir)
    audit = AuditLog.open(settings.store.db_url)
    engine = Engine.load(settings, audit, DeltaStore(settings.store.data_path))
    api = ApiServer(engine, audit, TOKEN).start()
    try:
        edits = []
        for phrase, target in (("capital of Nigeria", "Lagos"), ("capital of Japan", "Osaka")):
            status, out = call(f"{api.url}/edits", "POST", {"phrase": phrase, "target": target}, token=TOKEN)
            assert status == 200 and out["status"] == "applied", out
            edits.append(out["edit_id"])
            if len(edits) == 1:
                after_first = weights(engine.adapter)
        first, second = edits
        path = settings.store.data_path / audit.get(second).delta_path
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01  # one flipped bit in the second edit's delta: the rebuild without the first needs it
        path.write_bytes(bytes(data))
        served = weights(engine.adapter)

        status, err = call(f"{api.url}/edits/{first}/revert", "POST", {}, token=TOKEN)
        assert status == 400
        assert err["error"].startswith(f"cannot revert edit {first}: the model without it stacks edit {second}: ")
        assert "sha256" in err["error"] and err["error"].endswith("nothing was changed") and "\n" not in err["error"]
        assert audit.get(first).status == "applied" and audit.history(status="revert") == []
        assert same(weights(engine.adapter), served)
        assert call(f"{api.url}/v1/chat/completions", "POST",
                    {"messages": [{"role": "user", "content": NIGERIA}]})[1]["choices"][0]["message"]["content"] == "Lagos"

        # The same through the CLI with no daemon (nothing loaded): a one-line error, nothing written.
        env = {**kbsync_env, "KBSYNC_STORE_DATA_DIR": str(settings.store.data_path), "KBSYNC_MODEL_PATH": str(tiny_llama_dir)}
        out = cli(env, "revert", str(first))
        assert out.returncode == 1 and "Traceback" not in out.stderr
        [line] = out.stderr.strip().splitlines()
        assert line.startswith(f"kbsync: error: cannot revert edit {first}: the model without it stacks edit {second}")
        assert audit.get(first).status == "applied"

        # The corrupt edit itself can be reverted: the model without it needs only the first delta.
        status, rev = call(f"{api.url}/edits/{second}/revert", "POST", {"reason": "corrupt"}, token=TOKEN)
        assert status == 200 and rev["status"] == "revert", rev
        assert audit.get(second).status == "reverted" and audit.get(rev["edit_id"]).reasons == ["corrupt"]
        assert same(weights(engine.adapter), after_first)
    finally:
        api.stop()
        audit.close()
