"""Batch files for `kbsync edit --batch FILE`: JSON lines of facts, read and checked completely before any edit.

Each non-blank line is one object, either {"phrase": "capital of Namibia", "target": "Windhoek"} (a fact,
resolved like `kbsync edit PHRASE TARGET`) or {"prompt": "The capital of Namibia is", "target":
"Windhoek"} (raw form), optionally with "subject": "Namibia" (the entity the prompt names, which the
default gated method fires on; it must occur in the prompt). A malformed line, an unknown relation or key, an empty target or a fact given
twice is a one-line error naming the line, and nothing is edited; so is a file with no edits.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from kbsync.errors import BadInput, KbsyncError, NotFound
from kbsync.facts import Fact
from kbsync.match import normalise

KEYS = ({"phrase", "target"}, {"prompt", "target"}, {"prompt", "subject", "target"})
# A batch id links the audit rows of one batch (metrics["batch"]); ids are short hex strings.
BATCH_ID_CHARS = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class BatchItem:
    """One line of a batch file: a fact (phrase form) or a raw prompt, and its new target."""

    line: int
    what: Fact | str
    target: str
    subject: str = ""  # raw form only: the entity the prompt names

    @property
    def label(self) -> str:
        """The fact as a person wrote it, for messages."""
        if isinstance(self.what, Fact):
            return f"{self.what.subject.label} · {self.what.property} -> {self.target}"
        return f"{self.what!r} -> {self.target}"


def new_batch_id() -> str:
    """A fresh batch id: 12 hex digits."""
    return secrets.token_hex(6)


def check_batch_id(batch: str) -> str:
    """The id unchanged if it is empty or 1-32 lower-case hex digits; BadInput otherwise."""
    if batch and (len(batch) > 32 or not set(batch) <= BATCH_ID_CHARS):
        raise BadInput(f"batch id {batch[:40]!r} must be 1-32 lower-case hex digits")
    return batch


def read_batch(path: str | Path) -> list[BatchItem]:
    """Every edit of a batch file, in order; BadInput naming the first bad line (nothing is edited then)."""
    from kbsync.corpus import fact_from_phrase

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"batch file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read batch file {path}: {getattr(e, 'strerror', None) or e}") from None
    items: list[BatchItem] = []
    seen: dict[object, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            obj = json.loads(raw)
        except ValueError:
            raise BadInput(f"{where}: not a JSON object (one edit per line, e.g. "
                           '{"phrase": "capital of Namibia", "target": "Windhoek"})') from None
        if not isinstance(obj, dict) or set(obj) not in KEYS:
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise BadInput(f"{where}: expected the keys phrase and target, or prompt, target (and subject); got {got}")
        if not all(isinstance(v, str) for v in obj.values()):
            raise BadInput(f"{where}: every value must be a string")
        target = " ".join(obj["target"].split())
        if not target:
            raise BadInput(f"{where}: empty target: say what the new answer is")
        if "phrase" in obj:
            try:
                what: Fact | str = fact_from_phrase(obj["phrase"], target)
            except KbsyncError as e:  # the same kind of error (its exit status), naming the line
                kind = type(e) if type(e) in (KbsyncError, NotFound, BadInput) else KbsyncError
                raise kind(f"{where}: {e}") from None
            key: object = ("fact", what.key)
        else:
            what = obj["prompt"].strip()
            if not what:
                raise BadInput(f"{where}: empty prompt: give the text the model should complete")
            subject = obj.get("subject", "").strip()
            if "subject" in obj and (not subject or subject not in what):
                raise BadInput(f"{where}: subject {obj['subject']!r} does not occur in the prompt {what!r}")
            key = ("prompt", normalise(what))
        if key in seen:
            raise BadInput(f"{where}: the same fact as line {seen[key]}; give each fact once per batch")
        seen[key] = n
        items.append(BatchItem(n, what, target, "" if isinstance(what, Fact) else subject))
    if not items:
        raise BadInput(f"batch file {path} holds no edits")
    return items
