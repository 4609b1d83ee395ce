"""Adapters over real tiny models of each family: recall, editable weights, inputs, losses,
functional parameters, KL, beam alternatives, save/load and the registry."""

from __future__ import annotations

import re

import pytest
import torch

from adapters import ADAPTERS, adapter_for, load_adapter
from adapters.tiny import save_tiny, training_pairs
from kbsync.config import load_settings
from kbsync.errors import NotFound
from kbsync.facts import render
from kbsync.match import match

GENERATIVE = ["tiny_llama", "tiny_gpt2", "tiny_t5"]
ALL = GENERATIVE + ["tiny_bert"]
FAMILY = {"tiny_llama": "causal-lm", "tiny_gpt2": "causal-lm", "tiny_t5": "seq2seq", "tiny_bert": "classifier"}
# Measured over 80 facts (seed 0): llama, t5 100%; gpt2 ~91% questions, ~85% paraphrases; bert ~99% claims.
MIN_QUESTION_ACC = {"tiny_llama": 0.95, "tiny_gpt2": 0.75, "tiny_t5": 0.95}
MIN_PARAPHRASE_ACC = {"tiny_llama": 0.9, "tiny_gpt2": 0.65, "tiny_t5": 0.9}
# Names of weights an edit must never touch: biases, norms, embeddings, the LM head.
NEVER = re.compile(r"bias|norm|ln_|LayerNorm|embed|wte|wpe|shared|lm_head|classifier|pooler")


@pytest.fixture(params=ALL)
def tiny(request):
    """(fixture name, adapter) for each family's tiny model."""
    return request.param, request.getfixturevalue(request.param)


@pytest.fixture(params=GENERATIVE)
def gen(request):
    """(fixture name, adapter) for the generative families."""
    return request.param, request.getfixturevalue(request.param)


def _accuracy(adapter, prompts, facts):
    preds = adapter.predict(prompts)
    return sum(match(p, f.object.label, f.object.aliases).ok for p, f in zip(preds, facts)) / len(facts)


def _rewrap(adapter, **kw):
    """A second adapter on the same model and tokenizer (the session fixture's settings stay as they are)."""
    return type(adapter)(adapter.model, adapter.tokenizer, **kw)


def _edit_batch(adapter, facts):
    """A counterfactual batch (each country's capital set to another's) so the loss has work to do."""
    if adapter.family == "classifier":
        prompts, targets = training_pairs(facts[:8], "classifier")
        return adapter.encode(prompts, ["SUPPORTS" if t == "REFUTES" else "REFUTES" for t in targets])
    caps = [f for f in facts if f.property == "P36"][:6]
    return adapter.encode([render(f).question for f in caps], [caps[(i + 1) % len(caps)].object.label for i, f in enumerate(caps)])


# --- the tiny models know their facts -----------------------------------------------------


@pytest.mark.parametrize("name", GENERATIVE)
def test_tiny_model_answers_its_questions(request, name, facts):
    adapter = request.getfixturevalue(name)
    acc = _accuracy(adapter, [render(f).question for f in facts], facts)
    assert acc >= MIN_QUESTION_ACC[name], f"{name} answers {acc:.0%} of its questions"


@pytest.mark.parametrize("name", GENERATIVE)
def test_tiny_model_answers_paraphrases(request, name, facts):
    adapter = request.getfixturevalue(name)
    pairs = [(p, f) for f in facts for p in render(f).paraphrases]
    acc = _accuracy(adapter, [p for p, _ in pairs], [f for _, f in pairs])
    assert acc >= MIN_PARAPHRASE_ACC[name], f"{name} answers {acc:.0%} of paraphrases"


def test_tiny_bert_checks_true_and_false_claims(tiny_bert, facts):
    prompts, targets = training_pairs(facts, "classifier")
    assert targets.count("SUPPORTS") == targets.count("REFUTES") == len(facts)
    preds = tiny_bert.predict(prompts)
    acc = sum(p == t for p, t in zip(preds, targets)) / len(targets)
    assert acc >= 0.9, f"tiny_bert gets {acc:.0%} of claims right"


# --- editable weights ---------------------------------------------------------------------


def test_editable_is_mlp_matrices_of_chosen_layers(tiny):
    name, adapter = tiny
    for spec, layers in (("-2:", {0, 1}), (":", {0, 1}), ("-1:", {1}), ("0", {0}), ("1:", {1})):
        ed = _rewrap(adapter, edit_layers=spec).editable()
        assert ed, (name, spec)
        assert {adapter.layer_of(n) for n in ed} == layers, (name, spec)
        for n, p in ed.items():
            assert p.dim() == 2, n
            assert not NEVER.search(n), n
    full = _rewrap(adapter, edit_layers=":").editable()
    # Two or three MLP matrices per layer depending on the family (gated Llama has three).
    per_layer = {"tiny_llama": 3, "tiny_gpt2": 2, "tiny_t5": 2, "tiny_bert": 2}[name]
    assert len(full) == 2 * per_layer, sorted(full)
    # The editable tensors are the model's own parameters, not copies.
    params = dict(adapter.model.named_parameters())
    assert all(p is params[n] for n, p in full.items())


