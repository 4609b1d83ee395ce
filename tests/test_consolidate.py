"""`kbsync consolidate` on the tiny Llama: 50 stacked edits written again from the base weights as one delta.

The stack is built by the pipeline (each edit checked and committed as the daemon would), then
consolidated: every fact the stack answered is answered by the one delta, consolidating without an
edit takes out that fact and only it, a crash mid-consolidation leaves the previous state serving,
and a consolidation while an edit holds the store is refused in one line.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest

from kbsync.config import load_settings
from kbsync.consolidate import ConsolidationBusy
from kbsync.errors import BadInput
from kbsync.pipeline import EditPipeline
from kbsync.facts import Entity, Fact
from tests.test_locate_edit import LOCATE  # the alphaedit settings its 50-edit test measured on the tiny Llama

GATED = {"embeddings": True, "prefixes": 0}
# scripts/test.sh runs --dist loadgroup: the tests on the 50-edit stack share one worker, which builds it once.
STACK = pytest.mark.xdist_group("consolidate_stack")


def settings(tmp_path, method: str, options: dict):
    s = load_settings(environ={})
    s.store.data_dir, s.store.cache_dir = str(tmp_path / "data"), str(tmp_path / "cache")
    s.store.db = f"sqlite:///{tmp_path / 'audit.db'}"
    s.store.lock_timeout = 30
    s.editor.method, s.editor.fallback = method, []
    s.editor.options = {method: options}
    s.regression.retain_size = 20
    return s


def moved(facts, n: int) -> list[Fact]:
    """The first n capitals, each moved to another country's capital (a city the model can say)."""
    capitals = [f for f in facts if f.property == "P36"]
    return [Fact(f.subject, f.property, Entity("", capitals[(i + 7) % len(capitals)].object.label))
            for i, f in enumerate(capitals[:n])]


def ask(p: EditPipeline, facts: list[Fact]) -> list[str]:
    from kbsync.facts import render

    return p.adapter.predict([render(f).question for f in facts])


@pytest.fixture(scope="module")
def stacked(llama4, tmp_path_factory):
    """50 gated capital edits through the pipeline, at the default regression limits; the data dir's path."""
    tmp = tmp_path_factory.mktemp("stack")
    base, facts = llama4
    p = EditPipeline(settings(tmp, "gated", GATED), adapter=copy.deepcopy(base))
    try:
        outs = [p.edit_fact(f) for f in moved(facts, 50)]
        applied = [o.edit.id for o in outs if o.status == "applied"]
        assert len(applied) >= 45, [o.edit.reasons for o in outs if o.status != "applied"][:3]
    finally:
        p.close()
    return tmp, applied


def copy_store(src, dst):
    import shutil

    shutil.copytree(src / "data", dst / "data")
    shutil.copy(src / "audit.db", dst / "audit.db")


@STACK
def test_a_consolidated_delta_answers_every_fact_the_stack_did_and_replaces_it(llama4, stacked, tmp_path):
    base, facts = llama4
    copy_store(stacked[0], tmp_path)
    s = settings(tmp_path, "gated", GATED)
    p = EditPipeline(s, adapter=copy.deepcopy(base))
    try:
        targets = moved(facts, 50)
        before = ask(p, targets)
        stack = p.load_served_model().edit_ids
        out = p.consolidate()
        assert out.status == "consolidation", out.edit.reasons
        row = p.audit.get(out.edit.id)
        assert row.metrics["consolidates"] == stacked[1] and row.sequence is not None and row.delta_sha256
        assert row.metrics["held_after"] >= row.metrics["held_before"] >= 45 and row.metrics["lost"] == []
        assert set(row.metrics["phases"]) == {"deltas", "stack_answers", "solve", "repair", "judge"}
        # The served model is base + the one delta now; the edits stay 'applied' (their facts are held).
        assert p.load_served_model().edit_ids == [row.id] and stack == stacked[1]
        assert [e.id for e in p.audit.applied_in_order()] == stacked[1]
        assert ask(p, targets) == before
        fresh = EditPipeline(s, adapter=copy.deepcopy(base))  # a restart loads one delta, not 50
        try:
            assert fresh.load_served_model().edit_ids == [row.id] and ask(fresh, targets) == before
        finally:
            fresh.close()
        # Reverting the consolidation row goes back to the 50 deltas, which serve the same answers.
        p.revert(row.id, reason="back to the stack")
        assert p.load_served_model().edit_ids == stacked[1] and ask(p, targets) == before
    finally:
        p.close()


