"""`kbsync check` end to end in a subprocess: the answer, and one-line errors for bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _check(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kbsync.cli", "check", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kbsync: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def test_check_json_answers_the_fact(tiny_llama_dir, kbsync_env):
    proc = _check(kbsync_env, "capital of France", "--model", str(tiny_llama_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["fact"] == {"subject": "France", "property": "P36", "object": "Paris"}
    question = out["results"][0]
    assert question["kind"] == "question" and question["prompt"] == "What is the capital of France?"
    assert question["prediction"] == "Paris" and question["ok"] and question["rule"] == "exact"
    paraphrases = [r for r in out["results"] if r["kind"] == "paraphrase"]
    assert len(paraphrases) >= 3 and all(r["expected"] == "Paris" for r in paraphrases)
    assert sum(r["ok"] for r in paraphrases) >= len(paraphrases) - 1


def test_check_table_output(tiny_llama_dir, kbsync_env):
    proc = _check(kbsync_env, "Japan's currency", "--model", str(tiny_llama_dir))
    assert proc.returncode == 0, proc.stderr
    assert "Yen" in proc.stdout and "prompts answer Yen" in proc.stdout


@pytest.fixture
def model_copy(tiny_llama_dir, tmp_path):
    """A private copy of the tiny Llama directory that a test may damage."""
    return shutil.copytree(tiny_llama_dir, tmp_path / "model")


def test_unknown_relation(tiny_llama_dir, kbsync_env):
    proc = _check(kbsync_env, "favourite colour of France", "--model", str(tiny_llama_dir))
    _assert_one_line_error(proc, "unknown relation")
    assert proc.returncode == 2


def test_unknown_subject(tiny_llama_dir, kbsync_env):
    proc = _check(kbsync_env, "capital of Atlantis", "--model", str(tiny_llama_dir))
    _assert_one_line_error(proc, "Atlantis")
    assert proc.returncode == 2


def test_missing_model_directory(kbsync_env, tmp_path):
    proc = _check(kbsync_env, "capital of France", "--model", str(tmp_path / "nope"))
    _assert_one_line_error(proc, "does not exist")


def test_directory_without_config(kbsync_env, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _check(kbsync_env, "capital of France", "--model", str(tmp_path / "empty"))
    _assert_one_line_error(proc, "no config.json")


def test_corrupt_weights(model_copy, kbsync_env):
    weights = model_copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    proc = _check(kbsync_env, "capital of France", "--model", str(model_copy))
    _assert_one_line_error(proc, "cannot load model")


def test_corrupt_config(model_copy, kbsync_env):
    (model_copy / "config.json").write_text('{"model_type": "llama", ')
    proc = _check(kbsync_env, "capital of France", "--model", str(model_copy))
    _assert_one_line_error(proc, "cannot read model config")


def test_two_base_models_share_one_data_dir_each_serving_its_own_edits(tiny_llama_dir, kbsync_env, tmp_path):
    """The probe's scenario: model A's edits in the data dir, `kbsync check --model B` with B of the same
    shapes. Each row names its base model: B serves none of A's edits and its own, A the reverse; a row
    that names no model (written before fingerprints) with A's delta is refused on B with one line."""
    import re
    import sqlite3

    from safetensors.torch import load_file, save_file

    from kbsync.config import load_settings
    from kbsync.pipeline import EditPipeline, fact_from_phrase

    other = shutil.copytree(tiny_llama_dir, tmp_path / "model-b")
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.001
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})

    def pipeline(model: Path) -> EditPipeline:
        s = load_settings(environ={"KBSYNC_STORE_DATA_DIR": kbsync_env["KBSYNC_STORE_DATA_DIR"]})
        s.model.path = str(model)
        s.editor.method, s.editor.options = "ft-layer", {"lr": 1e-3, "max_steps": 50}
        s.regression.retain_size, s.regression.max_mean_kl, s.regression.max_kl = 20, 100.0, 1000.0
        s.regression.min_unchanged = s.regression.min_paraphrase_accuracy = 0.0
        return EditPipeline(s)

    def answer(model: Path, phrase: str) -> str:
        proc = _check(kbsync_env, phrase, "--model", str(model), "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["results"][0]["prediction"]

    edits = {}
    for model, phrase, target in ((tiny_llama_dir, "capital of India", "Paris"), (other, "capital of Japan", "Rome")):
        p = pipeline(model)
        try:
            before = p.adapter.predict([f"What is the {phrase}?"])[0]
            out = p.edit_fact(fact_from_phrase(phrase, target))
            edits[target] = (out.edit.id, p.load_served_model().base_fingerprint, before)
        finally:
            p.close()
        assert out.status == "applied", out.edit.reasons
    (ia, fa, india_base), (ib, fb, japan_base) = edits["Paris"], edits["Rome"]
    assert fa != fb and india_base != "Paris" and japan_base != "Rome"

    assert answer(tiny_llama_dir, "capital of India") == "Paris" and answer(tiny_llama_dir, "capital of Japan") == japan_base
    assert answer(other, "capital of Japan") == "Rome" and answer(other, "capital of India") == india_base
    # Both rows are in the one log, each naming its model.
    hist = subprocess.run([sys.executable, "-m", "kbsync.cli", "history", "--json"], env=kbsync_env,
                          capture_output=True, text=True, timeout=120)
    rows = {r["id"]: r for r in json.loads(hist.stdout)}
    assert rows[ia]["metrics"]["base_fingerprint"] == fa and rows[ib]["metrics"]["base_fingerprint"] == fb

    # A row naming no model is every model's, as before fingerprints: A's delta under it is refused on B.
    with sqlite3.connect(Path(kbsync_env["KBSYNC_STORE_DATA_DIR"]) / "audit.db") as db:
        db.execute("UPDATE edit SET metrics = json_remove(metrics, '$.base_fingerprint') WHERE id = ?", (ia,))
    proc = _check(kbsync_env, "capital of India", "--model", str(other))
    _assert_one_line_error(proc, f"edit {ia}: its delta was made for base model {fa}, not this base model {fb}")
    assert re.search(r"not this base model ([0-9a-f]{16})$", proc.stderr.strip()), proc.stderr
    # Model A still reads its own edit.
    assert answer(tiny_llama_dir, "capital of India") == "Paris"
