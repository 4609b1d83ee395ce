"""The adapter interface: what the editor and pipeline need from a model family."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.func import functional_call

from adapters.gates import hash_gates

Batch = dict[str, torch.Tensor]
Params = dict[str, torch.Tensor]


def row_kl(base_lp: torch.Tensor, new_lp: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """KL(base || new) per answer token ([N,V] log-probs), averaged per example (rows: its index), [n]."""
    tok = (base_lp.exp() * (base_lp - new_lp)).sum(-1)
    return torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, rows, tok) / torch.bincount(rows, minlength=n).clamp(min=1)


def parse_layer_slice(spec: str) -> slice:
    """Parse a Python slice such as "-3:" or "2:5" (a single "4" means just layer 4)."""
    spec = spec.strip() or ":"
    if ":" not in spec:
        i = int(spec)
        return slice(i, i + 1 if i != -1 else None)
    parts = [int(p) if p.strip() else None for p in spec.split(":")]
    return slice(*parts)


class Adapter(ABC):
    """Wraps one model and its tokenizer for editing, prediction and retain-set scoring."""

    family: ClassVar[str]
    # Regex finding the layer index in a parameter name; group 1 is the index.
    layer_regex: ClassVar[str]
    # Regex (fullmatch) over the rest of the name after the layer prefix: default editable matrices.
    default_modules: ClassVar[str]
    # Regex (fullmatch) over a module's name after its layer prefix: the MLP's output matrix, the
    # one locate-and-edit methods write (its input at the subject's last token is the fact's key).
    mlp_out_modules: ClassVar[str] = r"mlp\.(down_proj|c_proj|fc_out|fc2)"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        edit_layers: str = "-3:",
        edit_modules: list[str] | tuple[str, ...] = (),
        chat: bool = True,
        max_new_tokens: int = 12,
        num_beams: int = 1,
        name: str = "",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.edit_layers = edit_layers
        self.edit_modules = tuple(edit_modules)
        self.chat = chat
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__

    @classmethod
    @abstractmethod
    def accepts(cls, config: Any) -> bool:
        """Whether this adapter handles a model with this transformers config."""

    @classmethod
    @abstractmethod
    def load(cls, path: str, config: Any, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
        """Load (model, tokenizer) from a local directory, weights in dtype."""

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go (the device of its input embeddings)."""
        return self.model.get_input_embeddings().weight.device

    def to_device(self, batch: Batch) -> Batch:
        """The batch's tensors on the model's device (a no-op on the CPU)."""
        device = self.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # --- inputs and losses -------------------------------------------------------------

    @abstractmethod
    def encode(self, prompts: list[str], targets: list[str], question: bool = True) -> Batch:
        """Tensors for teacher-forced scoring of target given prompt; labels are -100 off-answer."""

    def forward(self, batch: Batch, params: Params | None = None) -> torch.Tensor:
        """Logits, optionally with some parameters replaced (functional; the model is not touched)."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "cls_labels", "hidden_in", "tail_from")}
        if params:
            return functional_call(self.model, params, args=(), kwargs=inputs, strict=False).logits
        return self.model(**inputs).logits

    def answer_logits(self, batch: Batch, params: Params | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, labels, mask) aligned on answer positions: shapes [B,T,V], [B,T], [B,T]."""
        logits = self.forward(batch, params)
        labels = batch["labels"]
        if self.shift_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        mask = labels != -100
        return logits, labels.clamp(min=0), mask

    shift_labels: ClassVar[bool] = True

    def loss(self, batch: Batch, params: Params | None = None, label_smoothing: float = 0.1) -> torch.Tensor:
        """Label-smoothed NLL of the answer tokens, averaged per example then over the batch."""
        return self.example_losses(batch, params, label_smoothing).mean()

    def example_losses(self, batch: Batch, params: Params | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
        """Per-example mean NLL over answer tokens, shape [B]."""
        logits, labels, mask = self.answer_logits(batch, params)
        tok = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
            reduction="none", label_smoothing=label_smoothing,
        ).view(labels.shape)
        return (tok * mask).sum(1) / mask.sum(1).clamp(min=1)

    def log_probs(self, batch: Batch, params: Params | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log output distributions at answer positions and their mask, for KL."""
        logits, _, mask = self.answer_logits(batch, params)
        return F.log_softmax(logits.float(), -1), mask

    def answer_states(self, batch: Batch, params: Params | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One row per answer token: (states [N,D], labels [N], rows [N] = its example index).

        answer_head(states) gives that token's output logits. Rows come in the row-major order
        of answer_logits' mask. Generic: the states are the logits themselves; adapters whose
        logits are a fixed head over a smaller hidden state return the hidden state instead,
        which skips the head everywhere but the answer tokens and is small enough to cache.
        """
        logits, labels, mask = self.answer_logits(batch, params)
        return logits[mask], labels[mask], mask.nonzero()[:, 0]

    def answer_head(self, states: torch.Tensor) -> torch.Tensor:
        """Logits [N,V] from answer_states' states (never edited: deltas only touch editable layers)."""
        return states

    @property
    def chats(self) -> bool:
        """Whether questions go through a chat template (the model then answers in sentences)."""
        return False

    def answer_style(self, style: str) -> str:
        """Resolve an answer style setting: "auto" is "claim" for chat models, else "bare"."""
        if style not in ("auto", "claim", "bare"):
            from kbsync.errors import BadInput

            raise BadInput(f"answer style must be auto, claim or bare, not {style!r}")
        return ("claim" if self.chats else "bare") if style == "auto" else style

    def with_prefix(self, batch: Batch) -> Batch:
        """The batch with whatever lets later scoring skip the layers before the editable ones.

        Only valid while the weights below the editable layers stay fixed (editor training).
        Generic: the batch unchanged, so scoring runs the whole model.
        """
        return batch

    def answer_log_probs(self, batch: Batch, params: Params | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs [N,V], labels [N], rows [N]) at answer tokens only (see answer_states)."""
        states, labels, rows = self.answer_states(batch, params)
        return F.log_softmax(self.answer_head(states).float(), -1), labels, rows

    def kl(self, batch: Batch, base_logp: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """Per-example KL(base || edited), averaged over answer tokens, shape [B]."""
        logp, mask = self.log_probs(batch, params)
        tok = (base_logp.exp() * (base_logp - logp)).sum(-1)
        return (tok * mask).sum(1) / mask.sum(1).clamp(min=1)

    def token_accuracy(self, batch: Batch, params: Params | None = None) -> torch.Tensor:
        """Per-example fraction of answer tokens that are the argmax under teacher forcing."""
        logits, labels, mask = self.answer_logits(batch, params)
        hit = (logits.argmax(-1) == labels) & mask
        return hit.sum(1).float() / mask.sum(1).clamp(min=1)

    # --- prediction --------------------------------------------------------------------

    @abstractmethod
    def predict(self, prompts: list[str], question: bool = True, num_beams: int | None = None) -> list[str]:
        """The model's answer text for each prompt (greedy, or beam search with num_beams > 1)."""

    def hypotheses(self, prompt: str, n: int, question: bool = True) -> list[str]:
        """The n best answers by beam search (generative families override this)."""
        return []

    def alternatives(self, prompt: str, k: int = 4, question: bool = True) -> list[str]:
        """Other answers the model finds likely: beam hypotheses other than its answer, de-duplicated (at most k)."""
        # The answer comes from predict(), not beam 0: greedy decoding can pick a different top answer.
        seen, out = {self.predict([prompt], question)[0].lower()}, []
        for h in self.hypotheses(prompt, k + 1, question):
            if h and h.lower() not in seen:
                seen.add(h.lower())
                out.append(h)
        return out[:k]

    # --- editable weights --------------------------------------------------------------

    def layer_of(self, name: str) -> int | None:
        """The transformer layer index a parameter belongs to, if any."""
        m = re.search(self.layer_regex, name)
        return int(m.group(1)) if m else None

    def editable(self) -> dict[str, torch.nn.Parameter]:
        """Editable weight matrices by name: chosen layers x module patterns; never biases, norms, embeddings."""
        params = dict(self.model.named_parameters())
        layers = sorted({i for n in params if (i := self.layer_of(n)) is not None})
        chosen = set(layers[parse_layer_slice(self.edit_layers)])
        patterns = [re.compile(p) for p in (self.edit_modules or (self.default_modules,))]
        out = {}
        for name, p in params.items():
            m = re.search(self.layer_regex, name)
            if not m or int(m.group(1)) not in chosen or p.dim() != 2:
                continue
            rest = name[m.end():]
            if any(pat.fullmatch(rest) for pat in patterns):
                out[name] = p
        return out

    # --- locate-and-edit: layers, modules, orientation ------------------------------------

    def num_layers(self) -> int:
        """How many transformer layers the model has."""
        return 1 + max((i for n, _ in self.model.named_parameters() if (i := self.layer_of(n)) is not None), default=-1)

    def resolve_layer(self, layer: int) -> int:
        """A layer index, negative counting from the end; a one-line error when outside the model."""
        n = self.num_layers()
        if not -n <= layer < n:
            from kbsync.errors import BadInput

            raise BadInput(f"layer {layer} is outside the model, which has layers 0-{n - 1}")
        return layer % n

    def layer_module(self, layer: int) -> str:
        """The name of transformer layer `layer` (its output is the residual stream after it)."""
        layer = self.resolve_layer(layer)
        for name, _ in self.model.named_modules():
            m = re.search(self.layer_regex, name + ".")
            if m and int(m.group(1)) == layer and m.end() == len(name) + 1:
                return name
        raise ValueError(f"no module for layer {layer}")

    def mlp_out(self, layer: int) -> str:
        """The name of layer `layer`'s MLP output matrix module (down_proj, GPT-2's c_proj)."""
        prefix = self.layer_module(layer) + "."
        pattern = re.compile(self.mlp_out_modules)
        for name, _ in self.model.named_modules():
            if name.startswith(prefix) and pattern.fullmatch(name[len(prefix):]):
                return name
        from kbsync.errors import BadInput

        raise BadInput(f"layer {layer} has no MLP output matrix matching {self.mlp_out_modules!r}")

    def stores_in_out(self, module_name: str) -> bool:
        """Whether the module's weight is stored [in, out] (GPT-2's Conv1D) rather than nn.Linear's [out, in]."""
        from adapters.hooks import get_module

        return type(get_module(self.model, module_name)).__name__ == "Conv1D"

    def subject_positions(self, prompts: list[str], subject: str, question: bool = True) -> list[int]:
        """Per prompt, the position (in encode()'s rows) of the subject's last token (generative families)."""
        from kbsync.errors import BadInput

        raise BadInput(f"locate-and-edit methods need a causal LM; this model is a {self.family}")

    def fingerprint(self, gates: bool = True) -> str:
        """A short hash of the editable weights and (gates) firing gates: identifies the exact model state edits stack on."""
        import hashlib

        h = hashlib.sha256()
        for name, p in sorted(self.editable().items()):
            h.update(name.encode())
            h.update(p.detach().contiguous().cpu().numpy().tobytes())
        if gates:
            hash_gates(self.model, h)  # gated edits change outputs without changing a weight
        return h.hexdigest()[:16]