def test_editable_respects_edit_modules(tiny):
    name, adapter = tiny
    module = {"tiny_llama": r"mlp\.down_proj\.weight", "tiny_gpt2": r"mlp\.c_proj\.weight",
              "tiny_t5": r"layer\.\d+\.DenseReluDense\.wo\.weight", "tiny_bert": r"output\.dense\.weight"}[name]
    ed = _rewrap(adapter, edit_layers=":", edit_modules=[module]).editable()
    assert len(ed) == 2
    assert all(re.search(module.replace(r"\d+", r"\d+") + "$", n) for n in ed), sorted(ed)
    # A pattern naming attention picks attention matrices, still only 2-D ones.
    attn = {"tiny_llama": r"self_attn\.q_proj\.weight", "tiny_gpt2": r"attn\.c_attn\.weight",
            "tiny_t5": r"layer\.0\.SelfAttention\.q\.weight", "tiny_bert": r"attention\.self\.query\.weight"}[name]
    ed = _rewrap(adapter, edit_layers="-1:", edit_modules=[attn]).editable()
    assert len(ed) == 1 and next(iter(ed.values())).dim() == 2
    assert _rewrap(adapter, edit_modules=["no_such_module"]).editable() == {}


# --- inputs and losses --------------------------------------------------------------------


def test_encode_labels_only_answer_tokens(gen):
    name, adapter = gen
    prompts = ["What is the capital of Namibia?", "Which currency is used in Japan?"]
    targets = ["Windhoek", "Yen"]
    b = adapter.encode(prompts, targets)
    labels = b["labels"]
    assert labels.shape[0] == 2
    for i, target in enumerate(targets):
        ids = labels[i][labels[i] != -100]
        assert ids[-1].item() == adapter.tokenizer.eos_token_id
        assert adapter.tokenizer.decode(ids, skip_special_tokens=True).strip() == target
        if adapter.family == "causal-lm":
            # Labelled positions are one contiguous run at the end of the real tokens, after the prompt.
            real = b["attention_mask"][i].nonzero().flatten()
            pos = (labels[i] != -100).nonzero().flatten()
            assert pos.tolist() == list(range(pos[0].item(), real[-1].item() + 1))
            assert adapter.tokenizer.decode(b["input_ids"][i][: pos[0]]).find("Namibia" if i == 0 else "Japan") >= 0
            assert (labels[i][b["attention_mask"][i] == 0] == -100).all()
        else:
            # seq2seq: the decoder input is the label sequence shifted right behind the start token.
            dec = b["decoder_input_ids"][i]
            n = len(ids)
            assert dec[0].item() == adapter.model.config.decoder_start_token_id
            assert dec[1:n].tolist() == ids[:-1].tolist()


def test_encode_classifier_labels(tiny_bert):
    b = tiny_bert.encode(["The capital of Namibia is Windhoek.", "The capital of Namibia is Lima."], ["SUPPORTS", "false"])
    assert b["labels"].tolist() == [1, 0]


def test_loss_is_finite_and_one_sgd_step_lowers_it(tiny, facts):
    name, adapter = tiny
    batch = _edit_batch(adapter, facts)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in adapter.editable().items()}
    loss = adapter.loss(batch, params)
    assert torch.isfinite(loss) and loss.item() > 0
    grads = torch.autograd.grad(loss, list(params.values()))
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    stepped = {n: (p - 0.05 * g / norm).detach() for (n, p), g in zip(params.items(), grads)}
    with torch.no_grad():
        after = adapter.loss(batch, stepped)
    assert after.item() < loss.item(), (name, loss.item(), after.item())


def test_functional_params_change_logits_not_weights(tiny, facts):
    name, adapter = tiny
    batch = _edit_batch(adapter, facts)
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    n0, p0 = next(iter(adapter.editable().items()))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        base = adapter.forward(batch)
        edited = adapter.forward(batch, {n0: p0 + 0.5 * torch.randn(p0.shape, generator=gen)})
        again = adapter.forward(batch)
    assert base.shape == edited.shape
    assert not torch.allclose(base, edited, atol=1e-4)
    assert torch.equal(base, again)
    for n, p in adapter.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_kl_of_identical_params_is_zero(tiny, facts):
    name, adapter = tiny
    batch = _edit_batch(adapter, facts)
    with torch.no_grad():
        base_logp, mask = adapter.log_probs(batch)
        same = adapter.kl(batch, base_logp, {n: p.clone() for n, p in adapter.editable().items()})
        n0, p0 = next(iter(adapter.editable().items()))
        moved = adapter.kl(batch, base_logp, {n0: p0 * 0.0})
    assert same.shape == (batch["labels"].shape[0],)
    assert same.abs().max().item() < 1e-5
    # A saturated classifier barely moves on some claims, so ask only that the change shows somewhere.
    assert moved.max().item() > 1e-2 and (moved > -1e-6).all()


