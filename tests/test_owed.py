"""Nothing lost, nothing served behind the log's back (issue 15, items 1-3), on real parts: a KB change
whose edit fails or is rejected stays owed (audited, counted, retried with backoff, dismissable) across a
daemon restart; `kbsync revert` reaches a running daemon's served model before it returns; a revert that
cannot rebuild the weights changes nothing. Real oxigraph, real daemon processes, the tiny Llama, SQLite
(and PostgreSQL for the audit log's owed queries when KBSYNC_TEST_PG_URL is set)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from filelock import FileLock

from kbsync.audit import AuditLog, Edit
from kbsync.audit.log import Owed
from kbsync.config import load_settings
from kbsync.daemon import Daemon, DaemonPaths, owed_retry_at, read_state
from kbsync.daemon_client import running_daemon
from kbsync.edit_engine import Engine
from kbsync.errors import BadInput
from kbsync.kb.local import LocalKB
from kbsync.pipeline import EditPipeline
from kbsync.api import ApiServer
from kbsync.store import DeltaStore
from tests.daemon_helpers import (FAST, QUESTION, ask, daemon_env, daemon_rows, daemons, kb,  # noqa: F401 (fixtures)
                                  kbsync, make_daemon, same, wait_for, weights, write_config)
from tests.test_serve import TOKEN, call, tiny_settings

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

def wait_due(d: Daemon) -> None:
    """Sleep until every owed change's retry is due."""
    for owed in d.audit.owed():
        while (left := (owed_retry_at(owed, d.settings) - datetime.now(timezone.utc)).total_seconds()) > 0:
            time.sleep(min(left, 0.2) + 0.01)


def test_failed_then_rejected_kb_change_stays_owed_and_lands_after_the_fix(
        tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB, daemons: list[Daemon]) -> None:
    d = make_daemon(tmp_path, tiny_llama_dir, kb.endpoint)
    daemons.append(d)
    d.settings.daemon.poll_interval = 3.0  # the retry backoff's base: long enough to see a poll skip it
    assert d.tick() is not None  # primed
    cursor = d.cursors.load(d.cursor_name).to_json()

    d.settings.daemon.method = "no-such-method"  # the edit raises, as with an untrained default editor
    kb.set_fact("P36", "Nigeria", "Lagos")
    result = d.tick()
    assert result is not None and result.outcomes == {"failed": 1} and result.retries == {}
    [failed] = d.audit.history()
    assert (failed.status, failed.source, failed.object_label, failed.kb_revision) == ("failed", "daemon", "Lagos", "2")
    assert "unknown edit method 'no-such-method'" in failed.reasons[0] and failed.question == QUESTION
    assert d.cursors.load(d.cursor_name).to_json() != cursor  # recorded, so the cursor may move on
    state = read_state(d.settings)
    assert state["owed"] == 1 and state["daemon_edits"] == {"failed": 1} and state["next_retry"]

    again = d.tick()
    assert again is not None and again.facts == 0 and again.retries == {}  # not due: no tight loop
    assert len(d.audit.history()) == 1

    # Rejected (a step this small flips nothing) is owed too, and counts as the next attempt at the value.
    d.settings.daemon.method = "ft-layer"
    options = d.engine.pipeline.settings.editor.options
    d.engine.pipeline.settings.editor.options = {**options, "lr": 1e-12, "max_steps": 2, "check_every": 1}
    wait_due(d)
    retried = d.tick()
    assert retried is not None and retried.retries == {"rejected": 1}
    [owed] = d.audit.owed()
    assert owed.edit.status == "rejected" and owed.attempts == 2
    assert owed_retry_at(owed, d.settings) - owed.edit.created_at == timedelta(seconds=6)  # doubled
    assert d.tick().retries == {}
    assert ask(d) == "Abuja"

    d.engine.pipeline.settings.editor.options = options  # the cause is fixed
    wait_due(d)
    landed = d.tick()
    assert landed is not None and landed.retries == {"applied": 1}
    assert ask(d) == "Lagos"
    assert d.audit.owed() == [] and read_state(d.settings)["owed"] == 0
    assert [(e.status, e.object_label, e.kb_revision) for e in d.audit.history()] == [
        ("applied", "Lagos", "2"), ("rejected", "Lagos", "2"), ("failed", "Lagos", "2")]
    wait_due(d)
    assert d.tick().retries == {}  # settled: never retried again


