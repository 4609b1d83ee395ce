"""The gated method and the gate bank on the tiny Llamas: edits that fire only where the subject is named.

The tiny models carry the subject to the answer position in their first attention layer, so
their gated vectors sit on the subject's token embedding (option embeddings); SmolLM2's sit at
layer 8's output (benchmarks/RESULTS.md, "Gated edits").
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from adapters.gates import GateSet, bank_for, find, gated
from editor.data import EditRecord
from editor.delta import Delta, DeltaError
from editor.evaluate import run_sequential, sequential_baseline
from editor.gated.patterns import subject_patterns
from editor.memit.compute_z import compute_target
from editor.methods import EditRequest, MethodContext, make_method
from kbsync.errors import BadInput
from kbsync.facts import render
from kbsync.pipeline import fact_from_phrase

TINY = {"embeddings": True, "prefixes": 0}


def logits(adapter, prompt: str) -> torch.Tensor:
    ids = torch.tensor([adapter._prompt_ids(prompt, True)])
    with torch.no_grad():
        return adapter.model(input_ids=ids).logits


def test_a_gate_fires_at_the_subjects_tokens_only(tiny_llama):
    adapter = copy.deepcopy(tiny_llama)
    emb = next(n for n, m in adapter.model.named_modules() if m is adapter.model.get_input_embeddings())
    pattern = adapter.tokenizer(" India", add_special_tokens=False)["input_ids"]
    vec = torch.randn(1, adapter.model.config.hidden_size)
    gates = {emb: GateSet.of(vec, [(pattern, 0)])}
    named, other = "What is the capital of India?", "What is the capital of Peru?"
    before = {p: logits(adapter, p) for p in (named, other)}
    ids = torch.tensor([adapter._prompt_ids(named, True)])
    rows, cols, which = bank_for(adapter.model).matches(ids, emb)
    assert rows == []  # nothing applied yet
    with gated(adapter.model, gates):
        rows, cols, which = bank_for(adapter.model).matches(ids, emb)
        assert rows == [0] and which == [0] and ids[0, cols[0]].item() == pattern[-1]
        assert not torch.equal(logits(adapter, named), before[named])
        assert torch.equal(logits(adapter, other), before[other])  # another subject: the base model, bit for bit
        # The positions before the subject are untouched (a causal model: only later ones see it).
        assert torch.equal(logits(adapter, named)[0, :cols[0]], before[named][0, :cols[0]])
    assert torch.equal(logits(adapter, named), before[named]) and len(bank_for(adapter.model)) == 0


def test_a_gated_delta_saves_loads_and_applies_exactly(tiny_llama, tmp_path):
    adapter = copy.deepcopy(tiny_llama)
    method = make_method("gated", adapter, MethodContext(), v_steps=5, **TINY)
    request = EditRequest("What is the capital of India?", "Paris", subject="India",
                          paraphrases=("Which city is the capital of India?",))
    delta = method.propose(request).delta
    assert not delta.tensors and list(delta.gates) == [method.module]
    assert delta.meta["request"]["subject"] == "India" and delta.nbytes() < 4096
    sha = delta.save(tmp_path / "d.safetensors")
    back = Delta.load(tmp_path / "d.safetensors", sha256=sha)
    g, h = delta.gates[method.module], back.gates[method.module]
    assert torch.equal(g.vectors, h.vectors) and g.patterns() == h.patterns()
    before = logits(adapter, request.prompt)
    back.apply(adapter.model)
    applied = logits(adapter, request.prompt)
    assert not torch.equal(applied, before)
    back.remove(adapter.model)
    assert torch.equal(logits(adapter, request.prompt), before)
    half = back.scaled(0.5)  # shrink scales the vectors
    assert torch.equal(half.gates[method.module].vectors, 0.5 * h.vectors)


def test_a_delta_file_with_half_a_gate_is_corrupt(tmp_path):
    from safetensors.torch import save_file

    save_file({"gate.vectors::model.embed_tokens": torch.zeros(1, 4)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DeltaError, match="corrupt: gates for model.embed_tokens lack gate.ids, gate.rows"):
        Delta.load(tmp_path / "bad.safetensors")
    with pytest.raises(DeltaError, match="malformed"):
        Delta({}, gates={"m": GateSet(torch.zeros(1, 4), torch.zeros(1, 2, dtype=torch.long), torch.tensor([3]))})


def test_bad_requests_are_one_line_errors(tiny_llama):
    method = make_method("gated", copy.deepcopy(tiny_llama), MethodContext(), v_steps=2, **TINY)
    with pytest.raises(BadInput, match="needs the fact's subject"):
        method.propose(EditRequest("What is the capital of India?", "Paris"))
    with pytest.raises(BadInput, match="subject 'Peru' does not occur in its prompt"):
        method.propose(EditRequest("What is the capital of India?", "Paris", subject="Peru"))
    with pytest.raises(BadInput, match="must be 'subject'"):
        make_method("gated", tiny_llama, MethodContext(), position="last")
    with pytest.raises(BadInput, match="outside the model"):
        make_method("gated", tiny_llama, MethodContext(), layer=40)


def test_fifty_stacked_gated_edits_keep_the_edits_and_every_other_fact(llama4):
    """50 capitals moved one after another, each told its country's currency question (the KB's other
    fact about the subject, EditRequest.keep): >= 95% of the edits and their paraphrases still answered
    at the end, >= 97% of the other 70 facts (10 capitals; the 60 currencies, 50 of edited countries),
    each judged on the greedy answer, question and paraphrases alike.

    Measured on the preset's seed: 50/50 kept, paraphrases 50/50, every other prompt unchanged. Without
    the currency question the edits hold as well but only 34% of the other prompts do (a vector on a
    country's token embedding moves everything the model knows about the country).
    """
    from kbsync.facts import render

    adapter, facts = llama4
    capitals = [f for f in facts if f.property == "P36"]
    edited = capitals[:50]
    others = [f for f in facts if f not in edited]
    retain = [(q, f.object.label) for f in others for q in (render(f).question, *render(f).paraphrases)]
    records = []
    for i, f in enumerate(edited):
        pr = render(f)
        keep = [render(g).question for g in facts if g.subject.id == f.subject.id and g.property != f.property]
        records.append(EditRecord(pr.question, capitals[(i + 7) % len(capitals)].object.label, f.object.label,
                                  list(pr.paraphrases), retain, subject=f.subject.label,
                                  claim_prefix=pr.claim_prefix, keep=keep))
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    method = make_method("gated", adapter, MethodContext(), **TINY)
    base = sequential_baseline(adapter, records)
    row = run_sequential(adapter, method, base)
    assert all(torch.equal(v, before[k]) for k, v in adapter.model.state_dict().items())  # weights never touched
    assert len(bank_for(adapter.model)) == 0  # and the run's gates are gone with it
    scores = {k: round(row[k], 3) for k in ("success_em", "kept_em", "equiv_em", "retain_acc")}
    assert row["retain_n"] == len(retain) == 290
    assert row["kept_em"] >= 0.95 and row["equiv_em"] >= 0.9 and row["retain_acc"] >= 0.97, scores
    assert row["bytes_per_edit"] < 4096


def test_gated_edits_through_the_pipeline_pass_the_check_survive_a_restart_and_revert(tmp_path, llama4):
    """Two gated edits by the pipeline at the default regression limits (no force): applied, the other
    subjects' answers bit for bit the base model's, the gates back after a restart (from the delta
    files), a revert takes one edit's gate out, and an export as plain weights is refused in one line."""
    from kbsync.config import load_settings
    from kbsync.export import ExportError, export_store
    from kbsync.pipeline import EditPipeline, fact_from_phrase

    s = load_settings(environ={})
    s.store.data_dir, s.store.cache_dir = str(tmp_path / "data"), str(tmp_path / "cache")
    s.store.db = f"sqlite:///{tmp_path / 'audit.db'}"
    s.editor.method, s.editor.fallback = "gated", []
    s.editor.options = {"gated": TINY}
    s.regression.retain_size = 20
    base = llama4[0]
    other = "What is the capital of Peru?"
    p = EditPipeline(s, adapter=copy.deepcopy(base))
    try:
        a = p.edit_fact(fact_from_phrase("capital of India", "Paris"))
        b = p.edit_fact(fact_from_phrase("capital of Japan", "Lima"))
        assert a.status == b.status == "applied", (a.edit.reasons, b.edit.reasons)
        # The pipeline told the method the subject's other facts in the fact table (its currency, ...).
        assert p.store.load(a.edit).meta["request"]["keep"]
        # The audit row says exactly what the edit fires on (kbsync show prints the metrics).
        scope = p.audit.get(a.edit.id).metrics["fires_on"]
        assert " India" in scope and "india" in scope and all("India" in t or "india" in t for t in scope)
        assert p.adapter.predict(["What is the capital of India?", "What is the capital of Japan?"]) == ["Paris", "Lima"]
        assert torch.equal(logits(p.adapter, other), logits(base, other))
        assert p.adapter.fingerprint() != base.fingerprint()  # same weights, different model: caches must not mix
        with pytest.raises(ExportError, match=f"edit\\(s\\) {a.edit.id}, {b.edit.id} are subject-gated"):
            export_store(s, tmp_path / "export", adapter=copy.deepcopy(base))
        assert not (tmp_path / "export").exists()
    finally:
        p.close()
    q = EditPipeline(s, adapter=copy.deepcopy(base))  # a restart: the store's deltas, gates and all
    try:
        assert q.adapter.predict(["What is the capital of India?", "What is the capital of Japan?"]) == ["Paris", "Lima"]
        q.revert(a.edit.id)
        assert q.adapter.predict(["What is the capital of India?"]) == base.predict(["What is the capital of India?"])
        assert q.adapter.predict(["What is the capital of Japan?"]) == ["Lima"]
    finally:
        q.close()


def test_gates_fire_on_every_path_into_the_model_and_never_on_stale_ids(tiny_llama):
    """The whole model, its body alone (answer_logits, the retain check) and generation all fire the
    gate; a call that starts from embeddings fires nothing, whatever ran before it."""
    adapter = copy.deepcopy(tiny_llama)
    emb = next(n for n, m in adapter.model.named_modules() if m is adapter.model.get_input_embeddings())
    pattern = adapter.tokenizer(" India", add_special_tokens=False)["input_ids"]
    gates = {emb: GateSet.of(torch.randn(1, adapter.model.config.hidden_size) * 3, [(pattern, 0)])}
    batch = adapter.encode(["What is the capital of India?"], ["Paris"])
    plain = adapter.answer_logits(batch)[0]
    embeds = adapter.model.get_input_embeddings()(batch["input_ids"]).detach()
    with torch.no_grad():
        from_embeds = adapter.model(inputs_embeds=embeds).logits
    with gated(adapter.model, gates):
        assert not torch.equal(adapter.answer_logits(batch)[0], plain)  # the body-only path
        with torch.no_grad():
            adapter.model(input_ids=batch["input_ids"])  # ids with the subject, then a call without ids
            assert torch.equal(adapter.model(inputs_embeds=embeds).logits, from_embeds)


def test_a_gated_edit_invalidates_only_the_retain_items_that_name_its_subject(tiny_llama, tmp_path):
    """The retain cache after a gated edit: weights unchanged, so every item that does not name the
    subject (in its prompt or its answer) is reused; those that do are recomputed, and every reused
    or recomputed item is what a fresh computation under the gate gives."""
    from kbsync.corpus import default_fact_table
    from kbsync.retain import BaseCache, base_side, sample_retain

    adapter = copy.deepcopy(tiny_llama)
    items = sample_retain(default_fact_table(), [], 40, 0)
    # A subject the sample asks about (one item or a few), so most items do not name it.
    subject = next(f.subject.label for f in default_fact_table().facts
                   if 0 < sum(f" {f.subject.label}" in it.prompt for it in items) <= 3)
    naming = [it for it in items if f" {subject}" in it.prompt]
    cache = BaseCache(tmp_path / "rc")
    cache.get(adapter, items)
    emb = next(n for n, m in adapter.model.named_modules() if m is adapter.model.get_input_embeddings())
    pattern = adapter.tokenizer(f" {subject}", add_special_tokens=False)["input_ids"]
    delta = Delta({}, gates={emb: GateSet.of(torch.randn(1, adapter.model.config.hidden_size) * 3, [(pattern, 0)])})
    delta.apply(adapter.model)
    try:
        misses = cache.misses
        got = cache.get(adapter, items)
        recomputed = cache.misses - misses
        assert len(naming) <= recomputed < len(items)
        fresh = base_side(adapter, items)
        assert [g.answer for g in got] == [f.answer for f in fresh]
        assert all(torch.allclose(g.states, f.states, atol=1e-5) for g, f in zip(got, fresh))
    finally:
        delta.remove(adapter.model)
    misses = cache.misses
    cache.get(adapter, items)  # the gate gone: the items naming it are recomputed again, nothing else
    assert cache.misses - misses == recomputed


def test_the_target_vector_is_optimised_where_the_gate_will_fire(tiny_llama):
    """A styled answer that names the subject again ("India's capital: India Paris") gets the vector at
    both occurrences when served; find() gives compute_z exactly those places (prompt and answer)."""
    adapter = tiny_llama
    pattern = adapter.tokenizer(" India", add_special_tokens=False)["input_ids"]
    batch = adapter.encode(["What is the capital of India?", "What is the capital of Peru?"], ["India Paris", "Lima"])
    rows, cols = find(batch["input_ids"], [pattern])
    assert rows.tolist() == [0, 0]  # the question's " India" and the answer's, nothing in Peru's row
    ids = batch["input_ids"][0]
    assert all(ids[c - len(pattern) + 1:c + 1].tolist() == pattern for c in cols.tolist())
    # The gate bank fires at the same places.
    emb = next(n for n, m in adapter.model.named_modules() if m is adapter.model.get_input_embeddings())
    with gated(adapter.model, {emb: GateSet.of(torch.ones(1, adapter.model.config.hidden_size), [(pattern, 0)])}):
        b_rows, b_cols, _ = bank_for(adapter.model).matches(batch["input_ids"], emb)
    assert (b_rows, b_cols) == (rows.tolist(), cols.tolist())


def test_a_vector_that_does_not_flip_at_its_layer_is_retried_at_the_subjects_embedding(tiny_llama):
    """The 2-layer tiny Llama carries the subject to the answer in its first layer: no vector after it flips
    an answer there (sync_throughput's KB changes were all rejected with 'the edit did not take')."""
    adapter = copy.deepcopy(tiny_llama)
    request = EditRequest("What is the capital of Nigeria?", "Nairobi", subject="Nigeria")  # a city it can spell
    plain = make_method("gated", adapter, MethodContext(), prefixes=0, retry_embeddings=False).edit(request)
    assert not plain.success and plain.delta.meta["layer"] == 0, plain.prediction
    result = make_method("gated", adapter, MethodContext(), prefixes=0).edit(request)
    assert result.success and result.prediction == "Nairobi"
    emb = next(n for n, m in adapter.model.named_modules() if m is adapter.model.get_input_embeddings())
    assert list(result.delta.gates) == [emb] and result.delta.meta["layer"] == -1
    assert result.delta.meta["retried"].startswith("layer 0 did not flip the prompt")
    assert result.seconds > plain.seconds * 0.5  # both attempts are timed


def test_at_the_embedding_the_vector_is_fitted_to_the_bare_prompts_not_generated_prefixes(tiny_llama):
    """The tiny Llama cannot read its own generated prefixes: fitted over them too, the embedding's vector for
    Turkey -> Tehran settles where the served question answers Rabat (sync_throughput's third KB change was
    refused); fitted to the bare prompts it flips. Default options: 4 prefixes at the layer, none at the retry."""
    adapter = copy.deepcopy(tiny_llama)
    fact = fact_from_phrase("capital of Turkey", "Tehran")
    rendered = render(fact)
    request = EditRequest(rendered.question, "Tehran", subject="Turkey", paraphrases=rendered.paraphrases)
    method = make_method("gated", adapter, MethodContext())
    assert len(method.prefixes) == 5  # the bare prompt and 4 generated prefixes
    result = method.edit(request)
    assert result.success and result.prediction == "Tehran" and result.delta.meta["layer"] == -1, result.prediction
    # The same vector fitted over the prefixed contexts as well (MEMIT's: every wording behind every prefix,
    # the MSE stop) does not make the question answer Tehran.
    emb = method.embedding_module()
    patterns = subject_patterns(adapter, request, method.prefixes)
    memit_contexts = dataclasses.replace(method.options, prefixed_paraphrases=True, v_token_prob=0.0)
    z, init, _ = compute_target(adapter, request, emb, method.prefixes, memit_contexts, fire_at=lambda ids: find(ids, patterns))
    with gated(adapter.model, {emb: GateSet.of((z - init)[None].float(), [(p, 0) for p in patterns])}):
        assert adapter.predict([request.prompt]) != ["Tehran"]


def test_a_vector_that_does_not_take_at_its_layer_is_tried_again_at_mid_depth(llama4, tiny_llama):
    """retry_depth (0.5): a vector that leaves the question or most paraphrases answering otherwise is optimised
    again at that fraction of the depth (SmolLM2's table claims: layer 14 after 8); every attempt is in the delta's
    meta (and the audit row). One target-vector step cannot flip anything: both attempts fail, both are recorded."""
    adapter = copy.deepcopy(llama4[0])
    request = EditRequest("What is the capital of Nigeria?", "Nairobi", subject="Nigeria",
                          paraphrases=("Which city is the capital of Nigeria?",))
    method = make_method("gated", adapter, MethodContext(), prefixes=0, retry_embeddings=False, v_steps=1)
    assert (method.layer, method.retry_layer) == (1, 2)
    result = method.edit(request)
    attempts = result.delta.meta["attempts"]
    assert [a["layer"] for a in attempts] == [1, 2] and not any(a["took"] for a in attempts), attempts
    assert not result.success and result.delta.meta["layer"] == 1  # neither took: the first is returned
    once = make_method("gated", adapter, MethodContext(), prefixes=0, retry_embeddings=False, v_steps=1, retry_depth=None)
    assert once.retry_layer is None and "attempts" not in once.edit(request).delta.meta
    assert make_method("gated", copy.deepcopy(tiny_llama), MethodContext(), prefixes=0).retry_layer is None  # 2 layers: no other
    with pytest.raises(BadInput, match="option retry_depth of method gated must be between 0 and 1"):
        make_method("gated", adapter, MethodContext(), retry_depth=1.5)


def test_a_subject_split_across_decoding_steps_gets_its_vector_as_under_teacher_forcing(tiny_llama):
    """A cached decoding step matches its token with the tokens before it: a subject the model writes in its
    own answer (SmolLM2 writes "Dublin" at an answer's start as three tokens) fires the gate as a full forward does."""
    adapter = copy.deepcopy(tiny_llama)
    model = adapter.model
    emb = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    ids = torch.tensor([adapter._prompt_ids("What is the capital of India?", True)])
    pattern = ids[0, -3:-1].tolist()  # two tokens: the first ends the cached prefix, the second is the step
    vec = 5 * torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids[:, :-1]).logits[0, -1]
        with gated(model, {emb: GateSet.of(vec, [(pattern, 0)])}):
            full = model(input_ids=ids[:, :-1]).logits[0, -1]
            cached = model(input_ids=ids[:, :-2], use_cache=True)
            stepped = model(input_ids=ids[:, -2:-1], past_key_values=cached.past_key_values, use_cache=True).logits[0, -1]
            fresh = model(input_ids=ids[:, -2:-1]).logits[0, -1]  # a new call, no cache: the pattern is not there
    assert not torch.allclose(full, plain, atol=1e-4)  # the gate fires at the pattern's last token
    assert torch.allclose(stepped, full, atol=1e-5), (stepped - full).abs().max()
    with torch.no_grad():
        assert torch.allclose(fresh, model(input_ids=ids[:, -2:-1]).logits[0, -1])  # gate gone: the same model
