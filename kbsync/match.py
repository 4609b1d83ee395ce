"""Explicit match rules between a model's answer and the expected object."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(the|a|an)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """Lowercase, strip accents, punctuation and articles, collapse whitespace."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = _PUNCT.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@dataclass(frozen=True)
class Match:
    """Whether an answer matched, and by which rule (exact, alias, prefix) or why not."""

    ok: bool
    rule: str


def match(answer: str, target: str, aliases: tuple[str, ...] = (), claim_prefix: str = "") -> Match:
    """Normalised exact match against the target or an alias.

    Three relaxations, each named in the returned rule: an answer that echoes the claim
    prefix ("The capital of France is Paris.") is compared after that prefix ("echo"); an
    answer that starts with the target followed by more words matches ("prefix"); a
    sentence whose last "X is Y" clause has Y equal to the target matches ("copula").
    """
    a = normalise(answer)
    rule_prefix = ""
    echo = normalise(claim_prefix) if claim_prefix else ""
    if echo and (a == echo or a.startswith(echo + " ")):
        a = a[len(echo):].strip()
        rule_prefix = "echo+"
    if not a:
        return Match(False, "empty")
    # A sentence answer ("The capital city of France is Paris.") is judged by its last "is" clause.
    tail = a.rsplit(" is ", 1)[1] if " is " in a else ""
    for kind, name in (("exact", target), *(("alias", x) for x in aliases)):
        n = normalise(name)
        if not n:
            continue
        if a == n:
            return Match(True, rule_prefix + kind)
        if a.startswith(n + " "):
            return Match(True, rule_prefix + kind + "-prefix")
        if tail == n:
            return Match(True, "copula+" + kind)
    return Match(False, "mismatch")
