"""A revert that cannot rebuild the served weights changes nothing (issue 15, item 3): a real tiny Llama
behind the real HTTP API, a real SQLite audit log and delta store, and the CLI in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from kbsync.audit import AuditLog
from kbsync.edit_engine import Engine
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
