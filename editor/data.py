"""Edit records for training and evaluation: from the fact table, CounterFact and zsRE files."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from editor.methods import EditRequest
from kbsync.errors import BadInput, NotFound
from kbsync.facts import Fact, render
from kbsync.match import normalise


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
    answer: str = ""  # the target in the model's answer style (see EditRequest.answer); empty: the bare target
    claim_prefix: str = ""  # "The capital of Peru is": an answer echoing it is judged on the rest
    subject: str = ""  # the entity the prompt is about, as it occurs there (locate-and-edit reads its last token)
    keep: list[str] = field(default_factory=list)  # the subject's other questions, whose answers must stay (EditRequest.keep)

    @property
    def taught(self) -> str:
        """What the edit's loss is on: the styled answer, else the target."""
        return self.answer or self.target

    def request(self, original: str | None = None) -> EditRequest:
        """The edit as a method takes it; original: the answer it replaces (default the record's)."""
        return EditRequest(self.prompt, self.target, self.question, original=self.original if original is None else original,
                           paraphrases=tuple(self.paraphrases), answer=self.answer, claim_prefix=self.claim_prefix,
                           subject=self.subject, keep=tuple(self.keep))


def from_facts(facts: list[Fact], n_retain: int = 4, seed: int = 0, per_fact: int = 1,
               neighbours: int = 0, answer_style: str = "bare") -> list[EditRecord]:
    """Counterfactual edits of known facts: each gets another KB object of the same property as target.

    Retain pairs are other subjects' facts; `neighbours` of them share the edited property (the
    facts an edit of "capital of X" is most likely to drag along; those with the same old answer
    first), the rest are drawn at random. answer_style "claim" teaches the relation's claim with
    the new object ("The capital of Peru is Quito.") rather than the bare object.
    """
    from kbsync.facts import get_relation

    rng = random.Random(seed)
    objects: dict[str, list[str]] = {}
    by_property: dict[str, list[Fact]] = {}
    for f in facts:
        objects.setdefault(f.property, [])
        by_property.setdefault(f.property, []).append(f)
        if f.object.label not in objects[f.property]:
            objects[f.property].append(f.object.label)
    out = []
    for f in facts:
        pr = render(f)
        others = [f2 for f2 in facts if f2.subject.id != f.subject.id]
        # Subjects sharing the old answer first: an edit's new target bleeds to them most
        # (France Euro -> Birr also turned Italy to Birr in the tiny-model ablation).
        near: list[Fact] = []
        if neighbours:  # (draws nothing otherwise, so records without neighbours stay as they were)
            near = [f2 for f2 in by_property[f.property] if f2.subject.id != f.subject.id]
            rng.shuffle(near)
            near.sort(key=lambda f2: f2.object.label != f.object.label)
        choices = [o for o in objects[f.property] if o != f.object.label]
        for target in rng.sample(choices, min(per_fact, len(choices))):
            picked = near[:min(neighbours, n_retain)]
            picked += rng.sample(others, min(n_retain - len(picked), len(others)))
            retain = [(render(o).question, o.object.label) for o in picked]
            answer = get_relation(f.property).state(f.subject.label, target) if answer_style == "claim" else ""
            keep = [render(f2).question for f2 in facts if f2.subject.id == f.subject.id and f2.property != f.property]
            out.append(EditRecord(pr.question, target, f.object.label, list(pr.paraphrases), retain, True, choices,
                                  answer, pr.claim_prefix, f.subject.label, keep))
    return out


