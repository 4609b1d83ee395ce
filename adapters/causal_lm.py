"""Decoder-only causal LMs (Llama/SmolLM, GPT-2): answers are generated after the prompt."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.func import functional_call

from adapters.base import Adapter, Batch, Params
from adapters.registry import register

QA_FORMAT = "Question: {q}\nAnswer:"

# Architectures whose logits are exactly output_embeddings(base_model(...).last_hidden_state)
# (no logit scaling or soft-capping), so answer_states can stop before the head.
PLAIN_HEAD = ("llama", "gpt2", "mistral", "qwen2", "gptj", "gpt_neox")

# Architectures whose body uses inputs_embeds as the first layer's input unchanged (no position
# embedding added), so a cached hidden state can be fed to the layers after it (with_prefix).
# Each adapter still checks the shortcut against the full forward once before using it.
TAIL_OK = ("llama", "mistral", "qwen2")


class _Skip(torch.nn.Module):
    """Stands in for a layer whose output is already known (the cached prefix): passes it through."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The hidden states, unchanged."""
        return hidden_states


@contextmanager
def _skipping(layers: torch.nn.ModuleList, k: int) -> Iterator[None]:
    saved = [layers[i] for i in range(k)]
    try:
        for i in range(k):
            layers[i] = _Skip()
        yield
    finally:
        for i, m in enumerate(saved):
            layers[i] = m