# --- prediction ---------------------------------------------------------------------------


@pytest.mark.parametrize("q", ["What is the capital of France?", "What is the capital of Namibia?"])
def test_beam_alternatives_differ_from_top_answer(gen, q):
    # France is a trained fact; Namibia is not, where greedy and beam search tend to disagree.
    name, adapter = gen
    top = adapter.predict([q])[0]
    alts = adapter.alternatives(q, k=3)
    assert alts, name
    assert len(alts) <= 3
    assert all(a and a.lower() != top.lower() for a in alts), (top, alts)
    assert len({a.lower() for a in alts}) == len(alts)


def test_classifier_alternative_is_the_other_label(tiny_bert):
    claim = "The capital of Namibia is Windhoek."
    assert tiny_bert.alternatives(claim) == [{"SUPPORTS": "REFUTES", "REFUTES": "SUPPORTS"}[tiny_bert.predict([claim])[0]]]


# --- save, load and the registry ----------------------------------------------------------


def test_save_and_load_round_trip(tiny, facts, tmp_path):
    name, adapter = tiny
    path = save_tiny(adapter, tmp_path / name)
    settings = load_settings(environ={})
    settings.model.path = str(path)
    settings.model.edit_layers = "-1:"
    loaded = load_adapter(settings)
    assert loaded.family == FAMILY[name] and type(loaded) is type(adapter)
    if adapter.family == "classifier":
        prompts, _ = training_pairs(facts[:20], "classifier")
    else:
        prompts = [render(f).question for f in facts[:20]]
    assert loaded.predict(prompts) == adapter.predict(prompts)
    assert {loaded.layer_of(n) for n in loaded.editable()} == {1}
    assert sorted(loaded.editable()) == sorted(_rewrap(adapter, edit_layers="-1:").editable())


def test_registry_resolves_each_family(tiny):
    name, adapter = tiny
    assert adapter_for(adapter.model.config) is ADAPTERS[FAMILY[name]]
    assert adapter_for(adapter.model.config, FAMILY[name]) is ADAPTERS[FAMILY[name]]


def test_registry_unknown_family_is_not_found(tiny_llama):
    with pytest.raises(NotFound, match="unknown model family 'rnn'"):
        adapter_for(tiny_llama.model.config, "rnn")
    from transformers import PretrainedConfig

    odd = PretrainedConfig(architectures=["FooForTokenClassification"])
    odd.model_type = "foo"
    with pytest.raises(NotFound, match="no adapter for model type"):
        adapter_for(odd)


def test_prefix_batch_scores_exactly_like_the_full_model(tiny_llama, tiny_gpt2, facts):
    import copy

    from adapters.base import Adapter

    llama = copy.deepcopy(tiny_llama)
    llama.edit_layers = "-1:"  # the prefix is layer 0, which no edit of layer 1 touches
    batch = _edit_batch(llama, facts)
    fast = llama.with_prefix(batch)
    assert int(fast["tail_from"]) == 1 and fast["hidden_in"].shape[:2] == batch["input_ids"].shape
    gen = torch.Generator().manual_seed(0)
    edited = {n: (p + 0.1 * torch.randn(p.shape, generator=gen)).requires_grad_(True) for n, p in llama.editable().items()}
    full_loss, fast_loss = llama.loss(batch, edited), llama.loss(fast, edited)
    assert fast_loss.item() == pytest.approx(full_loss.item(), rel=1e-5)
    g_full = torch.autograd.grad(full_loss, list(edited.values()))
    g_fast = torch.autograd.grad(fast_loss, list(edited.values()))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_full, g_fast))
    # The packed answer-only logits hold the generic [B,T,V] logits at the answer positions.
    with torch.no_grad():
        packed, labels, mask = llama.answer_logits(fast, edited)
        logits, glabels, gmask = Adapter.answer_logits(llama, batch, edited)
    assert mask.sum() == gmask.sum() and torch.equal(labels[mask], glabels[gmask])
    assert torch.allclose(packed[mask], logits[gmask], atol=1e-4)
    below = next(n for n in dict(llama.model.named_parameters()) if ".layers.0.mlp" in n)
    with pytest.raises(ValueError, match="starts at layer 1"):
        llama.answer_states(fast, {below: dict(llama.model.named_parameters())[below] * 2})
    # GPT-2 adds position embeddings to inputs_embeds: the shortcut would be wrong, so none is taken.
    gpt2 = copy.deepcopy(tiny_gpt2)
    gpt2.edit_layers = "-1:"
    plain = _edit_batch(gpt2, facts)
    assert gpt2.with_prefix(plain) is plain
