"""The retain cache never trusts a damaged file, and a non-finite KL is a failure, never "unchanged" (tiny Llama)."""

from __future__ import annotations

import copy
import json
import logging
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from editor.delta import Delta
from kbsync.config import RegressionConfig
from kbsync.corpus import default_fact_table
from kbsync.retain import BaseCache, BaseItem, RetainItem, base_side, measure, sample_retain
from tests.test_store import file_size_limit


@pytest.fixture
def adapter(tiny_llama):
    return copy.deepcopy(tiny_llama)


@pytest.fixture
def items() -> list[RetainItem]:
    return [*sample_retain(default_fact_table(), [], 16, 0), RetainItem("The capital of France is", False, "raw")]


def small_delta(adapter, scale: float = 0.05) -> Delta:
    g = torch.Generator().manual_seed(0)
    return Delta({n: scale * p.detach().abs().mean() * torch.randn(p.shape, generator=g)
                  for n, p in adapter.editable().items()})


def cache_file(directory: Path) -> Path:
    [path] = directory.glob("*.safetensors")
    return path


def flip_data_byte(path: Path) -> None:
    """Flip bits in the high byte of the first state float: a bit error in the tensor data, header intact."""
    raw = bytearray(path.read_bytes())
    header = struct.unpack("<Q", raw[:8])[0]
    start = json.loads(raw[8:8 + header])["s0"]["data_offsets"][0]
    raw[8 + header + start + 3] ^= 0x7F
    path.write_bytes(bytes(raw))


def assert_same_report(got, want) -> None:
    assert [c.before for c in got.checks] == [c.before for c in want.checks]
    assert [c.unchanged for c in got.checks] == [c.unchanged for c in want.checks]
    assert [c.kl for c in got.checks] == pytest.approx([c.kl for c in want.checks], rel=1e-4, abs=1e-7)
    assert got.summary() == pytest.approx(want.summary(), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("damage", ["flipped data byte", "truncated", "no checksum"])
def test_a_damaged_cache_file_is_discarded_and_recomputed(adapter, items, tmp_path, caplog, damage):
    delta = small_delta(adapter)
    fresh = measure(adapter, items, base_side(adapter, items), delta)
    assert 0 < fresh.mean_kl < math.inf

    BaseCache(tmp_path / "rc").get(adapter, items)
    path = cache_file(tmp_path / "rc")
    if damage == "flipped data byte":
        flip_data_byte(path)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:  # the file as kbsync wrote it before it kept a checksum
        with safe_open(str(path), "pt") as f:
            meta = {"items": f.metadata()["items"]}
        save_file(load_file(str(path)), str(path), metadata=meta)

    reader = BaseCache(tmp_path / "rc")  # a new process
    with caplog.at_level(logging.WARNING, logger="kbsync.retain"):
        base = reader.get(adapter, items)
    assert (reader.hits, reader.misses) == (0, len(items))  # nothing of the damaged file was used
    assert any(str(path) in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)
    assert_same_report(measure(adapter, items, base, delta), fresh)

    again = BaseCache(tmp_path / "rc")  # the rebuilt file is whole again
    assert_same_report(measure(adapter, items, again.get(adapter, items), delta), fresh)
    assert (again.hits, again.misses) == (len(items), 0)


def test_a_cache_file_that_cannot_be_written_is_a_warning_and_the_values_are_used(adapter, items, tmp_path, caplog):
    want = base_side(adapter, items)
    cache = BaseCache(tmp_path / "rc")
    with caplog.at_level(logging.WARNING, logger="kbsync.retain"), file_size_limit(4096):
        got = cache.get(adapter, items)  # as on a full disk (~25 KB to write)
    assert [b.answer for b in got] == [b.answer for b in want]
    assert all(torch.equal(g.states, w.states) and torch.equal(g.labels, w.labels) for g, w in zip(got, want))
    [warning] = [r.getMessage() for r in caplog.records]
    assert "cannot write retain cache file" in warning and "File too large" in warning and "\n" not in warning
    assert list((tmp_path / "rc").iterdir()) == []  # no partial file left taking what room there is
    assert cache.get(adapter, items) and (cache.hits, cache.misses) == (len(items), len(items))  # kept in memory
    BaseCache(tmp_path / "rc").get(adapter, items)  # with room again, the file is written
    assert cache_file(tmp_path / "rc").is_file()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_delta_fails_every_limit(adapter, items, bad):
    delta = small_delta(adapter)
    name = next(iter(delta.tensors))
    delta.tensors[name][0, 0] = bad
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}

    report = measure(adapter, items, base_side(adapter, items), delta)
    m = report.summary()
    assert m["mean_kl"] == math.inf and m["max_kl"] == math.inf and m["unchanged"] == 0.0
    assert m["finite"] is False and all(not c.unchanged for c in report.checks)
    reg = RegressionConfig()  # the pipeline rejects when a metric is over (or under) these
    assert m["mean_kl"] > reg.max_mean_kl and m["max_kl"] > reg.max_kl and m["unchanged"] < reg.min_unchanged
    # The model was not touched (the delta is judged without being applied).
    assert all(torch.equal(p, before[n]) for n, p in adapter.model.named_parameters())


