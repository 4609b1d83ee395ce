"""The gated method: MEMIT's target vector at one layer, added only at the tokens that name the subject.

MEMIT optimises a change of the residual stream at the subject's last token that makes the model
answer the new target (compute_z), then writes it into MLP weights by least squares, where it
also fires for every subject with a similar key. Here the change itself is the edit: a gate
(adapters/gates.py) adds it to that layer's output wherever the input holds one of the subject's
token patterns. Other subjects run the base model exactly, so edits of different subjects never
interfere, whatever their number; no statistics are needed. The cost: an input that names the
subject otherwise (an alias the patterns lack, a pronoun) does not get the edit, and an export as
plain weights cannot carry it (kbsync export refuses gated edits).
"""

from __future__ import annotations

from typing import Any, ClassVar

from adapters.gates import GateSet, find, gated
from editor.delta import Delta
from editor.gated.config import GatedOptions
from editor.gated.patterns import subject_patterns
from editor.memit.compute_z import compute_target
from editor.memit.config import target_layers
from editor.memit.corpus import context_prefixes
from editor.methods import EditMethod, EditRequest, EditResult, MethodOptions, register_method
from kbsync.errors import BadInput


@register_method
class Gated(EditMethod):
    """Subject-gated target vector: exact scope, no interference between edits of different subjects."""

    name: ClassVar[str] = "gated"
    description: ClassVar[str] = "MEMIT's target vector, added only at the tokens that name the subject"
    options_cls: ClassVar[type[MethodOptions]] = GatedOptions

    def prepare(self) -> None:
        """Resolve the layer and the context prefixes (nothing to compute: no statistics)."""
        opts: Any = self.options
        self.layer = target_layers(self.adapter, self.name, () if opts.layer is None else (opts.layer,))[-1]
        if opts.position != "subject":
            raise BadInput(f"option position of method {self.name} must be 'subject' (the gate fires at the subject)")
        self.module = self.adapter.layer_module(self.layer)
        self.retry_layer: int | None = None
        if opts.retry_depth is not None:
            if not 0 < opts.retry_depth < 1:
                raise BadInput(f"option retry_depth of method {self.name} must be between 0 and 1 (a fraction of "
                               f"the depth) or none, not {opts.retry_depth}")
            at = round(opts.retry_depth * (self.adapter.num_layers() - 1))
            self.retry_layer = at if at != self.layer and at < self.adapter.num_layers() - 1 else None
        if opts.embeddings:
            self.layer, self.retry_layer = -1, None
            self.module = self.embedding_module()
        self.prefixes = [""] + context_prefixes(self.adapter, opts.prefixes, opts.prefix_tokens)
        super().prepare()

    def embedding_module(self) -> str:
        """The name of the model's input embedding module."""
        emb = self.adapter.model.get_input_embeddings()
        return next(n for n, m in self.adapter.model.named_modules() if m is emb)

    def edit(self, request: EditRequest) -> EditResult:
        """The target vector at the subject (the live model's gates firing), kept as a gate on its patterns."""
        start = self.clock()
        if not request.subject.strip():
            raise BadInput(f"method {self.name} needs the fact's subject; this request has none")
        patterns = subject_patterns(self.adapter, request, self.prefixes, self.options.lowercase)
        result = self._attempt(request, patterns, self.module, self.layer)
        tries = [(self.layer, result)]
        if not _took(result) and self.retry_layer is not None:
            retry = self._attempt(request, patterns, self.adapter.layer_module(self.retry_layer), self.retry_layer)
            tries.append((self.retry_layer, retry))
            if _took(retry):
                retry.delta.meta["retried"] = (f"layer {self.layer} did not take (answer {result.prediction!r}, "
                                               f"paraphrases {result.info['paraphrases_flipped']:.0%})")
                result = retry
        if not result.success and self.layer >= 0 and self.options.retry_embeddings:
            retry = self._attempt(request, patterns, self.embedding_module(), -1)
            tries.append((-1, retry))
            if retry.success:
                retry.delta.meta["retried"] = f"layer {self.layer} did not flip the prompt ({result.prediction!r})"
                result = retry
        if len(tries) > 1:  # every attempt, for the audit row: where the vector went and what it did there
            result.delta.meta["attempts"] = [{"layer": at, "answer": r.prediction, "took": _took(r),
                                              "paraphrases_flipped": r.info["paraphrases_flipped"]} for at, r in tries]
        result.seconds = self.clock() - start
        return result

    def _attempt(self, request: EditRequest, patterns: list[list[int]], module: str, layer: int) -> EditResult:
        """The target vector at one module's output, optimised where it will fire (every occurrence of the patterns)."""
        # At the embeddings the model is one that routes the subject in its first layer: too shallow to
        # read its own generated prefixes, which there only pull the vector off the served question.
        prefixes = [""] if layer < 0 else self.prefixes
        z, init, info = compute_target(self.adapter, request, module, prefixes, self.options,
                                       fire_at=lambda ids: find(ids, patterns))
        gates = {module: GateSet.of((z - init)[None].float(), [(p, 0) for p in patterns])}
        with gated(self.adapter.model, gates):
            ok, pred = self.flipped(request)
            info["paraphrases_flipped"] = self.paraphrases_flipped(request)
        # The exact texts the edit fires on, as the tokenizer writes them: its whole scope, for the audit.
        fires_on = sorted({self.adapter.tokenizer.decode(p) for p in patterns})
        meta = {"method": self.name, "layer": layer, "subject": request.subject, "patterns": len(patterns),
                "fires_on": fires_on, **info}
        return EditResult(Delta({}, meta, gates=gates), ok, int(info["z_steps"]), 0.0, pred, info)


def _took(result: EditResult) -> bool:
    """The prompt answers the target and so do half or more of its paraphrases (the regression check's default bar)."""
    return result.success and result.info.get("paraphrases_flipped", 1.0) >= 0.5
