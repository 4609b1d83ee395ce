"""Edit records for training and evaluation: from the fact table, CounterFact and zsRE files."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from kbsync.errors import BadInput, NotFound
from kbsync.facts import Fact, render


@dataclass
class EditRecord:
    """One edit: prompt -> new target (was `original`), its paraphrases, and unrelated retain pairs."""

    prompt: str
    target: str
    original: str
    paraphrases: list[str] = field(default_factory=list)
    retain: list[tuple[str, str]] = field(default_factory=list)
    question: bool = True
    alternatives: list[str] = field(default_factory=list)


def from_facts(facts: list[Fact], n_retain: int = 4, seed: int = 0, per_fact: int = 1) -> list[EditRecord]:
    """Counterfactual edits of known facts: each gets another KB object of the same property as target."""
    rng = random.Random(seed)
    objects: dict[str, list[str]] = {}
    for f in facts:
        objects.setdefault(f.property, [])
        if f.object.label not in objects[f.property]:
            objects[f.property].append(f.object.label)
    out = []
    for f in facts:
        pr = render(f)
        others = [f2 for f2 in facts if f2.subject.id != f.subject.id]
        choices = [o for o in objects[f.property] if o != f.object.label]
        for target in rng.sample(choices, min(per_fact, len(choices))):
            retain = [(render(o).question, o.object.label) for o in rng.sample(others, min(n_retain, len(others)))]
            out.append(EditRecord(pr.question, target, f.object.label, list(pr.paraphrases), retain, True, choices))
    return out


def _read_json(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise NotFound(f"data file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"data file {p} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise BadInput(f"data file {p} should hold a JSON list of records")
    return data


def load_counterfact(path: str | Path, limit: int | None = None) -> list[EditRecord]:
    """CounterFact (EasyEdit/MEND split): completion prompts, rephrase and locality prompts."""
    out = []
    for r in _read_json(path):
        if not r.get("prompt") or not r.get("target_new"):
            continue
        retain = [(r["locality_prompt"], r["locality_ground_truth"])] if r.get("locality_prompt") else []
        paras = [r["rephrase_prompt"]] if r.get("rephrase_prompt") else []
        out.append(EditRecord(r["prompt"], r["target_new"], r.get("ground_truth", ""), paras, retain, question=False))
        if limit and len(out) >= limit:
            break
    return out


def load_zsre(path: str | Path, limit: int | None = None) -> list[EditRecord]:
    """zsRE (MEND split): question `src`, new answer `alt`, paraphrase, and an unrelated `loc` question.

    Records with an empty field are skipped; records whose `alt` is already among the gold
    `answers` are kept but their original is the model prediction `pred`, not the gold answer.
    """
    out = []
    for r in _read_json(path):
        if not r.get("src") or not r.get("alt") or not str(r["alt"]).strip():
            continue
        answers = r.get("answers") or []
        original = r.get("pred") or (answers[0] if answers else "")
        loc = r.get("loc", "")
        loc = loc[len("nq question: "):] if loc.startswith("nq question: ") else loc
        retain = [(loc, r["loc_ans"])] if loc and r.get("loc_ans") else []
        paras = [r["rephrase"]] if r.get("rephrase") else []
        out.append(EditRecord(r["src"], r["alt"], original, paras, retain, question=True))
        if limit and len(out) >= limit:
            break
    return out


LOADERS = {"counterfact": load_counterfact, "zsre": load_zsre}


def load_records(spec: str, limit: int | None = None, facts: list[Fact] | None = None) -> list[EditRecord]:
    """`facts`, `counterfact:PATH`, `zsre:PATH`, or a PATH whose name says which format it is."""
    if spec == "facts":
        from adapters.tiny import tiny_facts

        records = from_facts(facts or tiny_facts(n=40))
        return records[:limit] if limit else records
    kind, _, path = spec.partition(":")
    if not path:
        path, kind = spec, ("zsre" if "zsre" in Path(spec).name.lower() else "counterfact")
    if kind not in LOADERS:
        raise BadInput(f"unknown data format {kind!r}; use facts, counterfact:PATH or zsre:PATH")
    return LOADERS[kind](path, limit)
