"""memit / alphaedit on the tiny Llama: the null-space projector, factored deltas, the keys state a
revert takes back, and one-line errors for bad subjects, layers, options and statistics."""

from __future__ import annotations

import copy

import pytest
import torch

from editor.delta import Delta
from editor.memit.layer_stats import StatsError, covariances, load_stats, stats_path
from editor.memit.method import KEYS
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
