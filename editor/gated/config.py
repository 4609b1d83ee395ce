"""The gated method's options: where the vector is added, and the target-vector optimisation it shares with MEMIT."""

from __future__ import annotations

from dataclasses import dataclass

from editor.memit.config import TargetOptions


@dataclass
class GatedOptions(TargetOptions):
    """One layer's output at the subject's last token; the target vector as MEMIT's (compute_z)."""

    # The layer whose output gets the vector (negative: from the end). None: the last layer of the
    # band MEMIT edits (27% of the depth: layer 8 of SmolLM2's 30), where its target vector sits.
    layer: int | None = None
    # Add the vector to the subject's token embedding (the first layer's input) instead: for models
    # that carry the subject to the answer position in their first attention layer, as the tiny test
    # models do (a vector at a later layer's subject token flips none of 50 there). There the target
    # vector is optimised on the bare prompts alone (no generated prefixes): on the tiny Llama, 24
    # capital swaps flip 23 without prefixes, 21 with them, in a fifth of the time.
    embeddings: bool = False
    # When the vector at `layer` does not make the prompt answer the target, try once more at the
    # subject's token embedding: a shallow model may carry the subject to the answer position before
    # `layer` (the 2-layer tiny Llama does, in its first attention layer), and no later vector flips it.
    retry_embeddings: bool = True
    # When the vector at `layer` leaves the question, or more than half of its paraphrases, answering
    # otherwise, try once more at this fraction of the depth (0.5: layer 14 of SmolLM2's 30); None: never.
    # A second chance before the fallback methods (alphaedit moves the neighbours): a later layer reads
    # the subject differently. Measured before gates fired across decoding steps, six table claims took
    # 0/6 at layer 8 and 3/6 at 14; since that fix all six take at layer 8 (RESULTS.md, "Gated claims").
    retry_depth: float | None = 0.5
    # Also fire on the subject written in lower case ("namibia"): people type that.
    lowercase: bool = True
    # The target vector's contexts and stop, faster than MEMIT's for the same edits: the paraphrases
    # read bare (9 contexts instead of 25) and a stop once every target token is the likeliest in every
    # context. SmolLM2, measured in one run (benchmarks/RESULTS.md, "Gated edits, faster"): 30 stacked
    # CounterFact edits keep 0.967 / paraphrases 0.933 / retain 1.0 at 14.4 s per edit, against
    # the same (0.967 / 0.933 / 1.0, the same curve at 10 and 20) at 27.1 s with MEMIT's contexts; the
    # fact table's claims (4 capital changes, chat answers) 2.3x faster, all applied, paraphrases 100%.
    prefixed_paraphrases: bool = False
    v_token_prob: float = 0.5