@STACK
def test_a_consolidation_holds_the_model_for_one_chunk_of_facts_at_a_time(llama4, stacked, tmp_path):
    """Generation waits for one chunk, however many edits stack: no hold of the model lock answers more
    than CHUNK prompts or scores more than CHUNK retain items, and the served answers between holds are the stack's."""
    import threading

    from kbsync import consolidate as c

    base, facts = llama4
    copy_store(stacked[0], tmp_path)
    p = EditPipeline(settings(tmp_path, "gated", GATED), adapter=copy.deepcopy(base))
    try:
        targets = moved(facts, 50)
        before = ask(p, targets)
        holds: list[int] = []  # prompts answered inside each hold

        class CountingLock:
            def __init__(self):
                self.inner = threading.RLock()

            def __enter__(self):
                self.inner.acquire()
                holds.append(0)

            def __exit__(self, *exc):
                self.inner.release()

        predict = p.adapter.predict

        def counted(prompts, *a, **k):
            if holds:
                holds[-1] += len(prompts)
            return predict(prompts, *a, **k)

        p.model_lock, p.adapter.predict = CountingLock(), counted
        out = p.consolidate()
        assert out.status == "consolidation", out.edit.reasons
        assert out.edit.metrics["facts"] > c.CHUNK
        # stack answers, repair and judge answers: each fact once per phase, a chunk per hold
        assert len(holds) >= 3 * (out.edit.metrics["facts"] // c.CHUNK) and max(holds) <= c.CHUNK, holds
        assert 0 < out.edit.metrics["longest_hold_s"] < out.edit.metrics["seconds"]  # recorded: what generation waited
        p.adapter.predict = predict
        assert ask(p, targets) == before
    finally:
        p.close()


@STACK
def test_consolidating_without_an_edit_takes_out_exactly_that_fact(llama4, stacked, tmp_path):
    base, facts = llama4
    copy_store(stacked[0], tmp_path)
    p = EditPipeline(settings(tmp_path, "gated", GATED), adapter=copy.deepcopy(base))
    try:
        targets = moved(facts, 50)
        first = p.consolidate()
        assert first.status == "consolidation"
        before = ask(p, targets)
        gone = stacked[1][3]
        idx = next(i for i, f in enumerate(targets) if p.audit.get(gone).subject_id == f.subject.id)
        revert = p.revert(gone, reason="wrong source")  # a consolidated edit: consolidated again without it
        assert revert.status == "revert" and revert.reverts_edit_id == gone
        assert p.audit.get(gone).status == "reverted"
        assert p.audit.get(first.edit.id).status == "superseded"
        now = p.audit.consolidation(p.load_served_model().base_fingerprint)
        assert now.metrics["without"] == [gone] and gone not in now.metrics["consolidates"]
        after = ask(p, targets)
        assert after[idx] == base.predict([p.audit.get(gone).question])[0] != before[idx]
        assert [a for i, a in enumerate(after) if i != idx] == [b for i, b in enumerate(before) if i != idx]
        with pytest.raises(BadInput, match=f"edit {gone} is not an applied edit"):
            p.consolidate((gone,))
    finally:
        p.close()


def test_alphaedit_edits_are_re_solved_jointly_and_a_mixed_stack_consolidates(llama4, tmp_path):
    """AlphaEdit edits are written again by one joint solve from their kept target vectors, beside gated ones."""
    base, facts = llama4
    s = settings(tmp_path, "alphaedit", LOCATE)
    s.editor.options["gated"] = GATED
    s.regression.max_mean_kl, s.regression.max_kl, s.regression.min_unchanged = 100.0, 1000.0, 0.0
    s.regression.keep_applied = False  # the stack is what it is; the consolidation is what is judged
    p = EditPipeline(s, adapter=copy.deepcopy(base))
    try:
        targets = moved(facts, 12)
        outs = [p.edit_fact(f, method="gated" if i % 3 == 0 else None) for i, f in enumerate(targets)]
        assert all(o.status == "applied" for o in outs), [o.edit.reasons for o in outs]
        before = ask(p, targets)
        held = [i for i, b in enumerate(before) if b == targets[i].object.label]
        out = p.consolidate()
        assert out.status == "consolidation", out.edit.reasons
        assert out.edit.metrics["held_before"] == len(held) >= 9 and out.edit.metrics["lost"] == []
        delta = p.store.load(out.edit)
        assert delta.gates and delta.factors  # the gated edits' vectors and one joint low-rank write
        right = next(iter(delta.factors.values()))[1]
        assert right.shape[0] == 8  # the eight alphaedit facts solved at once (not eight rank-1 writes summed)
        # The gated fact the joint write moved is edited again on the consolidated model (its vector sat
        # on the stacked alphaedit weights before it), and recorded as such.
        repaired = p.audit.get(out.edit.id).metrics["repaired"]
        assert repaired and all(p.audit.get(i).method == "gated" for i in repaired), repaired
        assert all(ask(p, targets)[i] == targets[i].object.label for i in held)
    finally:
        p.close()


@STACK
def test_a_crash_mid_consolidation_leaves_the_previous_state_serving(llama4, stacked, tmp_path):
    """A process killed after writing the consolidated delta, before its row flips: the next start fails
    the pending row, moves the file to orphans/ and serves the 50 deltas as before."""
    from adapters.tiny import save_tiny

    base, facts = llama4
    copy_store(stacked[0], tmp_path)
    s = settings(tmp_path, "gated", GATED)
    model_dir = save_tiny(base, tmp_path / "llama4")
    script = textwrap.dedent(f"""
        import os, sys, pathlib
        sys.path.insert(0, {os.getcwd()!r})
        from tests.test_consolidate import settings, GATED
        from kbsync.pipeline import EditPipeline
        s = settings(pathlib.Path({str(tmp_path)!r}), "gated", GATED)
        s.model.path = {str(model_dir)!r}
        p = EditPipeline(s)
        def die(*a, **k):
            os._exit(9)  # the row is pending and the delta file written: the flip never happens
        p.audit.finish_consolidation = die
        p.consolidate()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-2000:]
    p = EditPipeline(s, adapter=copy.deepcopy(base))
    try:
        served = p.load_served_model()
        assert any("pending -> failed" in r for r in p.repairs), p.repairs
        assert served.edit_ids == stacked[1]
        failed = p.audit.history(status="failed", limit=1)[0]
        assert failed.method == "consolidate" and p.audit.consolidation(served.base_fingerprint) is None
        assert list((tmp_path / "data" / "orphans").iterdir())
    finally:
        p.close()


@STACK
def test_a_consolidation_while_an_edit_holds_the_store_is_refused(llama4, stacked, tmp_path):
    base, _ = llama4
    copy_store(stacked[0], tmp_path)
    p = EditPipeline(settings(tmp_path, "gated", GATED), adapter=copy.deepcopy(base))
    try:
        p.load_served_model()
        held = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import filelock, sys, time
            with filelock.FileLock({str(tmp_path / 'data' / 'store.lock')!r}):
                print("held", flush=True)
                time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
        try:
            assert held.stdout.readline().strip() == "held"
            with pytest.raises(ConsolidationBusy, match="an edit is in flight"):
                p.consolidate()
        finally:
            held.kill()
            held.wait()
        assert p.audit.history(limit=1)[0].method != "consolidate"  # nothing was written
        assert p.load_served_model().edit_ids == stacked[1]
    finally:
        p.close()


def test_a_batch_is_one_update_and_a_fact_it_cannot_take_goes_the_single_way(llama4, tmp_path):
    """Ten capitals and one subject-less raw prompt as one batch: the ten gated proposals are made on the
    same model and judged together (each its own row and delta, metrics.joint = 10, one batch id), the raw
    prompt (which a gate cannot take) goes through the single edit and its fallback; all revert alone."""
    from kbsync.batch import BatchItem
    from kbsync.batch_edit import edit_batch

    base, facts = llama4
    s = settings(tmp_path, "gated", GATED)
    s.editor.fallback = ["ft-layer"]
    s.editor.options["ft-layer"] = {"lr": 1e-3, "max_steps": 50}
    s.regression.max_mean_kl, s.regression.max_kl, s.regression.min_unchanged = 100.0, 1000.0, 0.0
    s.regression.min_paraphrase_accuracy = 0.0
    p = EditPipeline(s, adapter=copy.deepcopy(base))
    try:
        targets = moved(facts, 10)
        items = [BatchItem(n + 1, f, f.object.label) for n, f in enumerate(targets)]
        items.append(BatchItem(11, "The currency of Japan is the", "Peso"))
        out = edit_batch(p, items, batch="ab12")
        assert out.joint == list(range(10)), [(o.status, o.edit.reasons) for o in out.outcomes]
        rows = [o.edit for o in out.outcomes]
        assert all(r.status == "applied" and r.method == "gated" and r.metrics["joint"] == 10 for r in rows[:10])
        assert all(r.metrics["fires_on"] for r in rows[:10])  # each row says what its gate fires on
        assert rows[10].method == "ft-layer" and "joint" not in rows[10].metrics  # gated refused it (no subject)
        assert {r.metrics["batch"] for r in rows} == {"ab12"} and len({r.id for r in rows}) == 11
        assert ask(p, targets) == [f.object.label for f in targets]
        p.revert(rows[3].id)  # one fact of the joint update, reverted alone
        after = ask(p, targets)
        assert after[3] == base.predict([p.audit.get(rows[3].id).question])[0]
        assert [a for i, a in enumerate(after) if i != 3] == [f.object.label for i, f in enumerate(targets) if i != 3]
    finally:
        p.close()
