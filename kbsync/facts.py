"""Facts and per-relation templates: a fact becomes a question, a claim and paraphrases."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from kbsync.config import CONFIG_DIR
from kbsync.errors import BadInput, NotFound


@dataclass(frozen=True)
class Entity:
    """A knowledge-base item: an id, its English label and accepted aliases."""

    id: str
    label: str
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The label followed by its aliases."""
        return (self.label, *self.aliases)


@dataclass(frozen=True)
class Fact:
    """A (subject, property, object) triple, with the KB revision it was read at."""

    subject: Entity
    property: str
    object: Entity
    revision: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """(subject id, property): the slot this fact fills."""
        return (self.subject.id, self.property)


@dataclass(frozen=True)
class Relation:
    """Templates for one Wikidata property."""

    id: str
    label: str
    subject_type: str
    object_type: str
    phrases: tuple[str, ...]
    question: str
    claim: str
    paraphrases: tuple[str, ...]
    multi_valued: bool = False

    def ask(self, subject: str) -> str:
        """The question for a subject label."""
        return self.question.format(subject=subject)

    def state(self, subject: str, obj: str) -> str:
        """The claim sentence for a subject and object label."""
        return self.claim.format(subject=subject, object=obj)

    def claim_prefix(self, subject: str) -> str:
        """The claim up to the object ("The capital of Namibia is"), which models often echo."""
        return self.claim.split("{object}")[0].format(subject=subject).strip()

    def rephrase(self, subject: str) -> list[str]:
        """The paraphrased questions for a subject label."""
        return [p.format(subject=subject) for p in self.paraphrases]


@dataclass(frozen=True)
class Prompts:
    """Everything the pipeline asks the model about one fact."""

    question: str
    claim: str
    claim_prefix: str
    paraphrases: tuple[str, ...]
    target: str
    aliases: tuple[str, ...] = field(default=())


def render(fact: Fact, relations: dict[str, Relation] | None = None) -> Prompts:
    """Template a fact into its question, claim and paraphrases."""
    rel = get_relation(fact.property, relations)
    s, o = fact.subject.label, fact.object.label
    return Prompts(
        question=rel.ask(s),
        claim=rel.state(s, o),
        claim_prefix=rel.claim_prefix(s),
        paraphrases=tuple(rel.rephrase(s)),
        target=o,
        aliases=fact.object.aliases,
    )


def load_relations(path: str | Path | None = None) -> dict[str, Relation]:
    """Read relation templates from TOML (config/relations.toml by default)."""
    path = Path(path) if path else CONFIG_DIR / "relations.toml"
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    out = {}
    for pid, r in raw.items():
        if len(r.get("paraphrases", [])) < 3:
            raise BadInput(f"relation {pid} in {path} needs at least 3 paraphrases")
        out[pid] = Relation(
            id=pid,
            label=r["label"],
            subject_type=r["subject_type"],
            object_type=r["object_type"],
            phrases=tuple(r["phrases"]),
            question=r["question"],
            claim=r["claim"],
            paraphrases=tuple(r["paraphrases"]),
            multi_valued=bool(r.get("multi_valued", False)),
        )
    return out


@lru_cache(maxsize=1)
def default_relations() -> dict[str, Relation]:
    """The shipped relation templates, read once."""
    return load_relations()


def get_relation(pid: str, relations: dict[str, Relation] | None = None) -> Relation:
    """The relation with this property id, or a one-line error naming the known ones."""
    relations = relations or default_relations()
    try:
        return relations[pid]
    except KeyError:
        raise NotFound(f"unknown relation {pid}; known: {', '.join(sorted(relations))}") from None


def _phrase_regex(phrase: str) -> re.Pattern[str]:
    head, _, tail = phrase.partition("{subject}")
    return re.compile(
        "^" + re.escape(head.lower()) + r"(?P<subject>.+?)" + re.escape(tail.lower()) + "$"
    )


def parse_phrase(text: str, relations: dict[str, Relation] | None = None) -> tuple[str, str]:
    """Map "capital of Namibia" or "Namibia's capital" to ("P36", "Namibia")."""
    relations = relations or default_relations()
    cleaned = " ".join(text.strip().rstrip("?.").split())
    if not cleaned:
        raise BadInput("empty fact phrase; try e.g. \"capital of Namibia\"")
    lowered = cleaned.lower()
    # Longest first: "what is france's capital" must not leave "what is france" as the subject.
    for prefix in ("what is the ", "what's the ", "what is ", "what's ", "the "):
        if lowered.startswith(prefix) and len(lowered) > len(prefix):
            cleaned, lowered = cleaned[len(prefix):], lowered[len(prefix):]
            break
    best: tuple[int, str, str] | None = None
    for rel in relations.values():
        for phrase in rel.phrases:
            m = _phrase_regex(phrase).match(lowered)
            if not m:
                continue
            subject = cleaned[m.start("subject"):m.end("subject")].strip()
            # Prefer the phrase that explains the most of the text (longest fixed part).
            fixed = len(phrase) - len("{subject}")
            if subject and (best is None or fixed > best[0]):
                best = (fixed, rel.id, subject)
    if best is None:
        examples = ", ".join(f'"{r.phrases[0].format(subject="X")}"' for r in list(relations.values())[:4])
        raise NotFound(f"unknown relation in {text!r}; phrases look like {examples}")
    return best[1], best[2]
