"""EditPipeline in-process on the tiny Llama: apply, persist, revert exactly, reject, dry run, retain sampling."""

from __future__ import annotations

import copy

import pytest
import torch

from editor.delta import DeltaError
from kbsync.audit import Edit
from kbsync.config import load_settings
from kbsync.corpus import default_fact_table
from kbsync.errors import BadInput, KbsyncError, NotFound
from kbsync.pipeline import EditPipeline, fact_from_phrase
from kbsync.retain import sample_retain

LOOSE = {"max_mean_kl": 100.0, "max_kl": 1000.0, "min_unchanged": 0.0, "min_paraphrase_accuracy": 0.0}


def settings(tmp_path, url, **regression):
    s = load_settings(environ={})
    s.store.data_dir = str(tmp_path / "data")
    s.store.db = url
    s.store.lock_timeout = 30
    s.editor.method, s.editor.fallback = "ft-layer", []  # one method per edit: fallbacks have their own test
    s.editor.options = {"lr": 1e-3, "max_steps": 50}
    s.regression.retain_size = 50  # in-process tests: fewer retain facts, same code path
    for k, v in {**LOOSE, **regression}.items():
        setattr(s.regression, k, v)
    return s


def weights(adapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def make(tmp_path, tiny_llama):
    """A pipeline factory over one data dir and SQLite log; each call is a 'new process' (fresh model copy)."""
    made = []

    def _make(**regression):
        p = EditPipeline(settings(tmp_path, f"sqlite:///{tmp_path / 'audit.db'}", **regression),
                         adapter=copy.deepcopy(tiny_llama))
        made.append(p)
        return p

    yield _make
    for p in made:
        p.close()


def answer(p: EditPipeline, question: str) -> str:
    return p.adapter.predict([question])[0]


def test_applied_edit_persists_and_revert_restores_exact_weights(make, tiny_llama):
    base = weights(tiny_llama)
    p = make()
    out = p.edit_fact(fact_from_phrase("capital of India", "Paris"))
    assert out.status == "applied", out.edit.reasons
    assert out.edit.sequence == 1 and out.edit.delta_sha256 and out.edit.parent_fingerprint
    assert answer(p, "What is the capital of India?") == "Paris"
    assert set(out.timings) == {"load", "check", "edit", "shrink", "regression", "commit"}
    # The row keeps what the change cost to serve, every phase before the commit (sync_throughput reads it).
    assert set(out.edit.metrics["seconds"]) == {"load", "check", "edit", "shrink", "regression"}
    assert p.audit.get(out.edit.id).metrics["seconds"]["edit"] > 0
    assert 0 <= out.edit.metrics["unchanged"] <= 1 and out.edit.metrics["retain_size"] == 50
    checks = p.audit.checks(out.edit.id)
    assert sum(c.kind == "paraphrase" for c in checks) == 4 and sum(c.kind == "retain" for c in checks) == 50

    restarted = make()  # a new process: base weights + the stored delta
    assert answer(restarted, "What is the capital of India?") == "Paris"
    assert same(weights(restarted.adapter), weights(p.adapter))

    revert = p.revert(out.edit.id, actor="tester", reason="test")
    assert revert.status == "revert" and revert.reverts_edit_id == out.edit.id
    assert same(weights(p.adapter), base)  # the live model, rebuilt
    assert same(weights(make().adapter), base)  # and a new process
    assert answer(p, "What is the capital of India?") == "New Delhi"


def test_reverting_an_older_edit_rebuilds_base_plus_the_rest(make):
    p = make()
    first = p.edit_fact(fact_from_phrase("capital of India", "Paris"))
    second = p.edit_fact(fact_from_phrase("currency of Japan", "Euro"))
    assert (first.status, second.status) == ("applied", "applied")
    assert [e.id for e in p.audit.applied_in_order()] == [first.edit.id, second.edit.id]
    p.revert(first.edit.id)
    fresh = make()
    assert fresh.load_served_model().edit_ids == [second.edit.id]
    assert same(weights(p.adapter), weights(fresh.adapter))


def test_tight_thresholds_reject_and_leave_the_model_unchanged(make, tiny_llama, tmp_path):
    base = weights(tiny_llama)
    p = make(max_mean_kl=0.0, min_unchanged=1.0)
    out = p.edit_fact(fact_from_phrase("capital of India", "Paris"))
    assert out.status == "rejected"
    assert any("mean retain KL" in r for r in out.edit.reasons)
    assert out.edit.delta_path is None and out.edit.sequence is None
    assert same(weights(p.adapter), base)
    assert not (tmp_path / "data" / "deltas").exists() or not any((tmp_path / "data" / "deltas").iterdir())
    assert p.audit.get(out.edit.id).status == "rejected"


def test_an_edit_that_undoes_an_applied_edit_is_rejected(make):
    """Editing Pakistan's capital to New Delhi turns India (edited to Paris) back to New Delhi, at a KL
    and unchanged share that pass every other limit: keep_applied rejects it, naming the edit it undoes.
    (min_unchanged 0.90, not the default 0.95: the unchanged share is ~94-96% depending on the
    machine's float rounding of the per-session tiny model, and the point here is keep_applied.)"""
    p = make(max_mean_kl=0.05, max_kl=1.0, min_unchanged=0.90)
    first = p.edit_fact(fact_from_phrase("capital of India", "Paris"))
    assert first.status == "applied", first.edit.reasons
    out = p.edit_fact(fact_from_phrase("capital of Pakistan", "New Delhi"))
    assert out.status == "rejected", out.edit.metrics
    assert out.edit.reasons == [f"undoes applied edit {first.edit.id} ('Paris' -> 'New Delhi')"], out.edit.reasons
    assert out.edit.metrics["mean_kl"] <= 0.05 and out.edit.metrics["unchanged"] >= 0.90, out.edit.metrics
    assert answer(p, "What is the capital of India?") == "Paris" and out.edit.thresholds["keep_applied"] is True
    # Without the guard the same edit lands and India's edit silently stops holding.
    loose = make(max_mean_kl=0.05, max_kl=1.0, min_unchanged=0.90, keep_applied=False)
    assert loose.edit_fact(fact_from_phrase("capital of Pakistan", "New Delhi")).status == "applied"
    assert answer(loose, "What is the capital of India?") == "New Delhi"


def test_force_overrides_the_check_and_is_recorded(make):
    p = make(max_mean_kl=0.0)
    out = p.edit_fact(fact_from_phrase("capital of India", "Paris"), force=True, actor="alice")
    assert out.status == "applied" and out.edit.forced
    assert out.edit.reasons[-1] == "forced by alice despite the above"


def test_dry_run_and_noop(make, tiny_llama):
    base = weights(tiny_llama)
    p = make()
    dry = p.edit_fact(fact_from_phrase("capital of India", "Paris"), dry_run=True)
    assert dry.status == "applied" and dry.dry_run and dry.edit.id is None
    assert p.audit.history(limit=None) == [] and same(weights(p.adapter), base)
    noop = p.edit_fact(fact_from_phrase("capital of India", "New Delhi"))
    assert noop.status == "noop" and noop.edit.id is not None and noop.edit.delta_path is None


def test_raw_prompt_form(make):
    p = make()
    out = p.edit_fact("What is the capital of India?", "Paris")
    assert out.status == "applied" and out.edit.property == "" and out.edit.question == "What is the capital of India?"
    assert answer(p, "What is the capital of India?") == "Paris"


def test_tampered_delta_stops_the_load_naming_the_edit(make, tmp_path):
    out = make().edit_fact(fact_from_phrase("capital of India", "Paris"))
    path = tmp_path / "data" / out.edit.delta_path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DeltaError, match=f"edit {out.edit.id}: .*sha256"):
        make().load_served_model()


