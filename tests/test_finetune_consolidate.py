"""Fine-tuning edits consolidated by retraining (ft-layer's consolidate = "retrain", editor/finetune_batch.py).

Stacked one at a time, fine-tuning edits push earlier ones back (each stops at its flip on the
model the others left). Retrained from the base weights on every fact at once, with the known
facts held by a KL term, the one delta answers them all and leaves the other facts' answers.
"""

from __future__ import annotations

import pytest
import torch

from editor.delta import Delta
from editor.evaluate import EditRecord, run_sequential, sequential_baseline
from editor.methods import make_method
from kbsync.errors import BadInput


def test_retraining_holds_the_facts_a_fine_tuning_stack_pushed_back(llama4, tmp_path):
    from kbsync.facts import render

    adapter, facts = llama4
    capitals = [f for f in facts if f.property == "P36"]
    edited = capitals[:12]
    others = [f for f in facts if f not in edited]
    retain = [(render(f).question, f.object.label) for f in others]
    records = [EditRecord(render(f).question, capitals[(i + 7) % len(capitals)].object.label, f.object.label,
                          list(render(f).paraphrases), retain, subject=f.subject.label) for i, f in enumerate(edited)]
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    base = sequential_baseline(adapter, records)
    stacked = run_sequential(adapter, make_method("ft-layer", adapter), base, state_dir=tmp_path / "run")
    deltas = [Delta.load(tmp_path / "run" / f"{i:05d}.safetensors") for i in range(len(records))]
    assert all(torch.equal(v, before[k]) for k, v in adapter.model.state_dict().items())  # base weights again

    method = make_method("ft-layer", adapter, consolidate="retrain")
    joint = method.consolidate(deltas)
    assert all(torch.equal(v, before[k]) for k, v in adapter.model.state_dict().items())  # proposed, not applied
    assert joint.meta["retrained"] == 12 and joint.meta["fitted"], joint.meta
    others_before = adapter.predict([q for q, _ in retain])
    joint.apply(adapter.model)
    try:
        answers = adapter.predict([r.prompt for r in records])
        others_after = adapter.predict([q for q, _ in retain])
    finally:
        joint.remove(adapter.model)
    kept = sum(a == r.target for a, r in zip(answers, records)) / len(records)
    unchanged = sum(a == b for a, b in zip(others_before, others_after)) / len(retain)
    assert kept >= 0.9 and kept >= stacked["kept_em"] + 0.3, (kept, stacked["kept_em"])
    assert unchanged >= 0.95, unchanged
    # The default serves exactly what the stack served: the sum.
    summed = make_method("ft-layer", adapter).consolidate(deltas)
    assert "retrained" not in summed.meta and set(summed.tensors) == set(deltas[0].tensors)


def test_retraining_refuses_bad_options_and_deltas_without_their_request(llama4):
    adapter, _ = llama4
    with pytest.raises(BadInput, match="option consolidate must be 'sum' or 'retrain', not 'average'"):
        make_method("ft-layer", adapter, consolidate="average")
    bare = Delta({n: torch.zeros_like(p) for n, p in list(adapter.editable().items())[:1]}, {"method": "ft-layer"})
    with pytest.raises(BadInput, match="without its request cannot be retrained"):
        make_method("ft-layer", adapter, consolidate="retrain").consolidate([bare])
    # The known facts held: none when asked for none, else completions or questions as the edits are.
    from editor.finetune_batch import _known

    assert _known(adapter, 0, 0, set(), True) == []
    completions = _known(adapter, 5, 0, set(), False)
    assert len(completions) == 5 and all(not q and not p.endswith("?") for p, _, q in completions), completions
