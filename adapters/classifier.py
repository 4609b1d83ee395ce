"""Sequence classifiers (BERT-style) for fact checking: a claim is SUPPORTS or REFUTES."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from adapters.base import Adapter, Batch, Params
from adapters.registry import register
from kbsync.errors import BadInput

LABELS = ("REFUTES", "SUPPORTS")


@register
class ClassifierAdapter(Adapter):
    """Binary fact checking as in the paper's FEVER setting; the edit loss is binary cross-entropy."""

    family = "classifier"
    layer_regex = r"encoder\.layer\.(\d+)\."
    default_modules = r"(intermediate\.dense|output\.dense)\.weight"
    shift_labels: ClassVar[bool] = False

    @classmethod
    def accepts(cls, config: Any) -> bool:
        """Configs whose architecture is a ...ForSequenceClassification."""
        return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))

    @classmethod
    def load(cls, path: str, config: Any, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
        """AutoModelForSequenceClassification + AutoTokenizer, weights in dtype."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(path)

    def label_id(self, target: str) -> int:
        """Map a target ("SUPPORTS"/"REFUTES", "true"/"false") to the class index."""
        t = target.strip().upper()
        t = {"TRUE": "SUPPORTS", "FALSE": "REFUTES", "1": "SUPPORTS", "0": "REFUTES"}.get(t, t)
        if t not in LABELS:
            raise BadInput(f"classifier target must be SUPPORTS or REFUTES, not {target!r}")
        return LABELS.index(t)

    def encode(self, prompts: list[str], targets: list[str], question: bool = False) -> Batch:
        """Tokenised claims with class labels."""
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt")
        labels = torch.tensor([self.label_id(t) for t in targets])
        return self.to_device({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})

    def forward(self, batch: Batch, params: Params | None = None) -> torch.Tensor:
        """Class logits [B, 2] (labels are not passed so the model computes no loss)."""
        return super().forward(batch, params)

    def answer_logits(self, batch: Batch, params: Params | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The class logits seen as a one-position sequence, so the shared losses and KL apply."""
        logits = self.forward(batch, params)[:, None, :]
        labels = batch["labels"][:, None]
        return logits, labels, torch.ones_like(labels, dtype=torch.bool)

    def example_losses(self, batch: Batch, params: Params | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
        """Binary cross-entropy on the SUPPORTS logit margin, per example."""
        logits = self.forward(batch, params)
        margin = logits[:, 1] - logits[:, 0]
        target = batch["labels"].float()
        if label_smoothing:
            target = target * (1 - label_smoothing) + 0.5 * label_smoothing
        return F.binary_cross_entropy_with_logits(margin, target, reduction="none")

    def predict(self, prompts: list[str], question: bool = False, num_beams: int | None = None) -> list[str]:
        """Argmax label per claim."""
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = self.model(**enc).logits
        return [LABELS[i] for i in logits.argmax(-1).tolist()]

    def alternatives(self, prompt: str, k: int = 4, question: bool = False) -> list[str]:
        """For a claim the only alternative is the flipped label."""
        return [LABELS[1 - LABELS.index(self.predict([prompt])[0])]]
