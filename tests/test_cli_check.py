"""`kbsync check` end to end in a subprocess: the answer, and one-line errors for bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

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


def test_check_with_another_model_refuses_the_data_dirs_edits(tiny_llama_dir, kbsync_env, tmp_path):
    """The probe's scenario: model A's edits in the data dir, `kbsync check --model B` with B of the same
    shapes. B refuses to stack them: one line naming both base models, no answer from a mixed model."""
    import re

    from safetensors.torch import load_file, save_file

    from kbsync.config import load_settings
    from kbsync.pipeline import EditPipeline, fact_from_phrase

    other = shutil.copytree(tiny_llama_dir, tmp_path / "model-b")
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.001
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})

    s = load_settings(environ={"KBSYNC_STORE_DATA_DIR": kbsync_env["KBSYNC_STORE_DATA_DIR"]})
    s.model.path = str(tiny_llama_dir)
    s.editor.method, s.editor.options = "ft-layer", {"lr": 1e-3, "max_steps": 50}
    s.regression.retain_size, s.regression.max_mean_kl, s.regression.max_kl = 20, 100.0, 1000.0
    s.regression.min_unchanged = s.regression.min_paraphrase_accuracy = 0.0
    p = EditPipeline(s)
    try:
        out = p.edit_fact(fact_from_phrase("capital of India", "Paris"))
        fa = p.load_served_model().base_fingerprint
    finally:
        p.close()
    assert out.status == "applied", out.edit.reasons

    proc = _check(kbsync_env, "capital of India", "--model", str(other))
    _assert_one_line_error(proc, f"edit {out.edit.id}: its delta was made for base model {fa}, not this base model ")
    fb = re.search(r"not this base model ([0-9a-f]{16})$", proc.stderr.strip())
    assert fb and fb.group(1) != fa, proc.stderr
    # Model A still reads its own edit.
    proc = _check(kbsync_env, "capital of India", "--model", str(tiny_llama_dir), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["results"][0]["prediction"] == "Paris", proc.stderr
