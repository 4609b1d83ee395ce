"""The audit log against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from kbsync.audit import AuditError, AuditLog, Edit, EditCheck
from kbsync.errors import BadInput, KbsyncError, NotFound


@pytest.fixture
def audit(audit_url):
    log = AuditLog.open(audit_url)
    yield log
    log.close()


def fact_edit(subject="Namibia", sid="Q1030", prop="P36", obj="Windhoek", status="applied", **kw) -> Edit:
    fields = dict(
        actor="alice",
        source="cli",
        subject_id=sid,
        subject_label=subject,
        property=prop,
        object_id="Q3935",
        object_label=obj,
        question=f"What is the capital of {subject}?",
        claim=f"The capital of {subject} is {obj}.",
        before_answer="Lusaka",
        after_answer=obj,
        method="ke",
        status=status,
    )
    return Edit(**{**fields, **kw})


def test_record_get_round_trips_fields_json_and_checks(audit):
    metrics = {"mean_kl": 0.0123, "max_kl": 0.5, "per_layer": [0.1, 0.2], "nested": {"ok": True, "n": 3}, "é": "ü"}
    edit = fact_edit(metrics=metrics, thresholds={"max_mean_kl": 0.05}, reasons=["forced by user"], forced=True,
                     parent_fingerprint="abc123", kb_revision="rev-42")
    checks = [
        EditCheck(kind="paraphrase", prompt="Namibia's capital is?", expected="Windhoek", before="Lusaka", after="Windhoek", ok=True),
        EditCheck(kind="retain", prompt="Capital of France?", expected="Paris", before="Paris", after="Paris", kl=0.003, ok=True),
    ]
    row = audit.record(edit, checks)
    assert row.id is not None and edit.id == row.id

    got = audit.get(row.id)
    assert got.metrics == metrics
    assert got.thresholds == {"max_mean_kl": 0.05}
    assert got.reasons == ["forced by user"]
    assert got.forced is True
    assert (got.subject_label, got.property, got.object_label) == ("Namibia", "P36", "Windhoek")
    assert (got.parent_fingerprint, got.kb_revision) == ("abc123", "rev-42")
    assert got.created_at.tzinfo is not None
    assert abs(got.created_at - datetime.now(timezone.utc)) < timedelta(minutes=1)

    stored = audit.checks(row.id)
    assert [(c.kind, c.prompt, c.kl, c.ok) for c in stored] == [
        ("paraphrase", "Namibia's capital is?", None, True),
        ("retain", "Capital of France?", 0.003, True),
    ]
    assert all(c.edit_id == row.id for c in stored)


def test_get_and_checks_of_missing_edit_raise_not_found(audit):
    with pytest.raises(NotFound, match=r"^no edit with id 999$"):
        audit.get(999)
    with pytest.raises(NotFound, match="no edit with id 5"):
        audit.checks(5)
    with pytest.raises(NotFound):
        audit.update_status(5, "failed")


def test_record_rejects_unknown_status_source_and_check_kind(audit):
    with pytest.raises(BadInput, match="unknown edit status 'done'"):
        audit.record(fact_edit(status="done"))
    with pytest.raises(BadInput, match="unknown edit source"):
        audit.record(fact_edit(source="cron"))
    with pytest.raises(BadInput, match="unknown check kind"):
        audit.record(fact_edit(), [EditCheck(kind="vibes")])
    assert audit.history() == []


def test_history_is_newest_first_and_limited(audit):
    ids = [audit.record(fact_edit(subject=f"S{i}", sid=f"Q{i}", status="rejected")).id for i in range(5)]
    assert [e.id for e in audit.history()] == ids[::-1]
    assert [e.id for e in audit.history(limit=2)] == ids[:-3:-1]
    assert len(audit.history(limit=None)) == 5


def test_history_filters_by_status_subject_property_and_since(audit):
    a = audit.record(fact_edit(subject="Namibia", sid="Q1030", prop="P36", status="applied"))
    b = audit.record(fact_edit(subject="Namibia", sid="Q1030", prop="P38", obj="Namibian dollar", status="rejected"))
    c = audit.record(fact_edit(subject="Peru", sid="Q419", prop="P36", obj="Lima", status="noop"))

    assert [e.id for e in audit.history(status="applied")] == [a.id]
    assert [e.id for e in audit.history(status=["applied", "noop"])] == [c.id, a.id]
    assert [e.id for e in audit.history(subject="namibia")] == [b.id, a.id]  # label, any case
    assert [e.id for e in audit.history(subject="NAMIBIA", property="P38")] == [b.id]
    assert [e.id for e in audit.history(subject="Q419")] == [c.id]  # entity id
    assert [e.id for e in audit.history(property="P36")] == [c.id, a.id]
    assert audit.history(subject="Atlantis") == []

    cut = audit.get(c.id).created_at
    assert [e.id for e in audit.history(since=cut)] == [c.id]
    assert len(audit.history(since=cut - timedelta(hours=1))) == 3
    assert audit.history(since=datetime.now(timezone.utc) + timedelta(hours=1)) == []
    # A naive `since` is read as UTC.
    assert [e.id for e in audit.history(since=cut.replace(tzinfo=None))] == [c.id]
    with pytest.raises(BadInput):
        audit.history(status="bogus")


def test_applied_edits_get_increasing_sequences_never_reused(audit):
    assert audit.next_sequence() == 1
    a = audit.record(fact_edit(status="applied"))
    r = audit.record(fact_edit(status="rejected"))
    p = audit.record(fact_edit(subject="Peru", status="pending"))
    assert (a.sequence, r.sequence, p.sequence) == (1, None, None)
    assert audit.next_sequence() == 2

    flipped = audit.update_status(p.id, "applied", delta_path="deltas/3.safetensors", delta_sha256="f" * 64)
    assert flipped.sequence == 2 and flipped.delta_path == "deltas/3.safetensors"
    assert [e.id for e in audit.applied_in_order()] == [a.id, p.id]

    audit.mark_reverted(a.id, actor="bob")
    assert [e.id for e in audit.applied_in_order()] == [p.id]
    assert audit.get(a.id).sequence == 1  # history keeps its place in the stack
    assert audit.next_sequence() == 3


def test_update_status_sets_fields_and_refuses_unknown_ones(audit):
    e = audit.record(fact_edit(status="pending"))
    got = audit.update_status(e.id, "failed", reasons=["model crashed"], metrics={"kl": 2.0})
    assert (got.status, got.reasons, got.metrics, got.sequence) == ("failed", ["model crashed"], {"kl": 2.0}, None)
    assert audit.get(e.id).reasons == ["model crashed"]
    with pytest.raises(TypeError, match="colour"):
        audit.update_status(e.id, "failed", colour="red")
    with pytest.raises(BadInput):
        audit.update_status(e.id, "finished")


def test_revert_writes_a_revert_row_and_marks_the_original(audit):
    orig = audit.record(fact_edit(status="applied", delta_path="deltas/1.safetensors", delta_sha256="a" * 64))
    rev = audit.mark_reverted(orig.id, actor="bob", source="api", reason="wrong KB revision")

    assert rev.id != orig.id
    assert (rev.status, rev.reverts_edit_id, rev.actor, rev.source) == ("revert", orig.id, "bob", "api")
    assert rev.reasons == ["wrong KB revision"]
    # The revert takes the model back: its before/after are the edit's after/before.
    assert (rev.before_answer, rev.after_answer) == ("Windhoek", "Lusaka")
    assert rev.delta_sha256 == "a" * 64 and rev.sequence is None

    undone = audit.get(orig.id)
    assert (undone.status, undone.reverted_by) == ("reverted", rev.id)
    assert [(e.id, e.status) for e in audit.history(subject="Namibia")] == [(rev.id, "revert"), (orig.id, "reverted")]
    assert audit.applied_in_order() == []

    with pytest.raises(BadInput, match=f"edit {orig.id} is reverted; only applied edits can be reverted"):
        audit.mark_reverted(orig.id, actor="bob")
    rejected = audit.record(fact_edit(status="rejected"))
    with pytest.raises(BadInput, match="is rejected"):
        audit.mark_reverted(rejected.id, actor="bob")
    with pytest.raises(NotFound):
        audit.mark_reverted(12345, actor="bob")


def test_reopening_keeps_existing_rows(audit_url):
    with AuditLog.open(audit_url) as log:
        first = log.record(fact_edit(metrics={"kl": 0.25}))
    with AuditLog.open(audit_url) as log:
        assert log.get(first.id).metrics == {"kl": 0.25}
        assert log.next_sequence() == 2


def test_unreachable_postgres_fails_quickly_with_one_masked_line():
    start = time.monotonic()
    with pytest.raises(AuditError) as info:
        AuditLog.open("postgresql://kb:s3cret@127.0.0.1:1/x")
    assert time.monotonic() - start < 6  # connect_timeout is 5 s; refused should be immediate
    msg = str(info.value)
    assert msg == "cannot open audit log postgresql://kb:***@127.0.0.1:1/x: connection refused"
    assert "s3cret" not in msg and "\n" not in msg
    assert isinstance(info.value, KbsyncError)


def test_sqlite_path_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # A regular file as the parent directory fails even for root, unlike chmod.
    with pytest.raises(AuditError) as info:
        AuditLog.open(f"sqlite:///{blocker}/sub/audit.db")
    msg = str(info.value)
    assert msg.startswith(f"cannot open audit log sqlite:///{blocker}/sub/audit.db: ")
    assert "not a directory" in msg and "\n" not in msg


def test_sqlite_parent_directory_is_created(tmp_path):
    db = tmp_path / "deep" / "er" / "audit.db"
    with AuditLog.open(f"sqlite:///{db}") as log:
        log.record(fact_edit())
    assert db.is_file()


def test_malformed_url_is_bad_input():
    with pytest.raises(BadInput, match="is not a database URL"):
        AuditLog.open("not a url")


def test_many_processes_can_open_a_fresh_database_at_once(audit_url):
    """Creating the tables is race-free: several processes opening an empty database together all succeed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    # Each process waits until a shared start time so their CREATE TABLEs overlap.
    start = time.time() + 3
    code = ("import time, sys; from kbsync.audit import AuditLog; "
            f"time.sleep(max(0, {start} - time.time())); AuditLog.open(sys.argv[1]).close(); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, audit_url], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    with AuditLog.open(audit_url) as log:
        assert log.history() == []


def test_non_finite_metrics_are_stored_as_strings_and_checks_keep_inf(audit):
    """A rejected edit's KL can be inf; JSON has no Infinity (PostgreSQL refuses it), so it is stored as "inf"."""
    inf = float("inf")
    row = audit.record(fact_edit(status="rejected", metrics={"mean_kl": inf, "max_kl": inf, "spread": -inf,
                                                             "odd": [float("nan")], "finite": False}),
                       [EditCheck(kind="retain", prompt="Capital of Peru?", before="Lima", after="", kl=inf, ok=False)])
    got = audit.get(row.id)
    assert got.metrics == {"mean_kl": "inf", "max_kl": "inf", "spread": "-inf", "odd": ["nan"], "finite": False}
    [check] = audit.checks(row.id)
    assert check.kl == inf and check.ok is False
