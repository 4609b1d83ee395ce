"""The contract every registered edit method keeps, on the tiny Llama: created and prepared once,
propose() leaves the live model bit for bit as it was, the delta fits the model and is finite,
applying then removing it restores the weights exactly, the life-cycle hooks take the delta, and
an unknown option is a one-line error. A newly registered method fails here until it has a row
in SMALL (its options for a fast run on the tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch

from editor.hypernet import HyperConfig
from editor.methods import METHODS, EditRequest, MethodContext, _builtins, make_method
from editor.train import TrainConfig, Trainer
from kbsync.errors import BadInput

_builtins()

# Options for a run of seconds; the KnowledgeEditor methods get a checkpoint trained for a few steps.
SMALL: dict[str, dict] = {
    "ft-layer": {"lr": 1e-3, "max_steps": 5},
    "ft-all": {"lr": 1e-3, "max_steps": 5},
    "zhu": {"lr": 1e-3, "max_steps": 5},
    "ke": {},
    "ke-loop": {"loop": 2},
    "memit": {"stats_tokens": 2000, "prefixes": 0, "v_steps": 5, "layers": (0,)},
    "alphaedit": {"stats_tokens": 2000, "prefixes": 0, "v_steps": 5, "layers": (0,)},
    "gated": {"prefixes": 0, "v_steps": 5, "embeddings": True},
}


@pytest.fixture(scope="module")
def model(tiny_llama):
    """A private copy of the tiny Llama (the methods here must not leave it changed, but a failure could)."""
    return copy.deepcopy(tiny_llama)


@pytest.fixture(scope="module")
def editor_checkpoint(model, facts, tmp_path_factory):
    """A KnowledgeEditor trained for a few steps: enough to have a checkpoint to load, not to edit well."""
    from editor.data import from_facts

    out = tmp_path_factory.mktemp("ke-contract")
    Trainer(model, from_facts(facts, per_fact=1, seed=0)[:8], out,
            TrainConfig(steps=2, batch=2, lr=1e-3, eval_every=1000, checkpoint_every=1000),
            HyperConfig(lstm_hidden=16, ffn_hidden=32, cond_dim=32, head_hidden=32)).run()
    return out / "editor.safetensors"


def options_for(name: str, editor_checkpoint) -> dict:
    opts = dict(SMALL[name])
    if name.startswith("ke"):
        opts["checkpoint"] = str(editor_checkpoint)
    return opts


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_keeps_the_contract(name, model, editor_checkpoint, tmp_path):
    assert name in SMALL, f"method {name} is registered but has no contract options in SMALL"
    context = MethodContext(tmp_path / "data", tmp_path / "cache", "contract-test")
    method = make_method(name, model, context, **options_for(name, editor_checkpoint))
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    request = EditRequest("What is the capital of India?", "Paris", True, subject="India",
                          paraphrases=("Which city is the capital of India?",), original="New Delhi")
    result = method.propose(request)
    after = model.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), f"{name}: propose() changed the live model"
    delta = result.delta
    live = dict(model.model.named_parameters())
    # A delta changes weights, or adds gated vectors at modules the model has (adapters/gates.py).
    assert delta.tensors or delta.gates
    assert all(n in live and t.shape == live[n].shape for n, t in delta.tensors.items())
    assert all(torch.isfinite(t).all() for t in delta.tensors.values())
    hidden = model.model.config.hidden_size
    assert all(g.vectors.shape[1] == hidden and torch.isfinite(g.vectors).all() for g in delta.gates.values())
    assert result.seconds >= 0 and isinstance(result.success, bool)
    batch = model.encode([request.prompt], [request.target])
    with torch.no_grad():
        logits_before = model.model(input_ids=batch["input_ids"]).logits
    delta.apply(model.model)
    method.on_applied(1, delta)
    with torch.no_grad():
        logits_applied = model.model(input_ids=batch["input_ids"]).logits
    assert not torch.equal(logits_applied, logits_before), f"{name}: the applied delta does not change the model"
    assert not delta.tensors or any(not torch.equal(model.model.state_dict()[n], before[n]) for n in delta.tensors)
    delta.remove(model.model)
    method.on_reset()
    assert all(torch.equal(model.model.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(model.model(input_ids=batch["input_ids"]).logits, logits_before)
    with pytest.raises(BadInput, match="unknown option"):
        make_method(name, model, context, **options_for(name, editor_checkpoint), no_such_option=1)
