"""The local oxigraph KB, the snapshot, set_fact and the watcher against a real server on loopback."""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from kbsync.corpus import FactTable, default_fact_table
from kbsync.errors import KbsyncError, NotFound
from kbsync.facts import Entity, Fact
from kbsync.kb import lookup
from kbsync.kb.local import LocalKB, find_oxigraph
from kbsync.kb.snapshot import entity_id, entity_iri, snapshot_triples, write_snapshot
from kbsync.kb.sparql import KBError
from kbsync.kb.watch import Cursor, Watcher

NAMIBIA = "GN3355338"
WINDHOEK = "GN3352136"


@pytest.fixture(scope="module")
def kb(tmp_path_factory: pytest.TempPathFactory):
    started = time.monotonic()
    with LocalKB(tmp_path_factory.mktemp("kb")) as server:
        server.startup_seconds = time.monotonic() - started
        yield server


def no_sleep(_: float) -> None:
    """Retries in tests do not wait."""


def test_snapshot_is_deterministic_and_wikidata_shaped(tmp_path: Path) -> None:
    table = default_fact_table()
    lines = snapshot_triples(table)
    assert lines == snapshot_triples(table)
    a = write_snapshot(table, tmp_path / "a.nt").read_bytes()
    b = write_snapshot(table, tmp_path / "b.nt").read_bytes()
    assert a == b
    ns = "http://www.wikidata.org/"
    assert (f"<{ns}entity/{NAMIBIA}> <{ns}prop/direct/P36> <{ns}entity/{WINDHOEK}> .") in lines
    assert f'<{ns}entity/{NAMIBIA}> <http://www.w3.org/2000/01/rdf-schema#label> "Namibia"@en .' in lines
    assert (f'<{ns}entity/{NAMIBIA}> <http://schema.org/version> '
            f'"1"^^<http://www.w3.org/2001/XMLSchema#integer> .') in lines
    assert any(line.startswith(f"<{ns}entity/{NAMIBIA}> <http://schema.org/dateModified> "
                               '"2024-01-01T00:00:00Z"^^') for line in lines)


def test_entity_iri_round_trips_odd_ids() -> None:
    for raw in ("GN3355338", "GNX-IO-Diego Garcia", "TZ-America/New_York", "ISO4217-NAD"):
        iri = entity_iri(raw)
        assert " " not in iri and "/New_York" not in iri
        assert entity_id(iri) == raw


def test_starts_fast_and_answers_capital_of_namibia(kb: LocalKB) -> None:
    assert kb.startup_seconds < 10
    facts = lookup.get_facts(kb.client(), "P36", "Namibia")
    assert [(f.subject.id, f.object.label, f.revision) for f in facts] == [(NAMIBIA, "Windhoek", "1")]


def test_state_file_lets_another_process_find_it(kb: LocalKB) -> None:
    found = LocalKB.find_running(kb.data_dir)
    assert found is not None
    assert (found.pid, found.port) == (kb.pid, kb.port)
    assert found.endpoint == kb.endpoint


def test_resolve_prefers_entity_with_the_property(kb: LocalKB) -> None:
    # "Singapore" names both a country and a city; the capital question is about the country.
    country = lookup.resolve_entity(kb.client(), "singapore", "P36", "subject")
    city = lookup.resolve_entity(kb.client(), "Singapore", "P17", "subject")
    assert country.id != city.id
    with pytest.raises(NotFound, match="no entity labelled 'Atlantis'"):
        lookup.resolve_entity(kb.client(), "Atlantis", "P36")


def test_set_fact_bumps_revision_and_watcher_reports_it_once(kb: LocalKB) -> None:
    watcher = Watcher(kb.client(), pairs=[(NAMIBIA, "P36"), (NAMIBIA, "P30"), ("GN2921044", "P36")])
    watcher.prime()
    assert watcher.poll() == []
    before = int(kb.get_facts("P36", "Namibia")[0].revision)
    change = kb.set_fact("P36", "Namibia", "Okahandja")
    assert change.changed and [e.label for e in change.old] == ["Windhoek"]
    assert change.new.object == Entity("KB-Okahandja", "Okahandja")
    assert int(change.new.revision) == before + 1
    changed = watcher.poll()
    # Only the edited slot, though the entity's revision covers its other claims too.
    assert changed == [change.new]
    assert watcher.poll() == []
    # Setting the value it already has is no edit at all.
    again = kb.set_fact("P36", "Namibia", "Okahandja")
    assert not again.changed and again.new.revision == change.new.revision
    assert watcher.poll() == []
    back = kb.set_fact("P36", "Namibia", "windhoek")  # existing entity, found case-insensitively
    assert back.new.object.id == WINDHOEK
    assert watcher.poll() == [back.new]


def test_set_fact_errors_are_one_line(kb: LocalKB) -> None:
    with pytest.raises(NotFound, match="unknown relation P9999"):
        kb.set_fact("P9999", "Namibia", "Windhoek")
    with pytest.raises(NotFound) as info:
        kb.set_fact("P36", "Atlantis", "Poseidonis")
    assert "\n" not in str(info.value)
    with pytest.raises(KbsyncError, match="empty new value for capital"):
        kb.set_fact("P36", "Namibia", "  ")