def test_a_person_dismisses_an_owed_change(tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB,
                                           daemons: list[Daemon], kbsync_env: dict[str, str]) -> None:
    d = make_daemon(tmp_path, tiny_llama_dir, kb.endpoint)
    daemons.append(d)
    assert d.tick() is not None
    d.settings.daemon.method = "no-such-method"
    kb.set_fact("P36", "Nigeria", "Lagos")
    assert d.tick().outcomes == {"failed": 1}
    [row] = d.audit.history()

    env = {**kbsync_env, "KBSYNC_STORE_DATA_DIR": str(d.settings.store.data_path), "COLUMNS": "250"}
    listed = kbsync(env, "history", "--owed")
    assert listed.returncode == 0, listed.stderr
    assert "failed, owed" in listed.stdout
    assert f"owed: edit {row.id} (Nigeria P36 -> Lagos): failed 1 time(s) in a row" in " ".join(listed.stdout.split())
    assert "unknown edit method" in listed.stdout

    out = kbsync(env, "dismiss", str(row.id), "--reason", "Abuja is right", "--actor", "carol")
    assert out.returncode == 0, out.stderr
    assert f"edit {row.id} dismissed" in out.stdout
    wait_due(d)
    assert d.tick().retries == {}  # not retried any more
    dismiss = d.audit.history()[0]
    assert (dismiss.status, dismiss.actor, dismiss.reasons, dismiss.reverts_edit_id) == (
        "dismiss", "carol", ["Abuja is right"], row.id)
    assert json.loads(kbsync(env, "history", "--owed", "--json").stdout) == []
    again = kbsync(env, "dismiss", str(row.id))
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "is not an owed KB change" in again.stderr
    assert ask(d) == "Abuja"


def test_a_revert_made_behind_the_daemon_is_served_from_its_next_poll(
        tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB, daemons: list[Daemon]) -> None:
    d = make_daemon(tmp_path, tiny_llama_dir, kb.endpoint)
    daemons.append(d)
    assert d.tick() is not None
    kb.set_fact("P36", "Nigeria", "Lagos")
    assert d.tick().outcomes == {"applied": 1}
    [row] = d.audit.history()
    other = EditPipeline(d.settings)  # another process, writing the store directly
    try:
        other.revert(row.id, actor="dave")
    finally:
        other.close()
    assert ask(d) == "Lagos"  # the daemon has not looked yet ...
    assert d.tick() is not None
    assert ask(d) == "Abuja"  # ... and takes the revert in at its next poll, not at its next edit


# --- the daemon as a user runs it -------------------------------------------------------------

@pytest.fixture
def env(tmp_path: Path, tiny_llama_dir: Path) -> Iterator[dict[str, str]]:
    with daemon_env(tmp_path, tiny_llama_dir, COLUMNS="250") as environ:
        yield environ


def test_kb_change_whose_edit_fails_is_owed_across_a_restart_and_lands_once_fixed(
        env: dict[str, str], tmp_path: Path) -> None:
    with open(tmp_path / "kbsync.toml", "a") as f:
        f.write("[store]\nlock_timeout = 1\n")
    settings = load_settings(environ=env)
    assert kbsync(env, "daemon", "start").returncode == 0
    wait_for("the first poll", lambda: read_state(settings).get("last_ok"))

    # Another process holds the delta store: the daemon's edit fails after waiting 1 s for it.
    holder = DeltaStore(settings.store.data_path)
    with holder.lock():
        assert kbsync(env, "kb", "set", "capital of Nigeria", "Lagos").returncode == 0
        failed = wait_for("a failed attempt", lambda: [e for e in daemon_rows(env) if e.status == "failed"])[-1]
        assert (failed.object_label, failed.kb_revision) == ("Lagos", "2") and "is busy" in failed.reasons[0]
        assert "(waited 1 s)" in failed.reasons[0]  # the daemon honours store.lock_timeout (it waited 60 s)

        status = json.loads(kbsync(env, "daemon", "status", "--json").stdout)
        assert status["counts"]["owed"] == 1 and status["counts"]["failed"] >= 1
        table = kbsync(env, "daemon", "status")
        assert "owed" in table.stdout and "1 KB change(s) the model does not answer yet" in " ".join(table.stdout.split())
        [owed] = json.loads(kbsync(env, "history", "--owed", "--json").stdout)
        assert owed["owed"] is True and owed["status"] == "failed" and owed["attempts"] >= 1
        assert owed["object_label"] == "Lagos" and "is busy" in owed["reasons"][0]
        assert running_daemon(settings).ask(QUESTION) == "Abuja"
        stopped = kbsync(env, "daemon", "stop")
        assert stopped.returncode == 0, stopped.stderr
    # The cursor is past the change; only the owed row brings it back.
    assert json.loads(kbsync(env, "daemon", "status", "--json").stdout)["counts"]["owed"] == 1

    restarted = kbsync(env, "daemon", "start")
    assert restarted.returncode == 0, restarted.stderr
    client = running_daemon(settings)
    wait_for("the owed change to land", lambda: client.ask(QUESTION) == "Lagos")
    rows = daemon_rows(env)
    assert rows[0].status == "applied" and rows[0].kb_revision == "2"
    assert {e.status for e in rows[1:]} == {"failed"}
    status = json.loads(kbsync(env, "daemon", "status", "--json").stdout)
    assert status["counts"]["owed"] == 0 and status["counts"]["applied"] == 1
    assert "retrying owed edit" in (settings.store.data_path / "daemon" / "daemon.log").read_text()
    assert kbsync(env, "daemon", "stop").returncode == 0


