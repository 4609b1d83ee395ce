"""Factored (left @ right) deltas and their extras: exact apply/remove, the file format, arithmetic, serving."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from editor.delta import Delta, DeltaError, materialise
from kbsync.served import ServedModel

DOWN = "model.layers.{}.mlp.down_proj.weight"


def factors_for(model: torch.nn.Module, rank: int = 2, seed: int = 0, layers=(0, 1)) -> dict:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = {}
    for i in layers:
        rows, cols = params[DOWN.format(i)].shape
        out[DOWN.format(i)] = (torch.randn(rows, rank, generator=g) * 1e-2, torch.randn(rank, cols, generator=g) * 1e-2)
    return out


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_materialise_is_the_product_and_does_not_depend_on_threads():
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(128, 5, generator=g), torch.randn(5, 256, generator=g)
    one = materialise(left, right)
    assert one.dtype == torch.float32 and torch.allclose(one, left @ right, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(materialise(left, right), one)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(materialise(left.double(), right.double()), one)  # float32 whatever the factors' dtype


def test_factored_apply_remove_is_bit_exact(tiny_llama):
    model = tiny_llama.model
    before = snapshot(model)
    bias_free = "model.layers.0.mlp.up_proj.weight"
    delta = Delta({bias_free: torch.randn_like(before[bias_free]) * 1e-3}, {"why": "test"},
                  factors=factors_for(model), extras={"keys/x": torch.randn(3, 256)})
    assert set(delta.tensors) == {bias_free, DOWN.format(0), DOWN.format(1)}
    assert delta.tensors is delta.tensors  # materialised once
    delta.apply(model)
    try:
        assert delta.applied
        changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
        assert changed == sorted(delta.tensors)
        for n in changed:  # exactly the in-place add of the materialised update
            assert torch.equal(dict(model.named_parameters())[n], before[n] + delta.tensors[n])
    finally:
        delta.remove(model)
    assert not delta.applied and same_weights(model, before)


def test_save_load_round_trip_preserves_factors_extras_meta_and_weights(tiny_llama, tmp_path):
    model = tiny_llama.model
    before = snapshot(model)
    dense_name = "model.layers.1.mlp.up_proj.weight"
    keys = torch.randn(6, 256)
    delta = Delta({dense_name: torch.randn_like(before[dense_name]) * 1e-3}, {"method": "test", "n": 3},
                  factors=factors_for(model, rank=3),
                  extras={"keys/" + DOWN.format(0): keys[:3], "keys/" + DOWN.format(1): keys[3:], "a::b": keys})
    sha = delta.save(tmp_path / "d.safetensors")
    loaded = Delta.load(tmp_path / "d.safetensors", sha)
    assert loaded.meta == delta.meta and sorted(loaded.factors) == sorted(delta.factors)
    assert all(torch.equal(loaded.factors[n][i], delta.factors[n][i]) for n in delta.factors for i in (0, 1))
    assert loaded.extras.keys() == delta.extras.keys()
    assert all(torch.equal(loaded.extras[k], t) for k, t in delta.extras.items())
    assert loaded.tensors.keys() == delta.tensors.keys()
    assert all(torch.equal(loaded.tensors[n], t) for n, t in delta.tensors.items())

    delta.apply(model)
    after = snapshot(model)
    delta.remove(model)
    loaded.apply(model)
    try:
        assert same_weights(model, after)
    finally:
        loaded.remove(model)
    assert same_weights(model, before)


def test_another_process_materialises_the_same_bits(tmp_path):
    g = torch.Generator().manual_seed(2)
    delta = Delta(factors={"w": (torch.randn(128, 4, generator=g), torch.randn(4, 256, generator=g))})
    sha = delta.save(tmp_path / "d.safetensors")
    code = ("import sys, torch; from editor.delta import Delta; torch.set_num_threads(2);"
            "d = Delta.load(sys.argv[1], sys.argv[2]); print(d.tensors['w'].numpy().tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d.safetensors"), sha],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == delta.tensors["w"].numpy().tobytes().hex()


def test_rank_one_factors_are_stored_in_far_fewer_bytes(tmp_path):
    g = torch.Generator().manual_seed(3)
    left, right = torch.randn(128, 1, generator=g), torch.randn(1, 256, generator=g)
    factored = Delta(factors={"w": (left, right)})
    dense = Delta({"w": factored.tensors["w"]})
    factored.save(tmp_path / "f.safetensors")
    dense.save(tmp_path / "d.safetensors")
    f_size, d_size = (tmp_path / "f.safetensors").stat().st_size, (tmp_path / "d.safetensors").stat().st_size
    assert f_size * 20 < d_size
    assert factored.nbytes() == (128 + 256) * 4 and dense.nbytes() == 128 * 256 * 4


def test_a_dense_file_written_before_factors_still_loads(tmp_path):
    # What Delta.save wrote before factors existed: plain parameter names, meta under "kbsync".
    t = torch.randn(6, 4)
    save_file({"mlp.weight": t}, str(tmp_path / "old.safetensors"), metadata={"kbsync": json.dumps({"seed": 1})})
    loaded = Delta.load(tmp_path / "old.safetensors")
    assert loaded.meta == {"seed": 1} and not loaded.factors and not loaded.extras
    assert list(loaded.tensors) == ["mlp.weight"] and torch.equal(loaded.tensors["mlp.weight"], t)


@pytest.mark.parametrize("tensors", [
    {"factor.left::w": torch.ones(4, 2)},
    {"factor.right::w": torch.ones(2, 3)},
    {"factor.left::w": torch.ones(4, 2), "factor.right::w": torch.ones(3, 3)},
    {"factor.left::w": torch.ones(4), "factor.right::w": torch.ones(1, 3)},
    {"w": torch.ones(4, 3), "factor.left::w": torch.ones(4, 1), "factor.right::w": torch.ones(1, 3)},
    {"factor.middle::w": torch.ones(2, 2)},
])
def test_inconsistent_factor_files_are_corrupt_in_one_line(tmp_path, tensors):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"kbsync": "{}"})
    with pytest.raises(DeltaError) as e:
        Delta.load(path)
    assert str(e.value).startswith(f"delta file {path} is corrupt: ") and "\n" not in str(e.value)


def test_constructor_rejects_a_name_both_dense_and_factored_and_factors_that_do_not_multiply():
    with pytest.raises(DeltaError, match="both"):
        Delta({"w": torch.ones(4, 3)}, factors={"w": (torch.ones(4, 1), torch.ones(1, 3))})
    with pytest.raises(DeltaError, match="do not multiply"):
        Delta(factors={"w": (torch.ones(4, 2), torch.ones(1, 3))})


@pytest.mark.parametrize("where", ["left", "right", "extra", "overflow"])
def test_non_finite_delta_refuses_to_apply_and_leaves_weights_untouched(tiny_llama, where):
    model = tiny_llama.model
    before = snapshot(model)
    factors = factors_for(model, rank=2)
    left, right = factors[DOWN.format(1)]
    if where == "left":
        left[3, 1] = float("nan")
    elif where == "right":
        right[0, 5] = float("inf")
    elif where == "overflow":  # finite factors whose product is not
        factors[DOWN.format(1)] = (left * 1e30, right * 1e30)
    extras = {"keys/k": torch.tensor([[float("nan")]])} if where == "extra" else {}
    delta = Delta(factors=factors, extras=extras)
    name = "extra keys/k" if where == "extra" else DOWN.format(1)
    with pytest.raises(DeltaError, match=name):
        delta.check_finite()
    with pytest.raises(DeltaError, match=name):
        delta.apply(model)
    assert not delta.applied and same_weights(model, before)
    served = ServedModel(tiny_llama)
    with pytest.raises(DeltaError, match=f"edit 1: .*{name}"):
        served.push(delta, 1)
    assert served.edit_ids == [] and not served.pushed and same_weights(model, before)


def test_factors_that_do_not_fit_the_model_change_nothing(tiny_llama):
    model = tiny_llama.model
    before = snapshot(model)
    ok = factors_for(model, layers=(0,))
    rows, cols = before[DOWN.format(1)].shape
    delta = Delta(factors={**ok, DOWN.format(1): (torch.zeros(cols, 1), torch.zeros(1, rows))})
    with pytest.raises(DeltaError, match="shape"):
        delta.apply(model)
    with pytest.raises(DeltaError, match="does not fit"):
        ServedModel(tiny_llama).push(delta, 1)
    assert same_weights(model, before)


def test_scaled_add_and_norm_agree_with_dense_arithmetic():
    g = torch.Generator().manual_seed(4)
    fa = (torch.randn(8, 2, generator=g), torch.randn(2, 5, generator=g))
    fb = (torch.randn(8, 3, generator=g), torch.randn(3, 5, generator=g))
    d = torch.randn(8, 5, generator=g)
    a = Delta({"dense": torch.randn(3, generator=g)}, {"from": "a", "x": 1},
              factors={"w": fa, "only_a": fa}, extras={"k": torch.ones(2, 4), "a": torch.zeros(1)})
    b = Delta({"v": d}, {"from": "b"}, factors={"w": fb, "v2": fb}, extras={"k": torch.zeros(3, 4)})
    c = Delta({"w": d})

    s = a.scaled(0.5)
    assert torch.equal(s.factors["w"][0], fa[0] * 0.5) and s.factors["w"][1] is fa[1]
    assert torch.allclose(s.tensors["w"], a.tensors["w"] * 0.5)
    assert torch.equal(s.dense["dense"], a.dense["dense"] * 0.5)
    assert s.extras.keys() == a.extras.keys() and all(torch.equal(s.extras[k], t) for k, t in a.extras.items())
    assert s.meta == a.meta and s.meta is not a.meta

    ab = a + b
    assert set(ab.factors) == {"w", "only_a", "v2"} and set(ab.dense) == {"dense", "v"}
    assert ab.factors["w"][0].shape == (8, 5) and ab.factors["w"][1].shape == (5, 5)
    assert torch.allclose(ab.tensors["w"], a.tensors["w"] + b.tensors["w"], atol=1e-5)
    assert torch.equal(ab.factors["only_a"][0], fa[0]) and torch.equal(ab.tensors["v"], d)
    assert ab.extras["k"].shape == (5, 4) and torch.equal(ab.extras["k"][:2], torch.ones(2, 4))
    assert set(ab.extras) == {"k", "a"} and ab.meta == {"from": "b", "x": 1}

    ac = a + c  # factored + dense: a dense sum
    assert "w" in ac.dense and "w" not in ac.factors and torch.equal(ac.tensors["w"], a.tensors["w"] + d)
    with pytest.raises(DeltaError, match="shapes"):
        a + Delta(factors={"w": (torch.ones(8, 1), torch.ones(1, 4))})

    for delta in (a, b, ab, s, ac):
        dense_norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in delta.tensors.values())))
        assert delta.norm() == pytest.approx(dense_norm, rel=1e-5)


def test_served_model_pushes_factored_deltas_tells_listeners_and_resets_exactly(tiny_llama):
    model = tiny_llama.model
    before = snapshot(model)
    d1 = Delta({}, {"edit": 1}, factors=factors_for(model, seed=1), extras={"keys/a": torch.randn(1, 256)})
    up = "model.layers.1.mlp.up_proj.weight"
    d2 = Delta({up: torch.randn_like(before[up]) * 1e-3},
               {"edit": 2}, factors=factors_for(model, seed=2, layers=(1,)), extras={"keys/a": torch.randn(2, 256)})
    # The weights a process that used Delta.apply holds.
    d1.apply(model)
    d2.apply(model)
    expected = snapshot(model)
    d2.remove(model)
    d1.remove(model)

    class Recorder:
        def __init__(self) -> None:
            self.events: list = []

        def on_reset(self) -> None:
            self.events.append("reset")

        def on_applied(self, edit_id: int, delta: Delta) -> None:
            self.events.append((edit_id, delta.meta["edit"], {k: t.clone() for k, t in delta.extras.items()}))

    class OnlyApplied:
        def __init__(self) -> None:
            self.ids: list[int] = []

        def on_applied(self, edit_id: int, delta: Delta) -> None:
            self.ids.append(edit_id)

    served = ServedModel(tiny_llama)
    from kbsync.served import model_fingerprint
    assert served.base_fingerprint == model_fingerprint(tiny_llama.model)
    early, partial = Recorder(), OnlyApplied()
    served.add_listener(early)
    served.add_listener(partial)
    assert early.events == ["reset"]
    try:
        served.push(d1, 11)
        served.push(d2, 12)
        assert same_weights(model, expected) and served.edit_ids == [11, 12]
        assert served.base_fingerprint != tiny_llama.fingerprint()  # still the base weights' one
        assert all(not r.tensors and not r.factors for r in served.pushed.values())
        assert [r.meta for r in served.pushed.values()] == [{"edit": 1}, {"edit": 2}]
        assert torch.equal(served.pushed[12].extras["keys/a"], d2.extras["keys/a"])
        assert early.events[1][:2] == (11, 1) and early.events[2][:2] == (12, 2)
        assert torch.equal(early.events[2][2]["keys/a"], d2.extras["keys/a"]) and partial.ids == [11, 12]

        late = Recorder()  # a component created after the edits: replayed in order
        served.add_listener(late)
        assert [e if e == "reset" else e[:2] for e in late.events] == ["reset", (11, 1), (12, 2)]
        assert torch.equal(late.events[1][2]["keys/a"], d1.extras["keys/a"])
    finally:
        served.reset()
    assert same_weights(model, before) and served.edit_ids == [] and served.pushed == {}
    assert early.events[-1] == "reset" and late.events[-1] == "reset" and partial.ids == [11, 12]