@register
class CausalLMAdapter(Adapter):
    """Generative QA with a decoder-only LM; the chat template is used for questions when present."""

    family = "causal-lm"
    layer_regex = r"(?:\.layers|\.h)\.(\d+)\."
    default_modules = r"mlp\.(gate_proj|up_proj|down_proj|c_fc|c_proj|fc_in|fc_out)\.weight"

    @classmethod
    def accepts(cls, config: Any) -> bool:
        """Any config whose architecture name ends in ForCausalLM / LMHeadModel."""
        archs = getattr(config, "architectures", None) or []
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or config.model_type in (
            "llama", "gpt2", "mistral", "qwen2", "gptj", "gpt_neox",
        )

    @classmethod
    def load(cls, path: str, config: Any, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
        """AutoModelForCausalLM + AutoTokenizer, weights in dtype."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model, tok

    @property
    def _has_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def chats(self) -> bool:
        """Questions are put through the model's chat template (when it has one and chat is on)."""
        return bool(self.chat and self._has_template)

    def render(self, prompt: str, question: bool = True) -> str:
        """The exact text fed to the model for a prompt (chat template, QA format, or raw)."""
        if question and self.chat and self._has_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        if question:
            return QA_FORMAT.format(q=prompt)
        return prompt

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt_ids(self, prompt: str, question: bool) -> list[int]:
        ids = self._ids(self.render(prompt, question))
        bos = self.tokenizer.bos_token_id
        # Templates write their own specials; plain prompts get the BOS the model was trained with.
        if bos is not None and getattr(self.tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def subject_positions(self, prompts: list[str], subject: str, question: bool = True) -> list[int]:
        """Per prompt, the index in encode()'s row of the subject's last token (the prompt's last token when subject is empty)."""
        from kbsync.errors import BadInput

        out = []
        for prompt in prompts:
            ids = self._prompt_ids(prompt, question)
            if not subject.strip():
                out.append(len(ids) - 1)
                continue
            rendered = self.render(prompt, question)
            at = rendered.rfind(prompt)
            idx = prompt.rfind(subject)
            if idx < 0:
                idx = prompt.lower().rfind(subject.lower())
            if at < 0 or idx < 0:
                raise BadInput(f"subject {subject!r} does not occur in its prompt {prompt!r}")
            end = at + idx + len(subject)
            enc = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
            last = max(i for i, (start, _stop) in enumerate(enc["offset_mapping"]) if start < end)
            out.append(last + len(ids) - len(enc["input_ids"]))  # a prepended BOS shifts every position
        return out

    def _target_ids(self, rendered: str, target: str, question: bool) -> list[int]:
        sep = "" if rendered.endswith((" ", "\n")) else " "
        ids = self._ids(sep + target.strip())
        if question and self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        return ids

    def encode(self, prompts: list[str], targets: list[str], question: bool = True) -> Batch:
        """Right-padded prompt+target ids; labels cover the target tokens only."""
        rows = []
        for p, t in zip(prompts, targets, strict=True):
            pid = self._prompt_ids(p, question)
            tid = self._target_ids(self.render(p, question), t, question)
            rows.append((pid + tid, [-100] * len(pid) + tid))
        width = max(len(r[0]) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
            mask[i, : len(x)] = 1
        return self.to_device({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def answer_states(self, batch: Batch, params: Params | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The final hidden state at each answer token's predicting position (the LM head is applied later).

        Runs the transformer body only; the [B,T,V] logits over a 49k vocabulary at every
        position (prompt and padding included) are never formed. Architectures not known to have
        a plain head use the generic logits path. params may only replace body weights (deltas
        only ever touch layer weights); anything else raises ValueError.
        """
        if not self._plain_head:
            return super().answer_states(batch, params)
        prefix = self.model.base_model_prefix
        body, head = getattr(self.model, prefix), self.model.get_output_embeddings()
        sub = {n[len(prefix) + 1:]: t for n, t in (params or {}).items() if n.startswith(prefix + ".")}
        live = dict(self.model.named_parameters())
        if len(sub) != len(params or {}) or any(live[n] is head.weight for n in params or {}):
            # answer_head applies the live head: states from a replaced head would be scored wrongly.
            raise ValueError("answer_states: params may only replace transformer-body weights, not the LM head")
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        skip = 0
        if "hidden_in" in batch:  # with_prefix: start at the first editable layer from its cached input
            skip = int(batch["tail_from"])
            if any((i := self.layer_of(n)) is None or i < skip for n in params or {}):
                raise ValueError(f"answer_states: a prefix batch starts at layer {skip}; params may only replace later layers")
            inputs = {"inputs_embeds": batch["hidden_in"], "attention_mask": batch["attention_mask"], "use_cache": False}
        with _skipping(body.layers, skip) if skip else nullcontext():
            if sub:
                hidden = functional_call(body, sub, args=(), kwargs=inputs, strict=False).last_hidden_state
            else:
                hidden = body(**inputs).last_hidden_state
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        return hidden[:, :-1][mask], labels[mask], mask.nonzero()[:, 0]

    def answer_logits(self, batch: Batch, params: Params | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at answer positions only, packed [B, A, V] (A = the longest answer), with labels and mask.

        Same values as the generic [B, T, V] layout at the answer positions; the 49k-vocabulary
        head is applied to the few answer tokens rather than to every prompt token (most of the
        cost of a forward pass on a 135M model with a long chat prompt).
        """
        if not self._plain_head:
            return super().answer_logits(batch, params)
        states, labels, rows = self.answer_states(batch, params)
        n = batch["labels"].shape[0]
        counts = torch.bincount(rows, minlength=n)
        width = max(1, int(counts.max())) if len(rows) else 1
        pos = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
        logits = self.answer_head(states)
        packed = logits.new_zeros((n, width, logits.shape[-1]))
        packed = packed.index_put((rows, pos), logits)
        out_labels = torch.zeros((n, width), dtype=torch.long, device=rows.device)
        out_labels[rows, pos] = labels
        mask = torch.zeros((n, width), dtype=torch.bool, device=rows.device)
        mask[rows, pos] = True
        return packed, out_labels, mask

    def _tail_start(self) -> int | None:
        """The first editable layer, when the body can start there from a cached input (else None)."""
        body = getattr(self.model, getattr(self.model, "base_model_prefix", ""), None)
        if (not self._plain_head or self.model.config.model_type not in TAIL_OK
                or not isinstance(getattr(body, "layers", None), torch.nn.ModuleList)):
            return None
        layers = [self.layer_of(n) for n in self.editable()]
        if not layers or None in layers or min(layers) == 0:  # type: ignore[type-var]
            return None
        return min(layers)  # type: ignore[type-var]

    def with_prefix(self, batch: Batch) -> Batch:
        """The batch plus the hidden states entering the first editable layer, which no edit changes.

        Scoring the batch then runs only the editable layers and those after them (training an
        editor for the last 3 of 30 layers costs ~1/10 of a full pass). The shortcut is checked
        against the full forward on the first batch and abandoned if they disagree.
        """
        k = self._tail_start()
        if k is None or getattr(self, "_tail_ok", True) is False:
            return batch
        body = getattr(self.model, self.model.base_model_prefix)
        with torch.no_grad():
            out = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                       output_hidden_states=True)
            fast = {**batch, "hidden_in": out.hidden_states[k].detach(), "tail_from": torch.tensor(k)}
            if not hasattr(self, "_tail_ok"):
                try:
                    ref, got = self.answer_states(batch)[0], self.answer_states(fast)[0]
                    self._tail_ok = bool(torch.allclose(ref, got, rtol=1e-4, atol=1e-4 * float(ref.abs().max())))
                except (TypeError, ValueError, RuntimeError):
                    self._tail_ok = False
        return fast if self._tail_ok else batch

    def answer_head(self, states: torch.Tensor) -> torch.Tensor:
        """The LM head on answer_states' hidden states (identity on the generic fallback's logits)."""
        return self.model.get_output_embeddings()(states) if self._plain_head else states

    @property
    def _plain_head(self) -> bool:
        prefix = getattr(self.model, "base_model_prefix", "")
        return (self.model.config.model_type in PLAIN_HEAD and bool(prefix) and hasattr(self.model, prefix)
                and self.model.get_output_embeddings() is not None)

    def _generate(self, prompts: list[str], question: bool, num_beams: int, n_return: int = 1) -> list[list[str]]:
        encoded = [self._prompt_ids(p, question) for p in prompts]
        width = max(map(len, encoded))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(encoded):  # left padding so every prompt ends at the same column
            ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=self.max_new_tokens,
                do_sample=False, num_beams=num_beams, num_return_sequences=n_return,
                pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id,
            )
        texts = self.tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
        clean = [t.strip().split("\n")[0].strip() for t in texts]
        return [clean[i * n_return:(i + 1) * n_return] for i in range(len(prompts))]

    def predict(self, prompts: list[str], question: bool = True, num_beams: int | None = None) -> list[str]:
        """Greedy (or beam) answers, cut at the first newline."""
        return [h[0] for h in self._generate(prompts, question, num_beams or self.num_beams)]

    def hypotheses(self, prompt: str, n: int, question: bool = True) -> list[str]:
        """The n best beam-search answers."""
        return self._generate([prompt], question, num_beams=n, n_return=n)[0]
