"""`kbsync editor train`, `kbsync eval` and `kbsync editor figure` end to end on the tiny Llama."""

from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def kbsync(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # A wide terminal so rich does not wrap the table's column titles.
    return subprocess.run([sys.executable, "-m", "kbsync.cli", *args], cwd=ROOT, env={**env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=600)


def test_train_resume_eval_and_figure(tiny_llama_dir, kbsync_env, tmp_path):
    out = tmp_path / "editor"
    small = ["--model", str(tiny_llama_dir), "--data", "facts", "--batch", "2", "--lstm-hidden", "16",
             "--cond-dim", "32", "--out", str(out)]
    first = kbsync(kbsync_env, "editor", "train", *small, "--steps", "2")
    assert first.returncode == 0, first.stderr
    assert (out / "editor.safetensors").exists() and json.loads((out / "trainer.json").read_text())["step"] == 2
    # Resumed on other targets: the model's own beam alternatives (the weights carry over either way).
    again = kbsync(kbsync_env, "editor", "train", *small, "--steps", "3", "--targets", "beam", "--label-smoothing", "0")
    assert again.returncode == 0, again.stderr
    assert "resuming from step 2" in again.stdout
    from safetensors import safe_open

    with safe_open(str(out / "editor.safetensors"), "pt") as f:  # the editor reads unsmoothed gradients from now on
        assert json.loads(f.metadata()["config"])["label_smoothing"] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    bad = kbsync(kbsync_env, "editor", "train", *small, "--targets", "sampled")
    assert bad.returncode != 0 and "use data or beam" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = kbsync(kbsync_env, "editor", "train", *small, "--label-smoothing", "1")
    assert bad.returncode == 2 and "must be in [0, 1)" in bad.stderr, bad.stderr

    report = tmp_path / "eval.json"
    ev = kbsync(kbsync_env, "eval", "--model", str(tiny_llama_dir), "--data", "facts", "--limit", "3",
                "--method", "ke", "--method", "ft-layer", "--ft-lr", "1e-3", "--editor", str(out / "editor.safetensors"),
                "--json", str(report), "--gold", "4")
    assert ev.returncode == 0, ev.stderr
    written = json.loads(report.read_text())
    rows = {r["method"]: r for r in written["rows"]}
    assert written["gold"] == 4 and written["gold_known"]  # 4 pairs the tiny model answers correctly
    assert set(rows) == {"ke", "ft-layer"} and rows["ft-layer"]["n"] == 3
    assert rows["ft-layer"]["success_em"] == 1.0  # lr 1e-3 flips every tiny-model fact within 100 steps
    assert "success (EM)" in ev.stdout and "retain acc" in ev.stdout
    # --resume of a finished run edits nothing more and keeps its rows; other settings are refused.
    same = kbsync(kbsync_env, "eval", *ev.args[4:], "--resume")
    assert same.returncode == 0 and json.loads(report.read_text())["rows"] == written["rows"], same.stderr
    other = kbsync(kbsync_env, "eval", *[a if a != "3" else "2" for a in ev.args[4:]], "--resume")
    assert other.returncode == 2 and "other settings (limit)" in other.stderr, other.stderr
    from safetensors.torch import load_file, save_file

    ck = out / "editor.safetensors"  # the editor retrained in place between two sessions of a run
    with safe_open(str(ck), "pt") as f:
        meta = f.metadata()
    weights = load_file(str(ck))
    weights["encoder.lstm.bias_hh_l0"] = weights["encoder.lstm.bias_hh_l0"] + 0.5
    save_file(weights, str(ck), metadata=meta)
    changed = kbsync(kbsync_env, "eval", *ev.args[4:], "--resume")
    assert changed.returncode == 2 and "other settings (editor_sha256)" in changed.stderr, changed.stderr

    # --sequential: the same edits stacked, the end state scored.
    seq = kbsync(kbsync_env, "eval", "--model", str(tiny_llama_dir), "--data", "facts", "--limit", "3",
                 "--method", "ft-layer", "--ft-lr", "1e-3", "--sequential", "--json", str(tmp_path / "seq.json"),
                 "--state-dir", str(tmp_path / "state"), "--checkpoints", "2", "--plot", str(tmp_path / "curves.png"))
    assert seq.returncode == 0, seq.stderr
    import matplotlib.image

    png = matplotlib.image.imread(tmp_path / "curves.png")  # the four panels' axes and the method's lines drawn
    assert png.shape[1] > 3 * png.shape[0] and png.std() > 0.05 and f"curves: {tmp_path / 'curves.png'}" in seq.stdout
    stacked = json.loads((tmp_path / "seq.json").read_text())
    assert stacked["run"]["sequential"] and stacked["rows"][0]["success_em"] == 1.0, stacked
    assert 0 <= stacked["rows"][0]["kept_em"] <= 1 and "kept at end (EM)" in seq.stdout, seq.stdout
    assert [c["edits"] for c in stacked["rows"][0]["curve"]] == [2, 3]
    # --state-dir kept every applied delta: a rerun replays them and scores the same end state.
    saved = tmp_path / "state" / "ft-layer"
    assert sorted(p.name for p in saved.glob("*.safetensors")) == ["00000.safetensors", "00001.safetensors", "00002.safetensors"]
    again = kbsync(kbsync_env, "eval", *seq.args[4:])
    assert again.returncode == 0, again.stderr
    rerun = json.loads((tmp_path / "seq.json").read_text())["rows"][0]
    assert {k: rerun[k] for k in ("kept_em", "retain_acc", "latency_s")} == {k: stacked["rows"][0][k] for k in ("kept_em", "retain_acc", "latency_s")}

    png = tmp_path / "fig4.png"
    fig = kbsync(kbsync_env, "editor", "figure", "--model", str(tiny_llama_dir), "--limit", "2", "--out", str(png),
                 "--method", "ke", "--method", "ft-all", "--editor", str(out / "editor.safetensors"), "--ft-lr", "1e-3")
    assert fig.returncode == 0, fig.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "beta_hat spread across edits" in fig.stdout, fig.stdout


def test_eval_bad_data_is_one_line(tiny_llama_dir, kbsync_env, tmp_path):
    bad = kbsync(kbsync_env, "eval", "--model", str(tiny_llama_dir), "--data", f"zsre:{tmp_path / 'nope.json'}")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "does not exist" in bad.stderr


def test_eval_refuses_an_unwritable_json_path_before_editing(tiny_llama_dir, kbsync_env, tmp_path):
    """--json that cannot be written is a one-line error up front, not after the first method."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = kbsync(kbsync_env, "eval", "--model", str(tiny_llama_dir), "--data", "facts", "--limit", "1",
                 "--method", "ft-layer", "--json", str(blocker / "out.json"))
    assert bad.returncode == 2 and "cannot write there" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "success (EM)" not in bad.stdout
    neg = kbsync(kbsync_env, "eval", "--model", str(tiny_llama_dir), "--data", "facts", "--gold", "-1")
    assert neg.returncode == 2 and "--gold -1: must be 0 or more" in neg.stderr, neg.stderr
    alone = kbsync(kbsync_env, "eval", "--model", str(tiny_llama_dir), "--data", "facts", "--resume")
    assert alone.returncode == 2 and "--resume needs --json" in alone.stderr, alone.stderr
    both = kbsync(kbsync_env, "eval", "--model", str(tiny_llama_dir), "--data", "facts", "--sequential", "--resume",
                  "--json", str(tmp_path / "s.json"))
    assert both.returncode == 2 and "a --sequential run carries on from --state-dir" in both.stderr, both.stderr
    loose = kbsync(kbsync_env, "eval", "--model", str(tiny_llama_dir), "--data", "facts", "--consolidate-every", "5")
    assert loose.returncode == 2 and "options of --sequential runs" in loose.stderr, loose.stderr
    drawn = kbsync(kbsync_env, "eval", "--model", str(tiny_llama_dir), "--data", "facts", "--plot", str(tmp_path / "c.png"))
    assert drawn.returncode == 2 and "options of --sequential runs" in drawn.stderr, drawn.stderr
    svg = kbsync(kbsync_env, "eval", "--model", str(tiny_llama_dir), "--data", "facts", "--sequential",
                 "--plot", str(tmp_path / "c.svg"))
    assert svg.returncode == 2 and "give a file ending in .png" in svg.stderr, svg.stderr
    ft = kbsync(kbsync_env, "eval", "--model", str(tiny_llama_dir), "--data", "facts", "--limit", "2", "--sequential",
                "--method", "gated", "--consolidate-every", "5")
    assert ft.returncode == 2 and "method gated cannot consolidate" in ft.stderr, ft.stderr
    assert len(ft.stderr.strip().splitlines()) == 1 and "kept at end" not in ft.stdout
    (tmp_path / "junk.json").write_text('{"rows": []}')
    junk = kbsync(kbsync_env, "eval", "--model", str(tiny_llama_dir), "--data", "facts", "--resume",
                  "--json", str(tmp_path / "junk.json"))
    assert junk.returncode == 2 and "is not a run kbsync eval saved" in junk.stderr, junk.stderr
    assert len(junk.stderr.strip().splitlines()) == 1


def test_eval_passes_per_method_options_and_refuses_bad_ones(tiny_llama_dir, kbsync_env, tmp_path):
    """--option METHOD:KEY=VALUE reaches that method (and the saved run); a malformed one, a method not
    run and an option the method does not have are one-line errors."""
    base = ["eval", "--model", str(tiny_llama_dir), "--data", "facts", "--limit", "1", "--gold", "0", "--method", "ft-layer"]
    for spec, needle in (("ft-layer", "expected METHOD:KEY=VALUE"),
                         ("gated:v_steps=3", "gated is not one of the methods run (ft-layer)"),
                         ("ft-layer:no_such_option=1", "no_such_option")):
        bad = kbsync(kbsync_env, *base, "--option", spec)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and needle in bad.stderr, bad.stderr
    out = tmp_path / "run.json"
    ok = kbsync(kbsync_env, *base, "--option", "ft-layer:max_steps=2", "--option", "ft-layer:lr=0.001", "--json", str(out))
    assert ok.returncode == 0, ok.stderr
    saved = json.loads(out.read_text())
    assert saved["run"]["options"] == {"ft-layer": {"max_steps": 2, "lr": 0.001}}
    assert 1 <= saved["rows"][0]["steps"] <= 2, saved["rows"][0]


def test_editor_stats_computes_verifies_and_rebuilds(tiny_llama_dir, kbsync_env, tmp_path):
    cfg = tmp_path / "kbsync.toml"
    cfg.write_text('[editor]\nmethod = "alphaedit"\n[editor.options.alphaedit]\nstats_tokens = 2000\nprefixes = 0\n'
                   'layers = [0]\n')
    env = {**kbsync_env, "KBSYNC_STORE_CACHE_DIR": str(tmp_path / "cache")}
    args = ("editor", "stats", "--model", str(tiny_llama_dir), "--config", str(cfg))
    first = kbsync(env, *args)
    assert first.returncode == 0, first.stderr
    files = sorted((tmp_path / "cache" / "stats").glob("*/*.safetensors"))
    assert [f.name for f in files] == ["model.layers.0.mlp.down_proj.t2000.v1.safetensors"]
    assert "null space" in first.stdout
    stamp = files[0].stat().st_mtime_ns
    again = kbsync(env, *args)  # verified and reused, not recomputed
    assert again.returncode == 0 and files[0].stat().st_mtime_ns == stamp, again.stderr
    data = bytearray(files[0].read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the covariance
    files[0].write_bytes(bytes(data))
    bad = kbsync(env, *args)
    assert bad.returncode != 0 and "checksum" in bad.stderr and files[0].name in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    fixed = kbsync(env, *args, "--rebuild")
    assert fixed.returncode == 0, fixed.stderr
    none = kbsync(env, "editor", "stats", "--model", str(tiny_llama_dir), "--method", "ft-layer")
    assert none.returncode != 0 and "keeps no statistics" in none.stderr
