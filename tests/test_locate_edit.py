"""memit / alphaedit on the tiny Llama: the null-space projector, factored deltas, the keys state a
revert takes back, one-line errors for bad subjects, layers, options and statistics, and 50 stacked
alphaedit edits on the 4-layer tiny Llama that keep the edits and the other facts."""

from __future__ import annotations

import copy

import pytest
import torch

from editor.data import EditRecord
from editor.delta import Delta
from editor.evaluate import run_sequential, score_stack, sequential_baseline
from editor.memit.layer_stats import StatsError, covariances, load_stats, stats_path
from editor.memit.method import KEYS, TARGET
from editor.methods import EditRequest, MethodContext, make_method
from kbsync.config import load_settings
from kbsync.errors import BadInput
from kbsync.pipeline import EditPipeline, fact_from_phrase

FAST = {"stats_tokens": 3000, "prefixes": 0, "v_steps": 10}


def request(subject: str = "India", target: str = "Paris") -> EditRequest:
    return EditRequest(f"What is the capital of {subject}?", target, True, subject=subject,
                       paraphrases=(f"Which city is the capital of {subject}?",))


@pytest.fixture(scope="module")
def alpha(tiny_llama):
    """An AlphaEdit prepared on a private copy of the tiny Llama (statistics computed in memory)."""
    return make_method("alphaedit", copy.deepcopy(tiny_llama), **FAST)


def test_contexts_read_every_wording_behind_every_prefix_or_the_paraphrases_bare():
    from editor.memit.compute_ks import contexts

    request = EditRequest("Q?", "t", subject="s", paraphrases=["P1?", "P2?"])
    prefixes = ["", "A.", "B."]
    assert contexts(request, prefixes, True) == ["Q?", "A. Q?", "B. Q?", "P1?", "A. P1?", "B. P1?", "P2?", "A. P2?", "B. P2?"]
    assert contexts(request, prefixes, True, prefixed_paraphrases=False) == ["Q?", "A. Q?", "B. Q?", "P1?", "P2?"]
    assert contexts(request, prefixes, False) == ["Q?", "A. Q?", "B. Q?"]


def test_projector_annihilates_preserved_keys(alpha):
    module = alpha.modules[0]
    cov, proj = alpha.cov[module].double(), alpha.projectors[module].double()
    vals, vecs = torch.linalg.eigh(cov)
    preserved = vecs[:, vals >= alpha.options.nullspace_threshold * vals.mean()]
    assert 0 < alpha.null_dims()[module] < cov.shape[0] and preserved.shape[1] == cov.shape[0] - alpha.null_dims()[module]
    assert torch.allclose(proj @ proj, proj, atol=1e-5)  # a projector
    dw = alpha.propose(request()).delta.tensors[alpha.params[module]].double()
    assert dw.norm() > 0
    assert (dw @ preserved).norm() <= 1e-3 * dw.norm()


def test_an_alphaedit_delta_is_factored_small_and_applies_and_removes_exactly(alpha):
    result = alpha.propose(request("Japan", "Lima"))
    delta = result.delta
    name = alpha.params[alpha.modules[0]]
    assert set(delta.factors) == {name} and not delta.dense
    left, right = delta.factors[name]
    assert left.shape[1] == right.shape[0] == 1  # one request: rank one
    dense_bytes = delta.tensors[name].numel() * 4
    assert delta.nbytes() < dense_bytes / 10
    assert delta.extras[KEYS + name].shape == (1, right.shape[1])
    before = {k: v.clone() for k, v in alpha.adapter.model.state_dict().items()}
    delta.apply(alpha.adapter.model)
    assert not torch.equal(alpha.adapter.model.state_dict()[name], before[name])
    delta.remove(alpha.adapter.model)
    assert all(torch.equal(v, before[k]) for k, v in alpha.adapter.model.state_dict().items())


def test_reverting_an_alphaedit_edit_takes_its_keys_out(tmp_path, tiny_llama):
    s = load_settings(environ={})
    s.store.data_dir, s.store.cache_dir = str(tmp_path / "data"), str(tmp_path / "cache")
    s.store.db = f"sqlite:///{tmp_path / 'audit.db'}"
    s.editor.method, s.editor.shrink = "alphaedit", False
    s.editor.options = {"alphaedit": FAST}
    s.regression.retain_size = 20
    p = EditPipeline(s, adapter=copy.deepcopy(tiny_llama))
    try:
        a = p.edit_fact(fact_from_phrase("capital of India", "Paris"), force=True)
        b = p.edit_fact(fact_from_phrase("capital of Japan", "Lima"), force=True)
        assert a.status == b.status == "applied"
        method = p.method("alphaedit")
        name = method.params[method.modules[0]]
        ka, kb = (p.store.load(e.edit).extras[KEYS + name].double() for e in (a, b))
        assert torch.allclose(method.applied_keys[name], ka.T @ ka + kb.T @ kb)
        assert method.applied_count == 2
        p.revert(a.edit.id)
        assert method.applied_count == 1
        assert torch.allclose(method.applied_keys[name], kb.T @ kb)
        # Statistics were cached under the base model's fingerprint, computed on the base weights.
        assert stats_path(s.store.cache_path, p.load_served_model().base_fingerprint, method.modules[0], 3000).exists()
    finally:
        p.close()