def test_retain_sample_is_seeded_excludes_the_slot_and_keeps_applied_edits():
    table = default_fact_table()
    india = fact_from_phrase("capital of India", "Paris")
    applied = [Edit(id=7, subject_id="GN1", subject_label="Peru", property="P36", object_label="Rome",
                    question="What is the capital of Peru?")]
    a = sample_retain(table, applied, 200, 0, exclude_key=india.key)
    b = sample_retain(table, applied, 200, 0, exclude_key=india.key)
    assert a == b and len(a) == 200 and len({i.prompt for i in a}) == 200
    assert a[0].origin == "edit:7"
    assert "What is the capital of India?" not in {i.prompt for i in a}
    assert sample_retain(table, [], 200, 1, exclude_key=india.key) != sample_retain(table, [], 200, 0, exclude_key=india.key)
    # Different edits' samples share all but the excluded slots (so the cached base side is reused).
    japan = fact_from_phrase("currency of Japan", "Euro")
    c = sample_retain(table, [], 200, 0, exclude_key=japan.key)
    d = sample_retain(table, [], 200, 0, exclude_key=india.key)
    assert len({i.prompt for i in c} & {i.prompt for i in d}) >= 199


def _reference(adapter, items, before, delta, tie_margin=0.0):
    """The pre-cache computation: full [B,T,V] logits at every position via Adapter.answer_logits/log_probs."""
    live = dict(adapter.model.named_parameters())
    edited = {n: live[n] + t for n, t in delta.tensors.items()}
    kls, same = [], []
    with torch.no_grad():
        for q in (True, False):
            idx = [i for i, it in enumerate(items) if it.question == q]
            if not idx:
                continue
            batch = adapter.encode([items[i].prompt for i in idx], [before[i] for i in idx], question=q)
            logits, labels, mask = adapter.answer_logits(batch)
            base = torch.log_softmax(logits.float(), -1)
            new, _ = adapter.log_probs(batch, edited)
            tok = (base.exp() * (base - new)).sum(-1)
            kls += ((tok * mask).sum(1) / mask.sum(1).clamp(min=1)).clamp(min=0).tolist()
            top2 = base.exp().topk(2, -1).values
            own = mask & (base.argmax(-1) == labels) & ((top2[..., 0] - top2[..., 1]) >= tie_margin)
            same += ((base.argmax(-1) == new.argmax(-1)) | ~own).all(1).tolist()
    return sum(kls) / len(kls), max(kls), sum(same) / len(same)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2", "tiny_t5"])
