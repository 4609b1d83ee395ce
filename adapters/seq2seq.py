"""Encoder-decoder models (BART, T5): the question is encoded, the answer decoded."""

from __future__ import annotations

from typing import Any

import torch

from adapters.base import Adapter, Batch
from adapters.registry import register


@register
class Seq2SeqAdapter(Adapter):
    """Generative QA with an encoder-decoder; edits default to the decoder's feed-forward matrices."""

    family = "seq2seq"
    layer_regex = r"decoder\.(?:layers|block)\.(\d+)\."
    default_modules = r"(fc1|fc2|layer\.\d+\.DenseReluDense\.(wi|wo|wi_0|wi_1))\.weight"
    shift_labels = False

    @classmethod
    def accepts(cls, config: Any) -> bool:
        """Encoder-decoder configs (BART, T5, ...)."""
        return bool(getattr(config, "is_encoder_decoder", False))

    @classmethod
    def load(cls, path: str, config: Any, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
        """AutoModelForSeq2SeqLM + AutoTokenizer, weights in dtype."""
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        return AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _start_id(self) -> int:
        start = self.model.config.decoder_start_token_id
        return start if start is not None else self._pad_id()

    def encode(self, prompts: list[str], targets: list[str], question: bool = True) -> Batch:
        """Encoder inputs for the prompts; decoder inputs are the shifted target; labels the target."""
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt")
        tgt = [self.tokenizer(" " + t.strip(), add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id] for t in targets]
        width = max(map(len, tgt))
        labels = torch.full((len(tgt), width), -100, dtype=torch.long)
        dec = torch.full((len(tgt), width), self._pad_id(), dtype=torch.long)
        dmask = torch.zeros((len(tgt), width), dtype=torch.long)
        for i, y in enumerate(tgt):
            labels[i, : len(y)] = torch.tensor(y)
            dec[i, : len(y)] = torch.tensor([self._start_id()] + y[:-1])
            dmask[i, : len(y)] = 1
        return self.to_device({
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "decoder_input_ids": dec, "decoder_attention_mask": dmask, "labels": labels,
        })

    def _generate(self, prompts: list[str], num_beams: int, n_return: int = 1) -> list[list[str]]:
        enc = self.to_device(dict(self.tokenizer(prompts, padding=True, return_tensors="pt")))
        with torch.no_grad():
            out = self.model.generate(
                **enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                num_beams=num_beams, num_return_sequences=n_return,
            )
        texts = [t.strip() for t in self.tokenizer.batch_decode(out.cpu(), skip_special_tokens=True)]
        return [texts[i * n_return:(i + 1) * n_return] for i in range(len(prompts))]

    def predict(self, prompts: list[str], question: bool = True, num_beams: int | None = None) -> list[str]:
        """Greedy (or beam) decoded answers."""
        return [h[0] for h in self._generate(prompts, num_beams or self.num_beams)]

    def hypotheses(self, prompt: str, n: int, question: bool = True) -> list[str]:
        """The n best beam-search answers."""
        return self._generate([prompt], n, n)[0]