def test_bad_subject_layers_and_options_are_one_line_errors(alpha, tiny_llama):
    with pytest.raises(BadInput, match="subject 'Peru' does not occur in its prompt"):
        alpha.propose(EditRequest("What is the capital of India?", "Lima", subject="Peru"))
    with pytest.raises(BadInput, match="layer 7 is outside the model"):
        make_method("alphaedit", tiny_llama, layers=(7,), **FAST)
    with pytest.raises(BadInput, match="must leave at least one layer"):
        make_method("memit", tiny_llama, layers="1", **FAST)
    with pytest.raises(BadInput, match="unknown option.*lr.*alphaedit"):
        make_method("alphaedit", tiny_llama, lr=1e-3)
    with pytest.raises(BadInput, match="option v_steps of method alphaedit must be a int"):
        make_method("alphaedit", tiny_llama, v_steps="many")


def test_corrupt_or_missing_statistics_are_one_line_errors_and_nothing_is_written(tmp_path, tiny_llama):
    module = tiny_llama.mlp_out(0)
    with pytest.raises(StatsError, match="missing; compute them with `kbsync editor stats`"):
        covariances(tiny_llama, [module], tmp_path, "fp", 3000, compute=False)
    assert not (tmp_path / "stats").exists()
    good = covariances(tiny_llama, [module], tmp_path, "fp", 3000)[module]
    path = stats_path(tmp_path, "fp", module, 3000)
    assert torch.equal(load_stats(path)[0], good)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StatsError, match="do not match their checksum|corrupt"):
        covariances(tiny_llama, [module], tmp_path, "fp", 3000)
    assert path.read_bytes() == bytes(raw)  # left for the user to rebuild, not silently replaced


def test_memit_proposes_without_changing_the_model(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    m = make_method("memit", model, context=MethodContext(), **FAST)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    result = m.propose(request())
    assert isinstance(result.delta, Delta) and result.delta.factors
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())


# Locate-and-edit where the tiny models keep their facts: their first attention layer carries the
# subject to the prompt's last token and the fact is looked up there (edits at the subject's token
# flip none of 50), so keys are read and the target vector written at that token (position "last"),
# in layers 1-2 of 4. The target vector changes the hidden state by at most its own norm
# (clamp_norm 1; MEMIT's 4, trained to loss 0.05, kept 34% of 50 edits and broke every other fact)
# and stops once the new answer is likely (v_loss_stop 0.3). On two seeds clamp_norm 0.9-1.1, l2
# 0.3-3, cut 0.01-0.03 and v_steps 12-25 all keep >= 98% of the edits and every other fact;
# clamp_norm 0.8 keeps 88% of the edits, 1.25 92-97% of the other facts. Statistics on 3000
# corpus tokens are computed in the test (a second or two).
LOCATE = {"position": "last", "layers": (1, 2), "clamp_norm": 1.0, "v_loss_stop": 0.3, "v_steps": 12, "l2": 1.0,
          "stats_tokens": 3000, "prefixes": 0}