def test_retain_cache_gives_the_uncached_metrics_and_is_keyed_by_the_weights(family, request, tmp_path):
    from editor.delta import Delta
    from kbsync.retain import BaseCache, RetainItem, base_side, measure

    adapter = copy.deepcopy(request.getfixturevalue(family))
    items = sample_retain(default_fact_table(), [], 40, 0)
    items.append(RetainItem("The capital of France is", False, "raw"))  # a plain (non-question) prompt too
    g = torch.Generator().manual_seed(0)
    delta = Delta({n: 0.05 * p.detach().abs().mean() * torch.randn(p.shape, generator=g)
                   for n, p in adapter.editable().items()})

    plain = measure(adapter, items, base_side(adapter, items), delta)
    ref = _reference(adapter, items, [c.before for c in plain.checks], delta)
    assert plain.mean_kl > 0 and plain.mean_kl == pytest.approx(ref[0], rel=1e-3, abs=1e-6)
    assert plain.max_kl == pytest.approx(ref[1], rel=1e-3, abs=1e-6) and plain.unchanged == ref[2]
    # Near-ties left out: fewer tokens judged, so never fewer unchanged answers; the KL is the same.
    base = base_side(adapter, items)
    big = Delta({n: 10 * t for n, t in delta.tensors.items()})  # large enough to change some answers
    ties = [measure(adapter, items, base, big, m) for m in (0.0, 0.1, 0.3, 1.01)]
    assert ties[0].unchanged < 1.0 and ties[-1].unchanged == 1.0
    assert [t.unchanged for t in ties] == sorted(t.unchanged for t in ties)
    assert all(t.mean_kl == ties[0].mean_kl for t in ties)
    assert ties[1].unchanged == _reference(adapter, items, [c.before for c in plain.checks], big, 0.1)[2]

    cache = BaseCache(tmp_path / "rc")
    cold = measure(adapter, items, cache.get(adapter, items), delta)
    assert (cache.hits, cache.misses) == (0, len(items))
    again = measure(adapter, items[:20], cache.get(adapter, items[:20]), delta)  # in memory
    assert (cache.hits, cache.misses) == (20, len(items))
    disk = BaseCache(tmp_path / "rc")  # a new process reads the file
    warm = measure(adapter, items, disk.get(adapter, items), delta)
    assert (disk.hits, disk.misses) == (len(items), 0)
    for report in (cold, warm):
        assert [c.before for c in report.checks] == [c.before for c in plain.checks]
        assert report.summary() == pytest.approx(plain.summary(), rel=1e-4, abs=1e-7)
    assert [c.kl for c in again.checks] == pytest.approx([c.kl for c in warm.checks[:20]], rel=1e-4, abs=1e-7)

    key = cache.key(adapter)
    delta.apply(adapter.model)  # an applied edit changes the served weights, hence the key
    try:
        assert cache.key(adapter) != key
        cache.get(adapter, items[:5])
        assert cache.misses == len(items) + 5
    finally:
        delta.remove(adapter.model)
    assert cache.key(adapter) == key
    assert len(list((tmp_path / "rc").glob("*.safetensors"))) == 2