def test_revert_while_the_daemon_runs_changes_the_served_answer_before_it_returns(
        env: dict[str, str], tmp_path: Path, tiny_llama_dir: Path) -> None:
    # One poll at start, then none for an hour: only the revert itself can change what is served.
    write_config(tmp_path / "kbsync.toml", tiny_llama_dir, FAST)
    text = (tmp_path / "kbsync.toml").read_text().replace("poll_interval = 0.5", "poll_interval = 3600")
    (tmp_path / "kbsync.toml").write_text(text)
    settings = load_settings(environ=env)
    assert kbsync(env, "daemon", "start").returncode == 0
    wait_for("the first poll", lambda: read_state(settings).get("last_ok"))
    client = running_daemon(settings)
    edited = kbsync(env, "edit", "capital of Nigeria", "Lagos", "--method", "ft-layer", "-o", "lr=1e-3",
                 "-o", "max_steps=60", "--json")
    assert edited.returncode == 0, edited.stderr
    result = json.loads(edited.stdout)
    assert (result["via"], result["status"]) == ("daemon", "applied"), result
    edit_id = result["edit_id"]
    assert client.ask(QUESTION) == "Lagos"
    polls = client.health()["polls"]

    reverted = kbsync(env, "revert", str(edit_id), "--reason", "wrong", "--json")
    assert reverted.returncode == 0, reverted.stderr
    assert client.ask(QUESTION) == "Abuja"
    assert client.health()["polls"] == polls  # no poll in between: the revert went through the daemon
    out = json.loads(reverted.stdout)
    assert (out["via"], out["status"], out["reverts_edit_id"], out["reasons"]) == ("daemon", "revert", edit_id, ["wrong"])
    assert out["actor"] and out["actor"] != "api"  # the user, as for `kbsync edit`
    assert kbsync(env, "daemon", "stop").returncode == 0


def test_revert_refuses_when_a_daemon_holds_the_data_dir_but_does_not_answer(env: dict[str, str]) -> None:
    settings = load_settings(environ=env)
    paths = DaemonPaths.of(settings)
    paths.root.mkdir(parents=True)
    with FileLock(str(paths.lock)):  # what a daemon still loading its model holds: its lock and pid file
        paths.pid.write_text(f"{os.getpid()}\n")
        out = kbsync(env, "revert", "1")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert f"a kbsync daemon (pid {os.getpid()}) runs over" in line and "its API does not answer" in line
    # A pid file left by a killed daemon, its pid alive in another process, is no daemon: the lock is free.
    stale = kbsync(env, "revert", "1")
    assert stale.returncode == 2 and "no edit with id 1" in stale.stderr


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
        assert err["error"]["message"].startswith(f"cannot revert edit {first}: the model without it stacks edit {second}: ")
        assert "sha256" in err["error"]["message"] and err["error"]["message"].endswith("nothing was changed") and "\n" not in err["error"]["message"]
        assert audit.get(first).status == "applied" and audit.history(status="revert") == []
        assert same(weights(engine.adapter), served)
        assert call(f"{api.url}/v1/chat/completions", "POST",
                    {"messages": [{"role": "user", "content": QUESTION}]})[1]["choices"][0]["message"]["content"] == "Lagos"

        # The same through the CLI with no daemon (nothing loaded): a one-line error, nothing written.
        env = {**kbsync_env, "KBSYNC_STORE_DATA_DIR": str(settings.store.data_path), "KBSYNC_MODEL_PATH": str(tiny_llama_dir)}
        out = kbsync(env, "revert", str(first))
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