def test_fifty_stacked_alphaedit_edits_keep_the_edits_and_the_other_facts(llama4, tmp_path):
    """50 capitals moved one after another: >= 95% still answered at the end, >= 97% of the other
    70 facts (10 capitals, the 60 currencies, 50 of them of edited countries) answered as before,
    each judged on the greedy answer under the match rules, question and paraphrases alike.

    Measured on ten training seeds of the preset: 50/50 edits kept (49/50 on one seed), their
    paraphrases alike, and all 290 other prompts unchanged on every seed. Capitals, not currencies,
    are edited: countries with the same currency (Peso, Euro, Dollar) have near-identical keys at
    the prompt's last token (cosine 0.95-0.99), so an edit of one moves the others (50 currency
    edits: 91.5% of the other prompts unchanged).
    """
    from kbsync.facts import render
    from kbsync.match import match

    adapter, facts = llama4
    capitals = [f for f in facts if f.property == "P36"]
    edited = capitals[:50]
    others = [f for f in facts if f not in edited]
    retain = [(q, f.object.label) for f in others for q in (render(f).question, *render(f).paraphrases)]
    known = adapter.predict([q for q, _ in retain])
    assert all(match(p, a).ok for p, (_, a) in zip(known, retain)), "the tiny Llama does not know every other fact"
    records = []
    for i, f in enumerate(edited):
        pr = render(f)
        target = capitals[(i + 7) % len(capitals)].object.label  # another country's capital: a city it can say
        records.append(EditRecord(pr.question, target, f.object.label, list(pr.paraphrases), retain,
                                  subject=f.subject.label, claim_prefix=pr.claim_prefix))
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    context = MethodContext(cache_dir=tmp_path, base_fingerprint="tiny-llama4")
    method = make_method("alphaedit", adapter, context, **LOCATE)
    base = sequential_baseline(adapter, records)
    row = run_sequential(adapter, method, base, state_dir=tmp_path / "stack")
    assert stats_path(tmp_path, "tiny-llama4", method.modules[0], 3000).exists()
    assert all(torch.equal(v, before[k]) for k, v in adapter.model.state_dict().items())  # restored after
    scores = {k: round(row[k], 3) for k in ("success_em", "kept_em", "equiv_em", "retain_acc")}
    assert row["retain_n"] == len(retain) == 290
    assert row["kept_em"] >= 0.95 and row["retain_acc"] >= 0.97, scores
    assert row["equiv_em"] >= 0.9, scores

    # The same 50 facts written at once from the base weights, from the target vectors the stacked
    # edits kept in their deltas (what a consolidation does): they hold as the stack did.
    # Everything comes from the saved deltas: what each taught (its meta) and its target vector (extras).
    saved = [Delta.load(tmp_path / "stack" / f"{i:05d}.safetensors") for i in range(len(records))]
    requests = [EditRequest.from_dict(d.meta["request"]) for d in saved]
    assert [(q.prompt, q.target, q.paraphrases) for q in requests] == [(r.prompt, r.target, tuple(r.paraphrases)) for r in records]
    zs = torch.stack([d.extras[TARGET + method.z_module][0] for d in saved])
    joint = method.joint(requests, zs)
    # Each fact written at the scale its edit was applied at (here half): the first layer's share of the move halves.
    half = method.joint(requests, zs, torch.full((len(requests),), 0.5))
    first = method.params[method.modules[0]]
    assert torch.allclose(half.factors[first][0], 0.5 * joint.factors[first][0], rtol=1e-3, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in adapter.model.state_dict().items())  # proposed, not applied
    assert all(left.shape[1] == len(records) for left, _ in joint.factors.values())  # one rank per fact
    joint.apply(adapter.model)
    try:
        together = score_stack(adapter, base, records)
    finally:
        joint.remove(adapter.model)
    assert together["kept_em"] >= 0.95 and together["retain_acc"] >= 0.97, together


def test_consolidating_every_ten_edits_keeps_them_and_a_rerun_replays_it(llama4, tmp_path):
    """20 capital edits, the base weights put back and all facts so far written at once after every
    10 (run_sequential's consolidate_every): the edits and other facts hold, the joint deltas are
    saved beside the edits', and a rerun over the same state replays them to the same scores."""
    from kbsync.facts import render

    adapter, facts = llama4
    capitals = [f for f in facts if f.property == "P36"]
    others = [f for f in facts if f not in capitals[:20]]
    retain = [(render(f).question, f.object.label) for f in others]
    records = [EditRecord(render(f).question, capitals[(i + 7) % len(capitals)].object.label, f.object.label,
                          list(render(f).paraphrases), retain, subject=f.subject.label)
               for i, f in enumerate(capitals[:20])]
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    method = make_method("alphaedit", adapter, MethodContext(cache_dir=tmp_path, base_fingerprint="tiny-llama4"), **LOCATE)
    base = sequential_baseline(adapter, records)
    row = run_sequential(adapter, method, base, state_dir=tmp_path / "run", consolidate_every=10)
    assert sorted(p.name for p in (tmp_path / "run").glob("joint-*")) == ["joint-00010.safetensors", "joint-00020.safetensors"]
    joint = Delta.load(tmp_path / "run" / "joint-00020.safetensors")
    assert joint.factors and all(left.shape[1] == 20 for left, _ in joint.factors.values())  # every fact at once
    assert row["kept_em"] >= 0.95 and row["retain_acc"] >= 0.97, row
    again = run_sequential(adapter, method, base, state_dir=tmp_path / "run", consolidate_every=10)
    assert {k: again[k] for k in ("kept_em", "retain_acc", "retain_tf")} == {k: row[k] for k in ("kept_em", "retain_acc", "retain_tf")}
    assert all(torch.equal(v, before[k]) for k, v in adapter.model.state_dict().items())
    with pytest.raises(BadInput, match="cannot consolidate"):
        run_sequential(adapter, make_method("gated", adapter), base, consolidate_every=10)