def test_modified_cursor_with_overlap_catches_late_edits_once(kb: LocalKB) -> None:
    watcher = Watcher(kb.client(), properties=["P36"], mode="modified", overlap=timedelta(minutes=5))
    cursor = watcher.prime()
    assert cursor.modified is not None and watcher.poll() == []
    first = kb.set_fact("P36", "Kenya", "Mombasa")
    second = kb.set_fact("P36", "Ghana", "Kumasi")  # most likely within the same second
    assert sorted(watcher.poll(), key=lambda f: f.subject.id) == sorted([first.new, second.new],
                                                                         key=lambda f: f.subject.id)
    assert watcher.poll() == []
    # An edit stamped before the cursor (clock skew, replication lag) but inside the window.
    late = kb.set_fact("P36", "Kenya", "Nairobi", when=watcher.cursor.modified - timedelta(minutes=2))
    assert watcher.poll() == [late.new]
    assert watcher.poll() == []


def test_revision_cursor_round_trips_json_and_resumes(kb: LocalKB) -> None:
    pairs = [("GN2921044", "P36")]  # Germany
    watcher = Watcher(kb.client(), pairs=pairs)
    watcher.prime()
    stored = watcher.cursor.to_json()
    change = kb.set_fact("P36", "Germany", "Bonn")
    resumed = Watcher(kb.client(), pairs=pairs, cursor=Cursor.from_json(stored))
    assert resumed.poll() == [change.new]
    assert Cursor.from_json(resumed.cursor.to_json()) == resumed.cursor
    with pytest.raises(KbsyncError, match="mode 'revision'"):
        Watcher(kb.client(), properties=["P36"], mode="modified", cursor=Cursor.from_json(stored))


def test_unprimed_revision_watcher_reports_current_facts(kb: LocalKB) -> None:
    facts = Watcher(kb.client(), pairs=[("GN3469034", "P38")]).poll()  # Brazil's currency
    assert [f.object.label for f in facts] == ["Real"]
    assert facts[0].revision == "1"


def small_table() -> FactTable:
    fr, de, it = Entity("GN3017382", "France"), Entity("GN2921044", "Germany"), Entity("GN3175395", "Italy")
    return FactTable([
        Fact(fr, "P36", Entity("GN2988507", "Paris")),
        Fact(de, "P36", Entity("GN2950159", "Berlin")),
        Fact(it, "P36", Entity("GN3169070", "Rome")),
    ])


def test_server_killed_then_restarted_loses_no_fact(tmp_path: Path) -> None:
    with LocalKB(tmp_path / "kb", table=small_table()) as server:
        client = server.client(max_retries=1, sleep=no_sleep, timeout=5)
        watcher = Watcher(client, pairs=[("GN3017382", "P36"), ("GN2921044", "P36"), ("GN3175395", "P36")])
        watcher.prime()
        a = server.set_fact("P36", "France", "Lyon")
        os.kill(server.pid, signal.SIGKILL)
        while server.is_running():
            time.sleep(0.01)
        cursor = watcher.cursor.to_json()
        with pytest.raises(KBError, match="failed after 2 attempts") as info:
            watcher.poll()
        assert "\n" not in str(info.value)
        assert watcher.cursor.to_json() == cursor
        assert LocalKB.find_running(server.data_dir) is None  # stale state is noticed
        server.start()  # same store, same port
        b = server.set_fact("P36", "Italy", "Milan")
        assert sorted(watcher.poll(), key=lambda f: f.subject.id) == [a.new, b.new]
        assert watcher.poll() == []
    assert not server.is_running()


def test_missing_oxigraph_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KbsyncError, match="oxigraph not found"):
        find_oxigraph()


def test_an_edit_between_two_queries_of_one_poll_is_not_lost(kb: LocalKB) -> None:
    """A poll reads an entity's slots in different queries (one per batch of pairs). An edit of one slot
    landing between them showed the poll the entity's new revision through another slot with the old
    value in this one; the next poll then skipped the slot as 'not newer' and the change was never
    reported (the daemon's sync benchmark lost Nigeria -> Lagos that way)."""
    client = kb.client()
    pairs = [(NAMIBIA, "P36"), (NAMIBIA, "P30")]  # batch size 1: the two slots in two queries
    watcher = Watcher(client, pairs=pairs, batch_size=1)
    watcher.prime()
    real_select = client.select
    calls = []

    def select(query: str) -> list:
        calls.append(query)
        out = real_select(query)
        if len(calls) == 1:  # after the capital was read, before the continent is
            kb.set_fact("P36", "Namibia", "Rundu")
        return out

    client.select = select  # type: ignore[method-assign]
    try:
        assert watcher.poll() == []  # this poll read the capital before the edit
    finally:
        client.select = real_select  # type: ignore[method-assign]
    [fact] = watcher.poll()  # the next one reports it, though the entity's revision was already seen
    assert (fact.subject.id, fact.object.label) == (NAMIBIA, "Rundu")
    assert watcher.poll() == []
    kb.set_fact("P36", "Namibia", "windhoek")
