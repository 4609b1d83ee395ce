"""(property, entity class) watches: wdt:P31 in the snapshot, class expansion and restriction, config."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbsync.config import Settings
from kbsync.corpus import FactTable, default_fact_table
from kbsync.daemon import Daemon, parse_classes
from kbsync.errors import BadInput, NotFound
from kbsync.facts import Entity, Fact
from kbsync.kb import lookup
from kbsync.kb.local import LocalKB
from kbsync.kb.snapshot import snapshot_triples
from kbsync.kb.watch import Cursor, Watcher

NS = "http://www.wikidata.org/"
NAMIBIA, WINDHOEK = "GN3355338", "GN3352136"
KENYA, NAIROBI = "GN192950", "GN184745"


def test_snapshot_says_what_is_a_country_and_what_is_a_city() -> None:
    lines = snapshot_triples(default_fact_table())
    p31 = f"<{NS}prop/direct/P31>"
    assert f"<{NS}entity/{NAMIBIA}> {p31} <{NS}entity/CLASS-country> ." in lines
    assert f"<{NS}entity/{WINDHOEK}> {p31} <{NS}entity/CLASS-city> ." in lines
    assert f"<{NS}entity/{NAMIBIA}> {p31} <{NS}entity/CLASS-city> ." not in lines
    label = "<http://www.w3.org/2000/01/rdf-schema#label>"
    assert f'<{NS}entity/CLASS-country> {label} "country"@en .' in lines
    assert f'<{NS}entity/CLASS-city> {label} "city"@en .' in lines


def small_table() -> FactTable:
    namibia, windhoek = Entity(NAMIBIA, "Namibia"), Entity(WINDHOEK, "Windhoek")
    kenya, nairobi = Entity(KENYA, "Kenya"), Entity(NAIROBI, "Nairobi")
    return FactTable([
        Fact(namibia, "P36", windhoek), Fact(windhoek, "P1376", namibia), Fact(windhoek, "P17", namibia),
        Fact(namibia, "P38", Entity("ISO4217-NAD", "Dollar", ("NAD",))),
        Fact(kenya, "P36", nairobi), Fact(nairobi, "P1376", kenya), Fact(nairobi, "P17", kenya),
        Fact(kenya, "P38", Entity("ISO4217-KES", "Shilling", ("KES",))),
    ])


@pytest.fixture()
def kb(tmp_path: Path):
    with LocalKB(tmp_path / "kb", table=small_table()) as server:
        yield server


def test_class_by_label_or_id(kb: LocalKB) -> None:
    client = kb.client()
    assert lookup.resolve_class(client, "country") == "CLASS-country"
    assert lookup.resolve_class(client, "City") == "CLASS-city"
    for given in ("CLASS-country", "Q6256", "Q515"):  # ids pass through unresolved
        assert lookup.resolve_class(client, given) == given
    with pytest.raises(NotFound, match="no entity labelled 'planet'"):
        lookup.resolve_class(client, "planet")


@pytest.mark.parametrize("mode", ["revision", "modified"])
def test_class_watch_reports_an_instance_edit_once(kb: LocalKB, mode: str) -> None:
    client = kb.client()
    country, city = lookup.resolve_class(client, "country"), lookup.resolve_class(client, "CLASS-city")
    watched = Watcher(client, classes=[("P36", country)], mode=mode)
    paged = Watcher(client, classes=[("P36", country)], mode=mode, page_size=1)  # one row per query
    # Merged with a watchlist pair that the class already covers: still reported once.
    merged = Watcher(client, pairs=[(NAMIBIA, "P36"), (KENYA, "P38")], classes=[("P36", country)], mode=mode)
    others = [Watcher(client, classes=[("P38", country)], mode=mode),   # another property
              Watcher(client, classes=[("P17", city)], mode=mode),      # another class
              Watcher(client, classes=[("P36", city)], mode=mode)]      # no city has a capital
    if mode == "revision":
        assert watched.watched_pairs() == [(KENYA, "P36"), (NAMIBIA, "P36")]
        assert merged.watched_pairs() == [(NAMIBIA, "P36"), (KENYA, "P38"), (KENYA, "P36")]
        assert paged.watched_pairs() == watched.watched_pairs()
        assert others[2].watched_pairs() == []
    for w in (watched, paged, merged, *others):
        w.prime()
        assert w.poll() == []
    change = kb.set_fact("P36", "Namibia", "Windhoek2")
    assert change.changed
    assert watched.poll() == [change.new]
    assert paged.poll() == [change.new]
    assert merged.poll() == [change.new]
    assert change.new.subject.id == NAMIBIA and change.new.object.label == "Windhoek2"
    for w in (watched, paged, merged, *others):
        assert w.poll() == []
    # The cursor format is unchanged: it round-trips and resumes.
    resumed = Watcher(client, classes=[("P36", country)], mode=mode,
                      cursor=Cursor.from_json(watched.cursor.to_json()))
    assert resumed.poll() == []


def test_a_class_without_instances_is_a_warning(kb: LocalKB, caplog: pytest.LogCaptureFixture) -> None:
    for mode in ("revision", "modified"):
        caplog.clear()
        Watcher(kb.client(), classes=[("P38", "Q6256")], mode=mode).prime()  # a Wikidata id: not local
        assert "no instance of Q6256 has P38" in caplog.text


def test_classes_config_entries() -> None:
    assert parse_classes(["P36|country", "p38 | Q6256", "P17|CLASS-city"]) == [
        ("P36", "country"), ("P38", "Q6256"), ("P17", "CLASS-city")]
    for bad in ["country|P36", "P36", "P36|", "|country", "36|country"]:
        with pytest.raises(BadInput) as info:
            parse_classes([bad])
        assert "\n" not in str(info.value) and "property|class" in str(info.value)


def test_daemon_checks_classes_and_allows_them_alone(tmp_path: Path) -> None:
    s = Settings()
    s.store.data_dir = str(tmp_path)
    s.kb.watchlist, s.kb.classes = [], ["P36|country"]
    Daemon(s).check_settings()  # classes alone are something to watch
    s.kb.classes = ["P9999|country"]
    with pytest.raises(NotFound, match="P9999"):
        Daemon(s).check_settings()
    s.kb.classes = ["capital|country"]
    with pytest.raises(BadInput, match="classes entry 'capital|country'"):
        Daemon(s).check_settings()


def test_daemon_builds_a_class_watcher(kb: LocalKB, tmp_path: Path) -> None:
    s = Settings()
    s.store.data_dir = str(tmp_path)
    s.kb.watchlist, s.kb.classes = [], ["P36|country", "P17|CLASS-city", "P38|planet"]
    d = Daemon(s)
    d.client = kb.client()
    assert d._watch_classes() == [("P36", "CLASS-country"), ("P17", "CLASS-city")]  # planet: skipped