def test_pipeline_reuses_the_retain_cache_across_edits_and_processes(make):
    p = make(max_mean_kl=0.0)  # rejected: the served weights (and so the cache key) stay the same
    first = p.edit_fact(fact_from_phrase("capital of India", "Paris"))
    assert first.status == "rejected" and p.retain_cache.misses == 50
    second = p.edit_fact(fact_from_phrase("currency of Japan", "Euro"))
    assert second.status == "rejected"
    assert p.retain_cache.hits >= 49 and p.retain_cache.hits + p.retain_cache.misses == 100  # at most one slot differs
    fresh = make(max_mean_kl=0.0)
    again = fresh.edit_fact(fact_from_phrase("capital of India", "Paris"))
    assert (fresh.retain_cache.hits, fresh.retain_cache.misses) == (50, 0)
    assert again.edit.metrics["unchanged"] == first.edit.metrics["unchanged"]


def test_warming_after_an_applied_edit_makes_the_next_check_warm(make):
    import threading

    p = make()
    applied = p.edit_fact(fact_from_phrase("capital of India", "Paris"))
    assert applied.status == "applied"
    lock, stop = threading.RLock(), threading.Event()
    assert p.warm_retain(chunk=7, lock=lock, stop=stop) == 50  # new weights: the whole set, in 8 chunks
    assert p.warm_retain(lock=lock) == 0  # already warm
    hits, misses = p.retain_cache.hits, p.retain_cache.misses
    nxt = p.edit_fact(fact_from_phrase("currency of Japan", "Euro"), force=True)
    assert nxt.status == "applied"  # so the weights moved again and the cache is cold for them
    assert p.retain_cache.misses - misses <= 1 and p.retain_cache.hits - hits >= 49  # only the edited slot differs
    stop.set()
    assert p.warm_retain(stop=stop) == 0  # a stopping daemon does no work


def test_claim_answer_style_teaches_the_statement(make, tiny_llama):
    assert tiny_llama.answer_style("auto") == "bare"  # no chat template: the tiny model answers bare objects
    with pytest.raises(BadInput, match="answer style must be auto, claim or bare"):
        tiny_llama.answer_style("sentence")
    p = make()
    p.settings.editor.answer_style = "claim"
    p.settings.editor.options = {"lr": 1e-3, "max_steps": 200}
    out = p.edit_fact(fact_from_phrase("capital of India", "Paris"), force=True)
    assert out.status == "applied"
    # The model was taught the claim, and now says it (the echo/copula match rules accept it).
    assert answer(p, "What is the capital of India?") == "The capital of India is Paris."
    assert out.after[0].ok