def ground(adapter: Any, records: list[EditRecord], chunk: int = 32, cache: Path | None = None) -> list[EditRecord]:
    """The records with originals and retain answers replaced by the model's own greedy answers.

    An editor must keep what the served model says, not the KB's truth (which a small model often
    does not know): the regression check compares answers to the model's own, and the editor's
    condition text starts with the model's current prediction, as at edit time.
    """
    wanted = {(r.question, p) for r in records for p in [r.prompt] + [q for q, _ in r.retain]}
    said: dict[tuple[bool, str], str] = {}
    if cache is not None and cache.exists():  # answers of an earlier run on the same model (resume)
        said = {(bool(q), p): a for q, p, a in json.loads(cache.read_text())}
    for question in (True, False):
        prompts = sorted(p for q, p in wanted if q == question and (q, p) not in said)
        for i in range(0, len(prompts), chunk):
            part = prompts[i:i + chunk]
            said.update({(question, p): a for p, a in zip(part, adapter.predict(part, question=question))})
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps([[q, p, a] for (q, p), a in sorted(said.items())]))
    return [replace(r, original=said[(r.question, r.prompt)],
                    retain=[(q, said[(r.question, q)]) for q, _ in r.retain]) for r in records]


def beam_targets(adapter: Any, records: list[EditRecord], k: int = 2) -> list[EditRecord]:
    """The records re-targeted at answers the model itself finds likely: its beam hypotheses other
    than its own answer, up to k per record (the paper's training targets for QA-style facts).

    A hypothesis that echoes the record's claim prefix ("The capital of Peru is Cusco.") becomes
    the bare target "Cusco"; a record that teaches styled answers is taught the hypothesis itself.
    """
    out = []
    for r in records:
        own = normalise(_object_of(r.original, r.claim_prefix))
        for hyp in adapter.alternatives(r.prompt, k, question=r.question):
            target = _object_of(hyp, r.claim_prefix)
            if normalise(target) and normalise(target) != own:
                out.append(replace(r, target=target, answer=hyp if r.answer else ""))
    return out


def _object_of(answer: str, claim_prefix: str) -> str:
    text = answer.strip()
    if claim_prefix and text.lower().startswith(claim_prefix.lower()):
        text = text[len(claim_prefix):]
    return text.strip().rstrip(".!,;:").strip()


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
        out.append(EditRecord(r["prompt"], r["target_new"], r.get("ground_truth", ""), paras, retain, question=False,
                              subject=r.get("subject", "")))
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
        out.append(EditRecord(r["src"], r["alt"], original, paras, retain, question=True, subject=r.get("subject", "")))
        if limit and len(out) >= limit:
            break
    return out


LOADERS = {"counterfact": load_counterfact, "zsre": load_zsre}


def load_records(spec: str, limit: int | None = None, facts: list[Fact] | None = None,
                 answer_style: str = "bare") -> list[EditRecord]:
    """`facts` (the 40 most populous countries' capital and currency, what tiny test models know),
    `table` or `table:P36,P38` (the shipped fact table, all or some properties; retain sets hold 2
    facts of the edited property), `counterfact:PATH`, `zsre:PATH`, or a PATH whose name says which."""
    if spec == "facts":
        from adapters.tiny import tiny_facts

        records = from_facts(facts or tiny_facts(n=40), answer_style=answer_style)
        return records[:limit] if limit else records
    if spec == "table" or spec.startswith("table:"):
        from kbsync.corpus import default_fact_table

        table = default_fact_table()
        pids = [p.strip() for p in spec.partition(":")[2].split(",") if p.strip()]
        chosen = table.by_property(*pids) if pids else list(table.facts)
        if not chosen:
            raise BadInput(f"no facts in the table for properties {', '.join(pids)}")
        # Shuffled (seeded) so that --limit takes a mix of subjects rather than the table's first ones.
        chosen = list(chosen)
        random.Random(0).shuffle(chosen)
        records = from_facts(chosen, neighbours=2, answer_style=answer_style)
        return records[:limit] if limit else records
    kind, _, path = spec.partition(":")
    if not path:
        path, kind = spec, ("zsre" if "zsre" in Path(spec).name.lower() else "counterfact")
    if kind not in LOADERS:
        raise BadInput(f"unknown data format {kind!r}; use facts, counterfact:PATH or zsre:PATH")
    return LOADERS[kind](path, limit)
