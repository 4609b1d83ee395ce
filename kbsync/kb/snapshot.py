"""Turn a FactTable into a Wikidata-shaped RDF snapshot (N-Triples) for the local KB."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, unquote

from kbsync.corpus import FactTable
from kbsync.facts import Entity

ENTITY = "http://www.wikidata.org/entity/"
WDT = "http://www.wikidata.org/prop/direct/"
RDFS_LABEL = "http://www.w3.org/2000/01/rdf-schema#label"
SKOS_ALT_LABEL = "http://www.w3.org/2004/02/skos/core#altLabel"
SCHEMA_VERSION = "http://schema.org/version"
SCHEMA_MODIFIED = "http://schema.org/dateModified"
XSD = "http://www.w3.org/2001/XMLSchema#"

INSTANCE_OF = "P31"

# Class entities for wdt:P31 (instance of). Like every id in the snapshot these are local to
# kbsync: on Wikidata the same classes are Q6256 (country) and Q515 (city). Config may name a
# class by its English label ("country"), which resolves to whichever id the KB uses.
CLASSES = {
    "country": Entity("CLASS-country", "country"),
    "city": Entity("CLASS-city", "city"),
}

# A subject's class follows from the properties it has in the fact table.
CLASS_OF_PROPERTY = {
    "P36": "country", "P38": "country", "P30": "country", "P37": "country",
    "P1082": "country", "P47": "country",
    "P17": "city", "P421": "city", "P1376": "city",
}

# A fixed time so that the same fact table always yields the same bytes.
SNAPSHOT_TIME = datetime(2024, 1, 1, tzinfo=timezone.utc)


def entity_iri(entity_id: str) -> str:
    """The Wikidata-style IRI of an entity id.

    Our ids (GN3355338, ISO4217-NAD, CONT-AF, ...) are local to kbsync, not real Wikidata
    Q-ids; they only borrow Wikidata's IRI namespace so that the same queries run against
    the local KB and query.wikidata.org. Characters not allowed in an IRI (spaces, commas,
    slashes in time-zone ids) are percent-encoded.
    """
    return ENTITY + quote(entity_id, safe="-_.~")


def entity_id(iri: str) -> str:
    """The entity id of a Wikidata-style entity IRI (inverse of entity_iri)."""
    if not iri.startswith(ENTITY):
        return iri
    return unquote(iri[len(ENTITY):])


def property_iri(pid: str) -> str:
    """The direct-claim (wdt:) IRI of a property id."""
    return WDT + pid


def property_id(iri: str) -> str:
    """The property id of a wdt: IRI."""
    return iri[len(WDT):] if iri.startswith(WDT) else iri


def literal(text: str) -> str:
    """An N-Triples/SPARQL string literal body, escaped."""
    return '"' + (text.replace("\\", "\\\\").replace('"', '\\"')
                  .replace("\n", "\\n").replace("\r", "\\r")) + '"'


def en(text: str) -> str:
    """An English language-tagged literal."""
    return literal(text) + "@en"


def datetime_literal(when: datetime) -> str:
    """An xsd:dateTime literal in UTC with second precision, as Wikidata writes it."""
    utc = when.astimezone(timezone.utc).replace(microsecond=0)
    return literal(utc.strftime("%Y-%m-%dT%H:%M:%SZ")) + f"^^<{XSD}dateTime>"


def integer_literal(value: int) -> str:
    """An xsd:integer literal."""
    return literal(str(int(value))) + f"^^<{XSD}integer>"


def _label_triples(entity: Entity) -> Iterator[str]:
    s = f"<{entity_iri(entity.id)}>"
    yield f"{s} <{RDFS_LABEL}> {en(entity.label)} ."
    for alias in entity.aliases:
        yield f"{s} <{SKOS_ALT_LABEL}> {en(alias)} ."


def snapshot_triples(table: FactTable, revision: int = 1, modified: datetime = SNAPSHOT_TIME) -> list[str]:
    """The snapshot as sorted, de-duplicated N-Triples lines (deterministic)."""
    lines: set[str] = set()
    subjects: set[str] = set()
    for fact in table.facts:
        s = f"<{entity_iri(fact.subject.id)}>"
        lines.add(f"{s} <{property_iri(fact.property)}> <{entity_iri(fact.object.id)}> .")
        lines.update(_label_triples(fact.subject))
        lines.update(_label_triples(fact.object))
        subjects.add(s)
        cls = CLASSES.get(CLASS_OF_PROPERTY.get(fact.property, ""))
        if cls is not None:
            lines.add(f"{s} <{property_iri(INSTANCE_OF)}> <{entity_iri(cls.id)}> .")
            lines.update(_label_triples(cls))
    # Wikidata keeps one revision id and modification time per item, not per claim.
    for s in subjects:
        lines.add(f"{s} <{SCHEMA_VERSION}> {integer_literal(revision)} .")
        lines.add(f"{s} <{SCHEMA_MODIFIED}> {datetime_literal(modified)} .")
    return sorted(lines)


def write_snapshot(table: FactTable, path: str | Path, revision: int = 1,
                   modified: datetime = SNAPSHOT_TIME) -> Path:
    """Write the snapshot of a fact table as an N-Triples file; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in snapshot_triples(table, revision, modified)),
                   encoding="utf-8")
    tmp.replace(path)
    return path


def iter_entities(table: FactTable) -> Iterable[Entity]:
    """Every entity named by the table (subjects and objects), once each."""
    seen: dict[str, Entity] = {}
    for fact in table.facts:
        seen.setdefault(fact.subject.id, fact.subject)
        seen.setdefault(fact.object.id, fact.object)
    return seen.values()
