"""AlphaEdit's solve with MEMIT's soft preservation (cov_weight): on the tiny Llama's real statistics,
weighting C0 into the solve lowers the expected change of preserved outputs while the edit's own
key still gets (almost all of) its residual, and earlier edits' keys stay written."""

from __future__ import annotations

import copy

import pytest
import torch

from editor.methods import make_method

FAST = {"stats_tokens": 2000, "prefixes": 0, "v_steps": 5, "layers": (0,), "nullspace_threshold": 1e9}


@pytest.fixture(scope="module")
def methods(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    hard = make_method("alphaedit", model, **FAST)
    soft = make_method("alphaedit", model, **FAST, cov_weight=15000.0)
    return hard, soft


def update(method, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    left, right = method.solve(method.modules[0], keys, resid)
    return (left.double() @ right.double())


def test_cov_weight_moves_preserved_outputs_less_and_still_writes_the_key(methods):
    hard, soft = methods
    module = hard.modules[0]
    cov = hard.cov[module].double()
    gen = torch.Generator().manual_seed(0)
    # A key drawn from the preserved distribution itself (C0^1/2 z), the hard case for preservation.
    vals, vecs = torch.linalg.eigh(cov)
    root = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    key = (root @ torch.randn(cov.shape[0], 1, generator=gen, dtype=torch.float64)).T.float()
    out_dim = dict(hard.adapter.model.named_parameters())[hard.params[module]].shape[0]
    resid = torch.randn(1, out_dim, generator=gen)
    dw_hard, dw_soft = update(hard, key, resid), update(soft, key, resid)
    # E||dW k'||^2 over preserved keys k' = tr(dW C0 dW^T).
    leak = lambda dw: float(torch.trace(dw @ cov @ dw.T))  # noqa: E731
    written = lambda dw: float((dw @ key.double().T).squeeze() @ resid.double().squeeze()) / float(resid.norm()) ** 2  # noqa: E731
    # Without C0 the key gets its whole residual; with it, part of it (MEMIT leaves the rest to later
    # layers), and each unit written moves the preserved outputs less.
    assert written(dw_hard) > 0.9 and 0 < written(dw_soft) < written(dw_hard), (written(dw_soft), written(dw_hard))
    assert leak(dw_soft) / written(dw_soft) ** 2 < 0.5 * leak(dw_hard) / written(dw_hard) ** 2


def test_applied_keys_are_kept_by_a_later_update(methods):
    from editor.delta import Delta
    from editor.memit.method import KEYS

    hard, _ = methods
    module = hard.modules[0]
    name = hard.params[module]
    gen = torch.Generator().manual_seed(1)
    d_in = hard.cov[module].shape[0]
    scale = hard.cov[module].diagonal().mean().sqrt()
    earlier, later = (torch.randn(1, d_in, generator=gen) * scale for _ in range(2))
    out_dim = dict(hard.adapter.model.named_parameters())[name].shape[0]
    resid = torch.randn(1, out_dim, generator=gen)
    free = update(hard, later, resid)
    # As the served model tells it of an applied edit: the keys come from the delta's extras.
    hard.on_applied(1, Delta({}, {}, extras={KEYS + name: earlier}))
    try:
        kept = update(hard, later, resid)
    finally:
        hard.on_reset()
    moved = lambda dw: float((dw @ earlier.double().T).norm())  # noqa: E731
    assert moved(kept) < 0.2 * moved(free), (moved(kept), moved(free))
    assert torch.equal(update(hard, later, resid), free)  # the reset took the key out again
