"""MEMIT's options: the target-vector optimisation (shared with the gated method), the edited layers and the statistics' weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from editor.methods import MethodOptions
from kbsync.errors import BadInput


@dataclass
class TargetOptions(MethodOptions):
    """The target vector's settings (compute_z), shared by MEMIT's family and the subject-gated method."""

    # Where the fact is read and written: "subject", the subject's last token (ROME/MEMIT: real LMs
    # recall a subject's attributes there), or "last", the prompt's last token (models that route
    # the subject to the answer position in their first layer, like the tiny test models).
    position: str = "subject"
    # Target vector at the last edited layer: Adam steps and rate, weight decay relative to the
    # hidden state's norm, the largest norm of the change (times the hidden state's norm), the KL
    # weight that keeps "{subject} is a" from drifting, and the loss at which to stop early.
    v_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm: float = 4.0
    kl_factor: float = 0.0625
    v_loss_stop: float = 0.05
    # Also stop once every target token has at least this probability in every context (0: off).
    v_token_prob: float = 0.0
    # Contexts: the bare prompt plus this many short generated prefixes (MEMIT's context templates).
    prefixes: int = 4
    prefix_tokens: int = 8
    # Also optimise the target vector (and average the keys) over the request's paraphrases: the
    # update then answers how people ask, not one wording.
    paraphrases: bool = True
    # Read the paraphrases behind every prefix too (else bare only: 9 contexts instead of 25 with 4
    # prefixes and 4 paraphrases, the prefixes still vary the prompt's context).
    prefixed_paraphrases: bool = True
    # Weight of the KL that keeps the answers to the request's `keep` prompts (the subject's other
    # facts) where they were, with the changed vector at the subject there too (0: off).
    keep_weight: float = 1.0
    # ... and optimise on past the stop while that KL (nats per answer token) is above this.
    keep_stop: float = 0.01


@dataclass
class MemitOptions(TargetOptions):
    """Locate-and-edit settings; every default is scale-free so that it transfers between models."""

    # MLP output matrices written (negative: from the end). Empty: the band at 13-27% of the depth
    # where MEMIT and AlphaEdit edit GPT-J and Llama-3 (layers 4-8 of SmolLM2's 30).
    layers: tuple[int, ...] = ()
    # MEMIT's preservation weight: the solve is (K K^T + mom2_weight * C0)^-1 with C0 = E[k k^T]
    # over the statistics corpus (one corpus token's worth is 1).
    mom2_weight: float = 15000.0
    # The statistics corpus: token positions of known facts (served format) and generated text.
    stats_tokens: int = 60000
    # Compute missing statistics on first use (else a missing file is an error).
    compute_stats: bool = True


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The early-middle band (13-27% of the depth) MEMIT/AlphaEdit edit; at least one layer, never the last."""
    lo = min(round(0.13 * num_layers), max(0, num_layers - 2))
    hi = max(lo, min(num_layers - 2, round(0.27 * num_layers)))
    return tuple(range(lo, hi + 1))


def target_layers(adapter: Any, method: str, layers: tuple[int, ...]) -> list[int]:
    """The resolved layers (default: the band above) of a method that writes a target vector, checked.

    One-line errors: the model is not a causal LM, a layer is outside it, or the last layer (where
    the target vector sits, at the subject's token) leaves no later layer to carry it to the answer.
    """
    if not hasattr(adapter, "subject_positions") or adapter.family != "causal-lm":
        raise BadInput(f"{method} edits causal LMs; this model is a {adapter.family}")
    n = adapter.num_layers()
    out = sorted({adapter.resolve_layer(i) for i in (layers or default_layers(n))})
    if out[-1] >= n - 1:
        raise BadInput(f"{method}: the last edited layer ({out[-1]}) must leave at least one layer after it "
                       f"(the model has {n})")
    return out
