"""The token patterns that name a subject, as the served tokenizer writes it in each context it can occur in."""

from __future__ import annotations

from typing import Any

from editor.memit.compute_ks import contexts
from editor.methods import EditRequest
from kbsync.errors import BadInput


def span_ids(adapter: Any, text: str, start: int, end: int) -> list[int]:
    """The ids of the tokens of `text` that overlap characters [start, end)."""
    enc = adapter.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [i for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if a < end and b > start]


def subject_patterns(adapter: Any, request: EditRequest, prefixes: list[str], lowercase: bool = True) -> list[list[int]]:
    """Distinct token sequences of the subject: in each trained context, served as it is, and standing alone."""
    subject = request.subject.strip()
    if not subject:
        raise BadInput("a gated edit needs the fact's subject (the entity the prompt names)")
    out: list[list[int]] = []
    for prompt in contexts(request, prefixes, True):
        rendered = adapter.render(prompt, request.question)
        at = rendered.rfind(prompt)
        idx = prompt.rfind(subject)
        if idx < 0:
            idx = prompt.lower().rfind(subject.lower())
        if at < 0 or idx < 0:
            if prompt == request.prompt:  # paraphrases may name the subject otherwise; the prompt must
                raise BadInput(f"subject {subject!r} does not occur in its prompt {request.prompt!r}")
            continue
        out.append(span_ids(adapter, rendered, at + idx, at + idx + len(subject)))
    names = [subject, subject.lower()] if lowercase else [subject]
    for name in names:
        for text in (name, " " + name):
            out.append(span_ids(adapter, text, text.index(name), len(text)))
    seen: set[tuple[int, ...]] = set()
    return [p for p in out if p and not (tuple(p) in seen or seen.add(tuple(p)))]
