"""Shrink a proposed delta to the smallest scale at which the edit still holds.

The collateral change of an edit grows with its size (retain KL roughly with the square of
the scale), and a method's delta usually overshoots what flipping the answer needs:
KnowledgeEditor's sigma(eta) is trained for one-shot success on average, +loop adds whole
applications, fine-tuning takes whole optimiser steps. On SmolLM2 the Namibia edit's
KnowledgeEditor delta at half scale still flips the question and the same paraphrases, with
mean retain KL 0.0066 instead of 0.037 and 96% of retain answers unchanged instead of 88%.

Only the edit's own prompts (the question and its paraphrases) decide the scale, never the
regression check's retain set, so that check stays an independent judge of the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from editor.delta import Delta
from editor.methods import EditMethod, EditRequest, EditResult
from kbsync.match import match


def holding(adapter: Any, request: EditRequest, delta: Delta) -> frozenset[int]:
    """Which of the request's prompts (0: the prompt, then its paraphrases) answer the target with delta applied."""
    return frozenset(i for _, i in holding_all(adapter, [request], delta))


def holding_all(adapter: Any, requests: list[EditRequest], delta: Delta) -> frozenset[tuple[int, int]]:
    """(request, prompt) pairs that answer their target with delta applied (prompt 0: the request's prompt)."""
    delta.apply(adapter.model)
    try:
        out = set()
        for r, request in enumerate(requests):
            preds = adapter.predict([request.prompt, *request.paraphrases], question=request.question)
            out |= {(r, i) for i, p in enumerate(preds) if match(p, request.target, request.aliases, request.claim_prefix).ok}
    finally:
        delta.remove(adapter.model)
    return frozenset(out)


def smallest_scale(holds: Callable[[float], bool], tolerance: float) -> tuple[float, float, int]:
    """Bisect (0, 1] for the smallest scale at which holds() is true, given it is at 1: (hi, lo, probes).

    hi was checked to hold (or is 1), lo checked not to (or is 0), hi - lo <= tolerance.
    """
    lo, hi, probes = 0.0, 1.0, 0
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        probes += 1
        if holds(mid):
            hi = mid
        else:
            lo = mid
    return hi, lo, probes


def shrink(adapter: Any, request: EditRequest, result: EditResult, tolerance: float = 0.05) -> EditResult:
    """Bisect the factor in (0, 1] for the smallest scaled delta keeping every prompt the full delta flipped.

    The returned scale is always one that was checked to hold (the bracket's upper end, info
    "scale"; "scale_below" is the lower end, checked not to, or 0), so a result that held at
    full scale still holds; one whose prompt did not flip is returned unchanged.
    """
    start = EditMethod.clock()
    want = holding(adapter, request, result.delta)
    if 0 not in want:
        return result
    hi, lo, probes = smallest_scale(lambda s: holding(adapter, request, result.delta.scaled(s)) >= want, tolerance)
    delta = result.delta.scaled(hi) if hi < 1.0 else result.delta
    delta.meta["scale"] = hi  # in the delta file too: a joint re-solve writes each fact at the size it was applied
    took = EditMethod.clock() - start
    return replace(result, delta=delta, seconds=result.seconds + took,
                   info={**result.info, "scale": hi, "scale_below": lo, "shrink_probes": probes + 1,
                         "shrink_seconds": took})


def shrink_joint(adapter: Any, requests: list[EditRequest], delta: Delta, tolerance: float = 0.05) -> tuple[Delta, float]:
    """The joint delta at the smallest scale in (0, 1] keeping every prompt it holds at full scale; and that scale."""
    want = holding_all(adapter, requests, delta)
    if not want:
        return delta, 1.0
    hi, _, _ = smallest_scale(lambda s: holding_all(adapter, requests, delta.scaled(s)) >= want, tolerance)
    if hi >= 1.0:
        return delta, 1.0
    out = delta.scaled(hi)
    out.meta["scale"] = hi
    return out, hi
