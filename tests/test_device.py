"""[model] device and dtype: bf16 models edit like fp32 ones, deltas stay fp32 and come out bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters.device import resolve_device, resolve_dtype
from adapters.loading import load_adapter
from editor.data import from_facts
from editor.hypernet import HyperConfig
from editor.methods import EditRequest, make_method
from editor.train import TrainConfig, Trainer
from kbsync.config import load_settings
from kbsync.errors import BadInput
from kbsync.facts import render

SMALL = HyperConfig(lstm_hidden=64, ffn_hidden=128, cond_dim=128, head_hidden=128)


@pytest.fixture(scope="module")
def bf16_llama(tiny_llama):
    """The tiny Llama with its weights cast to bfloat16 (a copy: the shared fp32 model is untouched)."""
    b = copy.copy(tiny_llama)
    b.model = copy.deepcopy(tiny_llama.model).to(torch.bfloat16)
    return b


def _edit_outcomes(adapter, facts, method: str, **options) -> list[bool]:
    """Per fact: whether the method's edit to another object of the property makes the model answer it."""
    out = []
    for f in facts[:6]:
        q = render(f).question
        target = next(g.object.label for g in facts if g.property == f.property and g.object.label != f.object.label)
        result = make_method(method, adapter, **options).edit(EditRequest(q, target, subject=f.subject.label))
        stored = list(result.delta.tensors.values()) + [g.vectors for g in result.delta.gates.values()]
        assert stored and all(t.dtype == torch.float32 for t in stored)  # deltas are fp32 in any model dtype
        result.delta.apply(adapter.model)
        try:
            out.append(adapter.predict([q])[0] == target)
        finally:
            result.delta.remove(adapter.model)
    return out


def test_bf16_model_answers_and_edits_as_the_fp32_one(tiny_llama, bf16_llama, facts):
    qs = [render(f).question for f in facts]
    assert next(bf16_llama.model.parameters()).dtype == torch.bfloat16
    agree = sum(a == b for a, b in zip(tiny_llama.predict(qs), bf16_llama.predict(qs)))
    assert agree >= 0.95 * len(qs), agree
    for method, options in (("ft-layer", {"lr": 1e-3, "max_steps": 60}), ("gated", {"embeddings": True})):
        fp32 = _edit_outcomes(tiny_llama, facts, method, **options)
        bf16 = _edit_outcomes(bf16_llama, facts, method, **options)
        assert sum(fp32) >= 4 and abs(sum(fp32) - sum(bf16)) <= 1, (method, fp32, bf16)


def test_bf16_apply_remove_is_bit_exact(bf16_llama):
    from editor.delta import Delta

    before = {n: p.detach().clone() for n, p in bf16_llama.model.named_parameters()}
    # Increments far below bf16's resolution at these weights: adding then subtracting would not restore them.
    delta = Delta({n: torch.full(p.shape, 1e-4, dtype=torch.float32) for n, p in bf16_llama.editable().items()})
    delta.apply(bf16_llama.model)
    assert any(not torch.equal(p, before[n]) for n, p in bf16_llama.model.named_parameters())
    delta.remove(bf16_llama.model)
    assert all(torch.equal(p, before[n]) for n, p in bf16_llama.model.named_parameters())


def test_ke_trains_and_edits_a_bf16_model(bf16_llama, facts, tmp_path):
    records = from_facts(facts)[:8]
    Trainer(bf16_llama, records, tmp_path, TrainConfig(steps=2, batch=2, checkpoint_every=2, eval_every=2,
                                                       sequence=2, eval_sequence=3), SMALL).run()
    result = make_method("ke-loop", bf16_llama, checkpoint=str(tmp_path / "editor.safetensors")).edit(records[0].request())
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in result.delta.tensors.values())


def test_device_and_dtype_settings(tiny_llama_dir, monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    for var, value, message in (("DEVICE", "gpu", "model.device must be"), ("DTYPE", "fp8", "model.dtype must be")):
        with pytest.raises(BadInput, match=message):
            load_settings(environ={f"KBSYNC_MODEL_{var}": value})
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="sees no CUDA device"):
            resolve_device("cuda")
    settings = load_settings(environ={"KBSYNC_MODEL_DTYPE": "bfloat16", "KBSYNC_MODEL_DEVICE": "cpu"})
    adapter = load_adapter(settings, str(tiny_llama_dir))
    assert {p.dtype for p in adapter.model.parameters()} == {torch.bfloat16} and adapter.device == torch.device("cpu")