def test_a_nan_kl_counts_as_changed_with_kl_inf_not_zero(adapter, items):
    """A NaN in the base side (what the corrupt cache once served) must not read as max(0.0, nan) == 0."""
    delta = small_delta(adapter)
    base = base_side(adapter, items)
    states = base[0].states.clone()
    states[0, 0] = math.nan
    base[0] = BaseItem(base[0].answer, states, base[0].labels)

    report = measure(adapter, items, base, delta)
    first, rest = report.checks[0], report.checks[1:]
    assert first.kl == math.inf and not first.unchanged
    assert all(math.isfinite(c.kl) for c in rest)
    m = report.summary()
    assert m["mean_kl"] == math.inf and m["max_kl"] == math.inf and m["finite"] is False


def test_a_gated_delta_is_scored_only_where_it_fires_with_the_full_checks_result(adapter, items):
    """Items that do not name the gated subject are the live model bit for bit: measure skips them and
    gives the report a full pass gives (a zero weight delta beside the gates forces the full pass)."""
    from adapters.gates import GateSet

    emb = next(n for n, m in adapter.model.named_modules() if m is adapter.model.get_input_embeddings())
    pattern = adapter.tokenizer(" Nigeria", add_special_tokens=False)["input_ids"]
    vector = 5 * torch.randn(1, adapter.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    gates = {emb: GateSet.of(vector, [(pattern, 0)])}
    named = [RetainItem("What is the capital of Nigeria?", True, "capital"),
             RetainItem("What is the currency of Nigeria?", True, "currency")]
    checked = [*items, *named]
    base = base_side(adapter, checked)
    fast = measure(adapter, checked, base, Delta({}, gates=gates))
    name, weight = next(iter(adapter.editable().items()))
    full = measure(adapter, checked, base, Delta({name: torch.zeros_like(weight)}, gates=gates))
    assert_same_report(fast, full)
    assert [c.kl for c in fast.checks[:len(items)]] == [0.0] * len(items)
    assert all(c.kl > 0.01 for c in fast.checks[len(items):]), [c.kl for c in fast.checks]


def test_an_applied_edits_answer_is_judged_at_every_token_whatever_the_tie_margin(adapter, items):
    """The tie margin skips near-ties of ordinary retain items; an applied edit's answer (origin edit:ID) is
    judged at every token, so a delta that flips it is a change even where the margin would hide it."""
    base = base_side(adapter, items)
    for scale in (0.05, 0.1, 0.2, 0.5, 1.0):
        delta = small_delta(adapter, scale)
        strict = measure(adapter, items, base, delta, tie_margin=0.0)
        if strict.unchanged < 1.0:
            break
    assert strict.unchanged < 1.0, "no scale of the random delta flipped a retain answer"
    # A margin no token clears: ordinary items are never judged changed...
    assert measure(adapter, items, base, delta, tie_margin=1.01).unchanged == 1.0
    # ...but the same prompts as applied edits' answers are judged exactly as with no margin.
    as_edits = [RetainItem(it.prompt, it.question, f"edit:{k}") for k, it in enumerate(items, 1)]
    judged = measure(adapter, as_edits, base, delta, tie_margin=1.01)
    assert [c.unchanged for c in judged.checks] == [c.unchanged for c in strict.checks]