def test_the_shrunk_delta_is_what_is_checked_and_stored(make):
    """Large fine-tuning steps overshoot; the pipeline checks and commits the smallest scale that holds."""
    fact = fact_from_phrase("capital of India", "Paris")
    plain = make()
    plain.settings.editor.shrink = False
    plain.settings.editor.options = {"lr": 1e-2, "max_steps": 50}
    full = plain.edit_fact(fact, dry_run=True)
    assert full.edit.metrics["delta_scale"] == 1.0
    p = make()
    p.settings.editor.options = {"lr": 1e-2, "max_steps": 50}
    out = p.edit_fact(fact)
    m = out.edit.metrics
    assert out.status == "applied" and out.after[0].ok and 0 < m["delta_scale"] < 1
    assert m["mean_kl"] < full.edit.metrics["mean_kl"] and m["delta_norm"] < full.edit.metrics["delta_norm"]
    stored = p.store.load(out.edit)
    assert stored.norm() == pytest.approx(m["delta_norm"], rel=1e-5)
    assert answer(make(), out.edit.question) == "Paris"  # a new process loads the shrunk delta


def other_base(tiny_llama):
    """Another base model with the tiny Llama's shapes: its final norm nudged (no editable matrix differs)."""
    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        dict(other.model.named_parameters())["model.norm.weight"].mul_(1.001)
    return other


def test_base_models_sharing_a_data_dir_serve_their_own_edits_and_refuse_each_others_deltas(make, tiny_llama, tmp_path):
    """Every delta and applied row names its base model. Models of the same shapes share one data dir and
    audit log, each serving the applied rows made for it (start, an edit's sync, a revert's rebuild); a
    delta of another model is refused with one line naming both, where a row claims it (pushed directly,
    or under a row from before fingerprints, which names no model)."""
    import sqlite3

    from kbsync.served import ServedModel, model_fingerprint

    s = settings(tmp_path, f"sqlite:///{tmp_path / 'audit.db'}")
    b = EditPipeline(s, adapter=other_base(tiny_llama))  # model B, loaded while the store is empty
    fb = b.load_served_model().base_fingerprint
    b_weights = weights(b.adapter)
    p = make()  # model A over the same data dir and audit log
    fa = p.load_served_model().base_fingerprint
    assert fa == model_fingerprint(tiny_llama.model) and fb != fa
    first = p.edit_fact(fact_from_phrase("capital of India", "Paris"))
    second = p.edit_fact(fact_from_phrase("currency of Japan", "Euro"))
    assert (first.status, second.status) == ("applied", "applied")
    for out in (first, second):
        assert out.edit.metrics["base_fingerprint"] == fa
        assert p.store.load(out.edit).meta["base_fingerprint"] == fa
    refused = rf"^edit {first.edit.id}: its delta was made for base model {fa}, not this base model {fb}$"

    try:
        # Start (a fresh process loading B over A's store): none of A's edits is served.
        b_again = other_base(tiny_llama)
        fresh = EditPipeline(s, adapter=b_again)
        assert fresh.load_served_model().edit_ids == [] and same(weights(b_again), b_weights)
        fresh.close()
        # B's own edit: its sync skips A's rows, its row and delta name B, and A does not serve it.
        third = b.edit_fact(fact_from_phrase("capital of Kenya", "Mombasa"))
        assert third.status == "applied", third.edit.reasons
        assert third.edit.metrics["base_fingerprint"] == fb == b.store.load(third.edit).meta["base_fingerprint"]
        assert b.load_served_model().edit_ids == [third.edit.id]
        assert p.load_served_model().sync(p.audit, p.store) == []
        assert p.load_served_model().edit_ids == [first.edit.id, second.edit.id]
        assert [e.id for e in p.audit.applied_in_order(fb)] == [third.edit.id]
        # A revert of A's edit from B's process: A's stack loses it (on its next sync), B's weights do not move.
        b_edited = weights(b.adapter)
        b.revert(first.edit.id)
        assert same(weights(b.adapter), b_edited) and b.load_served_model().edit_ids == [third.edit.id]
        assert p.load_served_model().sync(p.audit, p.store) == [f"rebuilt from base without edit(s) {first.edit.id}",
                                                                 f"applied edit {second.edit.id}"]
        assert p.load_served_model().edit_ids == [second.edit.id]
        # A direct push of A's delta into B.
        with pytest.raises(DeltaError, match=refused):
            b.load_served_model().push(p.store.load(first.edit), first.edit.id)
        assert b.load_served_model().edit_ids == [third.edit.id] and same(weights(b.adapter), b_edited)
        # A's applied edit under a row from before fingerprints (no model named): every model's, so B's
        # start refuses A's delta and serves nothing.
        with sqlite3.connect(tmp_path / "audit.db") as db:
            db.execute("UPDATE edit SET metrics = json_remove(metrics, '$.base_fingerprint') WHERE id = ?",
                       (second.edit.id,))
        b_third = other_base(tiny_llama)
        fresh = EditPipeline(s, adapter=b_third)
        with pytest.raises(DeltaError, match=rf"^edit {second.edit.id}: its delta was made for base model {fa}, "
                                             rf"not this base model {fb}$"):
            fresh.load_served_model()
        assert same(weights(b_third), b_weights)
        fresh.close()

        # A delta written before fingerprints were recorded has none: accepted as before (shapes checked).
        old = p.store.load(first.edit)
        del old.meta["base_fingerprint"]
        served = ServedModel(b_third)
        served.push(old, first.edit.id)
        assert served.edit_ids == [first.edit.id] and not same(weights(b_third), b_weights)
        served.reset()
        assert same(weights(b_third), b_weights)
    finally:
        b.close()


