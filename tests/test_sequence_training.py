"""KnowledgeEditor trained on sequences of its own edits (editor train --sequence): the mechanics, and what it buys."""

from __future__ import annotations

import json

import torch

from editor.data import from_facts
from editor.hypernet import HyperConfig
from editor.train import TrainConfig, Trainer, validate_sequence

SMALL = HyperConfig(lstm_hidden=64, ffn_hidden=128, cond_dim=128, head_hidden=128)


def test_streams_stack_their_edits_and_start_over_after_the_sequence(tiny_llama, facts, tmp_path):
    records = from_facts(facts)[:12]
    t = Trainer(tiny_llama, records, tmp_path, TrainConfig(steps=0, batch=2, sequence=3, lookback=2), SMALL)
    first = t.train_step()
    assert first["lookback"] == 0.0  # nothing earlier in a fresh stream
    assert all(len(s.history) == 1 and s.applied for s in t.streams)
    after_one = {n: v.clone() for n, v in t.streams[0].applied.items()}
    second = t.train_step()
    assert second["lookback"] > 0  # the first edit's loss, re-scored at the weights the second leaves
    assert all(len(s.history) == 2 for s in t.streams)
    # The stream's applied update is the sum of both edits' updates, not the latest alone.
    assert any(not torch.equal(after_one[n], v) for n, v in t.streams[0].applied.items())
    t.train_step()  # the third edit ends the sequence: the stream starts again on the unedited model
    assert all(not s.history and not s.applied for s in t.streams)
    base = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    stacked = validate_sequence(t.net, tiny_llama, records[:4])
    assert set(stacked) == {"kept", "final_kl"} and stacked["final_kl"] >= 0
    assert all(torch.equal(p, base[n]) for n, p in tiny_llama.model.named_parameters())  # scored functionally


def test_max_seconds_stops_with_a_checkpoint_and_the_log_has_stacking_metrics(tiny_llama, facts, tmp_path):
    records = from_facts(facts)[:12]
    cfg = TrainConfig(steps=10_000, batch=2, sequence=2, eval_every=1, eval_sequence=3, checkpoint_every=10_000,
                      max_seconds=1e-9)
    Trainer(tiny_llama, records, tmp_path, cfg, SMALL).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and {"val_kept", "val_final_kl", "lookback"} <= set(rows[0])
    assert json.loads((tmp_path / "trainer.json").read_text())["step"] == 1 and (tmp_path / "editor.safetensors").exists()


def test_preserve_projects_every_update_the_editor_is_trained_on(tiny_llama, facts, tmp_path):
    records = from_facts(facts)[:12]
    t = Trainer(tiny_llama, records, tmp_path, TrainConfig(steps=0, batch=2, sequence=3, preserve=True, preserve_tokens=2000), SMALL)
    t.train_step()
    # The applied update of each stream lies in the projectors' null space: projecting it again changes nothing,
    # and it is orthogonal to what the preserved keys span (dW (I - P) = 0 for [out, in] weights).
    for s in t.streams:
        again = t.project(s.applied)
        assert all(torch.allclose(again[n], v, atol=1e-6) for n, v in s.applied.items())
    projectors = t.project.__self__.projectors
    assert projectors and set(projectors) <= set(t.streams[0].applied)
    name, p = next(iter(projectors.items()))
    assert float(torch.trace(p)) < p.shape[0]  # something is preserved: the projector is not the identity
