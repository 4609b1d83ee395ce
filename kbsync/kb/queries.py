"""Portable SPARQL queries that run unchanged on the local KB and on query.wikidata.org.

Labels come from rdfs:label filtered to English, never from SERVICE wikibase:label
(which only Wikidata's Blazegraph understands).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from kbsync.kb.snapshot import (
    datetime_literal,
    en,
    entity_id,
    entity_iri,
    property_id,
    property_iri,
)

PREFIXES = """PREFIX rdfs: <http://www.w3.org/2000/01/rdf-schema#>
PREFIX skos: <http://www.w3.org/2004/02/skos/core#>
PREFIX schema: <http://schema.org/>
PREFIX xsd: <http://www.w3.org/2001/XMLSchema#>
PREFIX wdt: <http://www.wikidata.org/prop/direct/>
"""

_LABELS = """  OPTIONAL { ?item rdfs:label ?itemLabel . FILTER(LANG(?itemLabel) = "en") }
  OPTIONAL { ?item schema:version ?rev }
  OPTIONAL { ?item schema:dateModified ?modified }"""


@dataclass(frozen=True)
class ClaimRow:
    """One answer row: an entity's current value for a property, with labels and revision."""

    entity: str
    property: str
    value: str | None
    entity_label: str
    value_label: str
    revision: int | None
    modified: datetime | None


def current_values(pairs: Sequence[tuple[str, str]]) -> str:
    """Query (a): current value(s), labels, revision and modification time of (entity, property) pairs."""
    values = "\n".join(f"    (<{entity_iri(e)}> <{property_iri(p)}>)" for e, p in pairs)
    return f"""{PREFIXES}SELECT ?item ?prop ?value ?itemLabel ?valueLabel ?rev ?modified WHERE {{
  VALUES (?item ?prop) {{
{values}
  }}
  OPTIONAL {{
    ?item ?prop ?value .
    OPTIONAL {{ ?value rdfs:label ?valueLabel . FILTER(LANG(?valueLabel) = "en") }}
  }}
{_LABELS}
}}"""


def _of_class(class_id: str | None) -> str:
    # A direct instance-of triple: on Wikidata, subclasses (wdt:P31/wdt:P279*) are not followed.
    return f"  ?item wdt:P31 <{entity_iri(class_id)}> .\n" if class_id else ""


def class_members(pid: str, class_id: str, limit: int = 1000, offset: int = 0) -> str:
    """Entities that are an instance of class_id (wdt:P31) and have a pid claim, by id, one page."""
    return f"""{PREFIXES}SELECT DISTINCT ?item WHERE {{
  ?item wdt:P31 <{entity_iri(class_id)}> .
  FILTER EXISTS {{ ?item wdt:{pid} ?value }}
}}
ORDER BY ?item
LIMIT {int(limit)} OFFSET {int(offset)}"""


def modified_since(pid: str, since: datetime, overlap: timedelta = timedelta(0),
                   limit: int = 1000, offset: int = 0, class_id: str | None = None) -> str:
    """Query (b): entities with a pid claim whose schema:dateModified is after since - overlap.

    With class_id, only entities that are an instance of that class (wdt:P31).
    """
    return f"""{PREFIXES}SELECT ?item ?value ?itemLabel ?valueLabel ?rev ?modified WHERE {{
{_of_class(class_id)}  ?item wdt:{pid} ?value ;
        schema:dateModified ?modified .
  FILTER(?modified > {datetime_literal(since - overlap)})
  OPTIONAL {{ ?value rdfs:label ?valueLabel . FILTER(LANG(?valueLabel) = "en") }}
  OPTIONAL {{ ?item rdfs:label ?itemLabel . FILTER(LANG(?itemLabel) = "en") }}
  OPTIONAL {{ ?item schema:version ?rev }}
}}
ORDER BY ?modified ?item ?value
LIMIT {int(limit)} OFFSET {int(offset)}"""


def latest_modified(pid: str, class_id: str | None = None) -> str:
    """The latest schema:dateModified among entities with a pid claim (of class_id), to start a cursor."""
    return f"""{PREFIXES}SELECT (MAX(?modified) AS ?latest) WHERE {{
{_of_class(class_id)}  ?item wdt:{pid} ?value ;
        schema:dateModified ?modified .
}}"""


def label_variants(label: str) -> list[str]:
    """Exact-match spellings to try: as given, capitalised, title case (index-friendly, no LCASE scan)."""
    label = " ".join(label.split())
    out: list[str] = []
    for v in (label, label[:1].upper() + label[1:], label.title()):
        if v and v not in out:
            out.append(v)
    return out


def resolve_label(label: str, pid: str | None = None, role: str = "subject") -> str:
    """Query (c): entities whose English label or alias is label; ?has marks those with a pid claim.

    role "subject" prefers entities that have a pid claim, "object" those that are a pid value.
    """
    values = " ".join(en(v) for v in label_variants(label))
    if pid is None:
        has = "BIND(false AS ?has)"
    elif role == "object":
        has = f"BIND(EXISTS {{ ?other wdt:{pid} ?item }} AS ?has)"
    else:
        has = f"BIND(EXISTS {{ ?item wdt:{pid} ?other }} AS ?has)"
    return f"""{PREFIXES}SELECT DISTINCT ?item ?itemLabel ?has WHERE {{
  VALUES ?name {{ {values} }}
  {{ ?item rdfs:label ?name }} UNION {{ ?item skos:altLabel ?name }}
  OPTIONAL {{ ?item rdfs:label ?itemLabel . FILTER(LANG(?itemLabel) = "en") }}
  {has}
}}
LIMIT 50"""


def _value(binding: dict[str, Any], var: str) -> str | None:
    cell = binding.get(var)
    return cell.get("value") if isinstance(cell, dict) else None


def parse_datetime(text: str | None) -> datetime | None:
    """An xsd:dateTime lexical value as an aware UTC datetime (None stays None)."""
    if not text:
        return None
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def parse_claims(bindings: Iterable[dict[str, Any]], pid: str | None = None) -> list[ClaimRow]:
    """ClaimRows from query (a) or (b) bindings; pid names the property when the query fixed it.

    Raises ValueError on a binding without the fields every row must have.
    """
    rows = []
    for b in bindings:
        item = _value(b, "item")
        prop = _value(b, "prop") or (property_iri(pid) if pid else None)
        if not item or not prop:
            raise ValueError("row without ?item or ?prop")
        value = _value(b, "value")
        value_cell = b.get("value") or {}
        # Wikidata gives some values as literals (quantities); their text is their label.
        value_id = entity_id(value) if value and value_cell.get("type") == "uri" else value
        rev = _value(b, "rev")
        rows.append(ClaimRow(
            entity=entity_id(item),
            property=property_id(prop),
            value=value_id,
            entity_label=_value(b, "itemLabel") or entity_id(item),
            value_label=_value(b, "valueLabel") or (value_id or ""),
            revision=int(rev) if rev is not None else None,
            modified=parse_datetime(_value(b, "modified")),
        ))
    return rows


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """Consecutive slices of at most size items."""
    for i in range(0, len(items), size):
        yield items[i:i + size]
