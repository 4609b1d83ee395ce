"""Poll a SPARQL endpoint for changed facts since a cursor, without losing or repeating any."""

from __future__ import annotations

import copy
import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from kbsync.errors import BadInput
from kbsync.facts import Fact
from kbsync.kb import MODES, lookup, queries
from kbsync.kb.queries import ClaimRow
from kbsync.kb.snapshot import entity_id
from kbsync.kb.sparql import KBError, SparqlClient

log = logging.getLogger("kbsync.kb.watch")

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _slot(entity: str, pid: str) -> str:
    return f"{entity}|{pid}"


@dataclass
class Cursor:
    """How far the watcher has read: per-entity revisions, or the latest dateModified seen.

    values remembers each watched slot's value ids so that a revision that touched another
    property of the entity is not reported as a change of this one. seen holds the
    (entity, property, revision, modified) keys already reported inside the overlap window.
    """

    mode: str = "revision"
    revisions: dict[str, int] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)
    modified: datetime | None = None
    seen: list[tuple[str, str, int, str]] = field(default_factory=list)

    def to_json(self) -> str:
        """The cursor as a JSON string (for the daemon's database)."""
        return json.dumps({
            "mode": self.mode,
            "revisions": self.revisions,
            "values": self.values,
            "modified": self.modified.isoformat() if self.modified else None,
            "seen": [list(s) for s in self.seen],
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Cursor:
        """A cursor from to_json's output; BadInput if it is not one."""
        try:
            raw = json.loads(text)
            mode = raw.get("mode", "revision")
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}")
            return cls(
                mode=mode,
                revisions={str(k): int(v) for k, v in raw.get("revisions", {}).items()},
                values={str(k): str(v) for k, v in raw.get("values", {}).items()},
                modified=queries.parse_datetime(raw.get("modified")),
                seen=[(str(e), str(p), int(r), str(m)) for e, p, r, m in raw.get("seen", [])],
            )
        except (ValueError, TypeError, AttributeError) as e:
            raise BadInput(f"stored KB cursor is not valid: {e}") from None


class Watcher:
    """Report facts that changed since the cursor, for a watchlist of slots, whole properties,
    or (property, class) watches: the property of every entity that is an instance of the class.

    mode "revision" re-reads the watched (entity, property) pairs and compares each
    entity's schema:version with the cursor; each poll expands a (property, class) watch into
    the pairs of the class's current instances (wdt:P31) that have the property. mode
    "modified" asks for entities of each watched property (of a watched class) modified
    after the cursor minus an overlap window (clocks and replication lag make the boundary
    fuzzy), then drops what was already reported.
    A fresh cursor reports every current fact once (in revision mode, so does an entity
    that newly joined a watched class); prime() starts from the KB's present.
    """

    def __init__(self, client: SparqlClient, *, pairs: Iterable[tuple[str, str]] = (),
                 properties: Iterable[str] = (), classes: Iterable[tuple[str, str]] = (),
                 mode: str = "revision", cursor: Cursor | None = None,
                 overlap: timedelta = timedelta(minutes=10), batch_size: int = 50,
                 page_size: int = 1000) -> None:
        if mode not in MODES:
            raise BadInput(f"unknown watch mode {mode!r}; use one of: {', '.join(MODES)}")
        self.client = client
        self.pairs = list(dict.fromkeys(pairs))
        self.properties = list(dict.fromkeys(properties))
        # (property, class entity id) watches.
        self.classes = list(dict.fromkeys((p, c) for p, c in classes))
        if mode == "revision" and self.properties:
            raise BadInput("revision mode watches (entity, property) pairs; use mode 'modified' for whole properties")
        if not self.pairs and not self.properties and not self.classes:
            raise BadInput("nothing to watch: give pairs, properties or classes")
        self.mode = mode
        self.cursor = cursor if cursor is not None else Cursor(mode=mode)
        if self.cursor.mode != mode:
            raise BadInput(f"stored KB cursor is for mode {self.cursor.mode!r}, not {mode!r}")
        self.overlap = overlap
        self.batch_size = batch_size
        self.page_size = page_size
        self._empty_classes: set[tuple[str, str]] = set()

    def poll(self) -> list[Fact]:
        """Changed facts since the cursor; the cursor advances only when the whole poll succeeded."""
        facts, cursor = self.fetch()
        self.cursor = cursor
        return facts

    def fetch(self) -> tuple[list[Fact], Cursor]:
        """Changed facts and the cursor after them, leaving self.cursor as it was.

        Use this to persist the facts before committing the cursor (self.cursor = cursor).
        """
        cursor = copy.deepcopy(self.cursor)
        if self.mode == "revision":
            rows = lookup.claims(self.client, self.watched_pairs(), self.batch_size)
        else:
            rows = self._modified_rows(cursor.modified or EPOCH)
        return self._changes(rows, cursor), cursor

    def prime(self) -> Cursor:
        """Set the cursor to the KB's current state without reporting anything (start watching now)."""
        if self.mode == "modified" and self.cursor.modified is None:
            latest = []
            for pid, class_id in self._modified_queries():
                latest.append(self._latest(pid, class_id))
                if class_id is not None and latest[-1] is None:
                    log.warning("no instance of %s has %s in the KB; nothing to watch there yet", class_id, pid)
            known = [t for t in latest if t is not None]
            cursor = copy.deepcopy(self.cursor)
            cursor.modified = max(known) if known else EPOCH
            self._changes(self._modified_rows(cursor.modified), cursor)
        else:
            _, cursor = self.fetch()
        self.cursor = cursor
        return cursor

    def watched_pairs(self) -> list[tuple[str, str]]:
        """The watchlist's pairs, then those of the (property, class) watches' current instances."""
        pairs = list(self.pairs)
        for pid, class_id in self.classes:
            members = self._class_members(pid, class_id)
            if not members and (pid, class_id) not in self._empty_classes:
                self._empty_classes.add((pid, class_id))
                log.warning("no instance of %s has %s in the KB; nothing to watch there yet", class_id, pid)
            pairs.extend((entity, pid) for entity in members)
        return list(dict.fromkeys(pairs))

    def _class_members(self, pid: str, class_id: str) -> list[str]:
        members: list[str] = []
        offset = 0
        while True:
            bindings = self.client.select(queries.class_members(pid, class_id, self.page_size, offset))
            try:
                members.extend(entity_id(b["item"]["value"]) for b in bindings)
            except (KeyError, TypeError) as e:
                raise KBError(f"malformed SPARQL answer from {self.client.endpoint}: {e}") from None
            if len(bindings) < self.page_size:
                return members
            offset += self.page_size

    def _modified_queries(self) -> list[tuple[str, str | None]]:
        """(property, class id or None) per modified-since query: None means no class restriction."""
        whole = list(dict.fromkeys([*self.properties, *(p for _, p in self.pairs)]))
        return [*((pid, None) for pid in whole),
                *((pid, c) for pid, c in self.classes if pid not in self.properties)]

    def _latest(self, pid: str, class_id: str | None = None) -> datetime | None:
        bindings = self.client.select(queries.latest_modified(pid, class_id))
        try:
            value = bindings[0]["latest"]["value"] if bindings and bindings[0].get("latest") else None
            return queries.parse_datetime(value)
        except (KeyError, TypeError, ValueError) as e:
            raise KBError(f"malformed SPARQL answer from {self.client.endpoint}: {e}") from None

    def _modified_rows(self, since: datetime) -> list[ClaimRow]:
        wanted_pairs = set(self.pairs)
        everything = set(self.properties)
        rows: dict[tuple[str, str, str | None, int | None], ClaimRow] = {}  # a row may match two queries
        for pid, class_id in self._modified_queries():
            offset = 0
            while True:
                bindings = self.client.select(
                    queries.modified_since(pid, since, self.overlap, self.page_size, offset, class_id))
                try:
                    page = queries.parse_claims(bindings, pid)
                except (ValueError, TypeError, AttributeError) as e:
                    raise KBError(f"malformed SPARQL answer from {self.client.endpoint}: {e}") from None
                if any(r.modified is None for r in page):
                    raise KBError(f"malformed SPARQL answer from {self.client.endpoint}: row without ?modified")
                for r in page:
                    if class_id is not None or pid in everything or (r.entity, pid) in wanted_pairs:
                        rows.setdefault((r.entity, r.property, r.value, r.revision), r)
                if len(bindings) < self.page_size:
                    break
                offset += self.page_size
        return list(rows.values())

    def _changes(self, rows: list[ClaimRow], cursor: Cursor) -> list[Fact]:
        """Facts of the slots whose revision is new and whose value changed; updates cursor in place."""
        by_slot: dict[tuple[str, str], list[ClaimRow]] = defaultdict(list)
        for row in rows:
            by_slot[(row.entity, row.property)].append(row)
        seen = {(e, p, r) for e, p, r, _ in cursor.seen}
        known = dict(cursor.revisions)  # as of the previous poll, for every slot of an entity
        facts: list[Fact] = []
        for (entity, pid), slot_rows in sorted(by_slot.items()):
            revision = max((r.revision for r in slot_rows if r.revision is not None), default=None)
            value_ids = ",".join(sorted({r.value for r in slot_rows if r.value}))
            previous = cursor.values.get(_slot(entity, pid))
            # A revision is the entity's, but a poll reads an entity's slots in different queries (its
            # batch of pairs), so an edit landing between two of them leaves one slot read at the new
            # revision and another at the old: the entity's revision alone cannot say a slot is done
            # (a KB change was lost that way). In revision mode a slot is reported when its value
            # differs from the one last read; the revision only keeps a slot never read before (newly
            # watched, of an entity already known) from counting as a change.
            unseen_slot = False
            if revision is not None:
                if (entity, pid, revision) in seen:
                    continue
                if self.mode == "revision" and revision <= known.get(entity, -1):
                    if previous is None:
                        unseen_slot = True
                    elif previous == value_ids:
                        continue
                cursor.revisions[entity] = max(revision, cursor.revisions.get(entity, revision))
                modified = max((r.modified for r in slot_rows if r.modified), default=None)
                cursor.seen.append((entity, pid, revision, modified.isoformat() if modified else ""))
                seen.add((entity, pid, revision))
            cursor.values[_slot(entity, pid)] = value_ids
            if previous == value_ids or unseen_slot:
                continue  # the entity changed, this slot did not (or the slot was re-read)
            current = [r for r in slot_rows if r.value and (revision is None or r.revision == revision)]
            for row in sorted({r.value: r for r in current}.values(), key=lambda r: r.value or ""):
                facts.append(lookup.row_fact(row))
        if self.mode == "modified":
            stamps = [r.modified for r in rows if r.modified]
            if stamps:
                cursor.modified = max([*stamps, *([cursor.modified] if cursor.modified else [])])
            self._prune(cursor)
        else:
            cursor.seen = []  # revisions alone order the changes in this mode
        return facts

    def _prune(self, cursor: Cursor) -> None:
        # Keys older than the overlap window can never come back from the query.
        if cursor.modified is None:
            return
        horizon = cursor.modified - self.overlap
        cursor.seen = [s for s in cursor.seen
                       if not s[3] or queries.parse_datetime(s[3]) >= horizon]