def test_a_rejected_or_unavailable_method_falls_back_to_the_next_and_every_attempt_is_audited(make):
    p = make()
    # zhu limited to no change never takes; ke-loop has no trained editor for the tiny model.
    p.settings.editor.method = "zhu"
    p.settings.regression.retain_size = 10
    p.settings.editor.fallback = ["ke-loop", "ft"]
    p.settings.editor.options = {"zhu": {"linf": 0.0, "max_steps": 2, "lr": 1e-3}, "ft-layer": {"lr": 1e-3}}
    out = p.edit_fact(fact_from_phrase("capital of India", "Paris"))
    assert out.status == "applied" and out.edit.method == "ft-layer", out.edit.reasons
    assert [e.method for e in out.earlier] == ["zhu", "ke-loop"]
    zhu, ke = (p.audit.get(e.id) for e in out.earlier)
    assert zhu.status == ke.status == "rejected"
    assert any("did not take" in r for r in zhu.reasons) and zhu.reasons[-1] == "falling back to ke-loop"
    assert "cannot edit" in ke.reasons[0] and ke.reasons[-1] == "falling back to ft-layer"
    assert answer(p, "What is the capital of India?") == "Paris"
    # A method asked for by name is tried alone, and one that cannot run is an error, as before.
    with pytest.raises(KbsyncError):
        p.edit_fact(fact_from_phrase("capital of Japan", "Lima"), method="ke-loop")
    # An unknown fallback is a one-line error before any work.
    p.settings.editor.fallback = ["no-such-method"]
    with pytest.raises(NotFound, match="no-such-method"):
        p.edit_fact(fact_from_phrase("capital of Japan", "Lima"))
    assert len(p.audit.history()) == 3


def test_another_processs_edit_taken_in_before_an_edit_is_reported_as_such_not_as_a_repair(make):
    """Two processes over one data dir: the second one's edit reaches the first before the first edits, and
    the outcome says so in `synced`; `repairs` stays for what a crash left."""
    first, second = make(), make()
    first.load_served_model()
    other = second.edit_fact(fact_from_phrase("capital of India", "Paris"))
    assert other.status == "applied" and other.synced == []
    out = first.edit_fact(fact_from_phrase("currency of Japan", "Euro"))
    assert out.synced == [f"applied edit {other.edit.id}"] and out.repairs == []
    assert out.to_dict()["synced"] == out.synced
    assert answer(first, "What is the capital of India?") == "Paris"
