"""Read facts and resolve entities by label through a SparqlClient."""

from __future__ import annotations

import re
from collections.abc import Sequence

from kbsync.errors import NotFound
from kbsync.facts import Entity, Fact, get_relation
from kbsync.kb import queries
from kbsync.kb.queries import ClaimRow
from kbsync.kb.sparql import KBError, SparqlClient
from kbsync.kb.snapshot import entity_id


def resolve_entity(client: SparqlClient, label: str, pid: str | None = None,
                   role: str = "subject") -> Entity:
    """The entity with this English label (or alias), preferring one that fits pid in role."""
    candidates = resolve_candidates(client, label, pid, role)
    if not candidates:
        raise NotFound(f"no entity labelled {label!r} in the knowledge base")
    return candidates[0]


# A class given by id: Wikidata's Q6256, the local KB's CLASS-country, or any token with a
# digit and no lower-case letter; anything else is an English label.
CLASS_ID = re.compile(r"^(Q\d+|CLASS-\S+|(?=\S*\d)[^\sa-z]+)$")


def resolve_class(client: SparqlClient, name: str) -> str:
    """The entity id of a class given by id (returned as is) or by English label or alias.

    A label prefers an entity that is some item's wdt:P31 (instance of) value; class labels
    are lower case on Wikidata, so "City" also finds "city".
    """
    name = " ".join(name.split())
    if CLASS_ID.match(name):
        return name
    if name.lower() != name:
        found = resolve_candidates(client, name.lower(), "P31", "object")
        if found:
            return found[0].id
    return resolve_entity(client, name, "P31", "object").id


def resolve_candidates(client: SparqlClient, label: str, pid: str | None = None,
                       role: str = "subject") -> list[Entity]:
    """All entities with this English label or alias, best fit first, then by id (deterministic)."""
    bindings = client.select(queries.resolve_label(label, pid, role))
    found: dict[str, tuple[bool, Entity]] = {}
    for b in bindings:
        try:
            iri = b["item"]["value"]
        except (KeyError, TypeError):
            raise KBError(f"malformed SPARQL answer from {client.endpoint}: row without ?item") from None
        has = str(b.get("has", {}).get("value", "")).lower() in ("true", "1")
        name = b.get("itemLabel", {}).get("value") or label
        ent = Entity(entity_id(iri), name)
        prev = found.get(ent.id)
        found[ent.id] = (has or (prev[0] if prev else False), ent)
    return [e for _, e in sorted(found.values(), key=lambda he: (not he[0], he[1].id))]


def claims(client: SparqlClient, pairs: Sequence[tuple[str, str]], batch_size: int = 50) -> list[ClaimRow]:
    """Current claims for (entity id, property) pairs, batched into VALUES queries."""
    rows: list[ClaimRow] = []
    for batch in queries.batched(list(pairs), batch_size):
        bindings = client.select(queries.current_values(batch))
        try:
            rows.extend(queries.parse_claims(bindings))
        except (ValueError, TypeError, AttributeError) as e:
            raise KBError(f"malformed SPARQL answer from {client.endpoint}: {e}") from None
    return rows


def row_fact(row: ClaimRow) -> Fact:
    """A ClaimRow with a value as a Fact carrying its revision."""
    return Fact(
        subject=Entity(row.entity, row.entity_label),
        property=row.property,
        object=Entity(row.value or "", row.value_label),
        revision="" if row.revision is None else str(row.revision),
    )


def get_facts(client: SparqlClient, pid: str, subject_label: str) -> list[Fact]:
    """The current facts for a property of the entity labelled subject_label (NotFound if none)."""
    rel = get_relation(pid)
    subject = resolve_entity(client, subject_label, pid)
    facts = [row_fact(r) for r in claims(client, [(subject.id, pid)]) if r.value]
    if not facts:
        raise NotFound(f"{subject.label} has no {rel.label} in the knowledge base")
    return facts
