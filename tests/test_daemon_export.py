"""[serve] export_dir: the daemon keeps a Hugging Face export of the served model current after each
applied edit and revert, runs the reload command after each export, and never dies of either failing."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from kbsync.config import load_settings
from kbsync.daemon import Daemon, Exporter, api_token
from kbsync.daemon_client import DaemonClient
from kbsync.errors import BadInput
from kbsync.export import MANIFEST, read_manifest
from tests.test_serve import tiny_settings

QUESTION = "What is the capital of Nigeria?"


def settings(tmp_path: Path, model_dir: Path, reload: str = ""):
    s = tiny_settings(tmp_path, model_dir)
    # Never polled here (no scheduler): edits and reverts come through the API.
    s.kb.endpoint = "http://127.0.0.1:9/sparql"
    s.kb.watchlist = ["Nigeria|P36"]
    s.serve.export_dir = str(tmp_path / "fleet" / "model")
    s.serve.export_reload = reload
    s.serve.export_reload_timeout = 30.0
    return s


def wait_idle(d: Daemon, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not d.exporter.idle():
        assert time.monotonic() < deadline, "the export did not finish"
        time.sleep(0.05)


def exported_ids(path: Path) -> list[int]:
    return [e["id"] for e in read_manifest(path)["edits"]]


def same_weights(export_dir: Path, model: torch.nn.Module) -> bool:
    saved = load_file(str(export_dir / "model.safetensors"))
    state = model.state_dict()
    return all(torch.equal(t, state[k]) for k, t in saved.items()) and len(saved) > 0


def test_daemon_re_exports_after_each_edit_and_revert_and_runs_the_reload_command(
        tmp_path: Path, tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    reloads = tmp_path / "reloads.txt"
    # Records each call, then fails: a failing reload is logged and changes nothing else.
    s = settings(tmp_path, tiny_llama_dir,
                 reload=f'echo "$KBSYNC_EXPORT_EDITS|$KBSYNC_EXPORT_FINGERPRINT|$KBSYNC_EXPORT_DIR" >> {reloads}; '
                        'echo "balancer said no" >&2; exit 3')
    dest = Path(s.serve.export_dir)
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    d = Daemon(s).open()
    try:
        client = DaemonClient(d.api.url, api_token(s))
        wait_idle(d)  # the first export: the served model, no edits yet
        assert exported_ids(dest) == [] and same_weights(dest, d.engine.adapter.model)
        assert all(torch.equal(load_file(str(dest / "model.safetensors"))[k], base[k]) for k in base)
        first = read_manifest(dest)
        assert reloads.read_text().splitlines() == [f"|{first['weights_fingerprint']}|{dest.resolve()}"]
        assert d.exporter.last_reload["ok"] is False and d.exporter.last_reload["exit"] == 3
        assert d.exporter.last_reload["output"] == "balancer said no"

        with caplog.at_level(logging.INFO, logger="kbsync.daemon"):
            out = client.edit(prompt=QUESTION, target="Lagos")
            assert out["status"] == "applied", out
            wait_idle(d)
        assert exported_ids(dest) == [out["edit_id"]]
        assert same_weights(dest, d.engine.adapter.model)
        card = (dest / "README.md").read_text()
        assert f"| {out['edit_id']} |" in card and "Lagos" in card
        assert reloads.read_text().splitlines()[-1].startswith(f"{out['edit_id']}|{read_manifest(dest)['weights_fingerprint']}|")
        messages = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("exported the served model (1 edit(s)") for m in messages)
        assert any(m.startswith("export reload command exited 3") for m in messages)
        assert client.ask(QUESTION) == "Lagos"  # the daemon serves on
        assert client.health()["export"]["edits"] == [out["edit_id"]]

        client.revert(out["edit_id"], reason="test")
        wait_idle(d)
        assert exported_ids(dest) == []
        assert all(torch.equal(load_file(str(dest / "model.safetensors"))[k], base[k]) for k in base)
        assert len(reloads.read_text().splitlines()) == 3
        assert d.exporter.exports == 3 and d.exporter.last_error == ""
    finally:
        d.close()

    # A restart finds the export current: nothing rewritten, no reload.
    before = (dest / MANIFEST).stat().st_mtime_ns
    d = Daemon(s).open()
    try:
        wait_idle(d)
        assert d.exporter.exports == 0 and (dest / MANIFEST).stat().st_mtime_ns == before
        assert len(reloads.read_text().splitlines()) == 3

        # Someone else's files in the export directory: the export fails with a logged line, the
        # files stay, and the daemon keeps editing and serving.
        (dest / MANIFEST).unlink()
        with caplog.at_level(logging.ERROR, logger="kbsync.daemon"):
            out = DaemonClient(d.api.url, api_token(s)).edit(prompt=QUESTION, target="Lagos")
            assert out["status"] == "applied", out
            wait_idle(d)
        assert "not a kbsync export" in d.exporter.last_error
        assert any("export to" in r.getMessage() and "previous export stays" in r.getMessage() for r in caplog.records)
        assert not (dest / MANIFEST).exists() and (dest / "model.safetensors").exists()
        assert DaemonClient(d.api.url, api_token(s)).ask(QUESTION) == "Lagos"
    finally:
        d.close()


def test_a_foreign_export_dir_stops_the_start_with_one_line(tmp_path: Path) -> None:
    s = settings(tmp_path, tmp_path / "no-model-needed")
    dest = Path(s.serve.export_dir)
    dest.mkdir(parents=True)
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match=r"^serve\.export_dir: .* is not empty and is not a kbsync export"):
        Daemon(s).open()
    assert (dest / "notes.txt").read_text() == "mine"


def test_reload_command_timeout_kills_it_and_its_children(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = load_settings(environ={})
    s.serve.export_dir = str(tmp_path / "x")
    marker = tmp_path / "late"
    # A child that outlives the shell would hold the output pipe open: it is killed with the group.
    s.serve.export_reload = f"(sleep 2; touch {marker}) & sleep 5"
    s.serve.export_reload_timeout = 0.5
    ex = Exporter(s, engine=None)
    result = SimpleNamespace(path=tmp_path / "x", edits=[SimpleNamespace(id=4), SimpleNamespace(id=7)],
                             weights_fingerprint="f" * 16)
    start = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="kbsync.daemon"):
        ex.run_reload(result)
    assert time.monotonic() - start < 4
    assert ex.last_reload["ok"] is False and ex.last_reload["exit"] is None
    assert any("timed out after 0.5 s" in r.getMessage() for r in caplog.records)
    time.sleep(2.5)
    assert not marker.exists()

    s.serve.export_reload = 'test "$KBSYNC_EXPORT_EDITS" = "4,7" && echo ok'
    ok = Exporter(s, engine=None)
    ok.run_reload(result)
    assert ok.last_reload["ok"] is True and ok.last_reload["output"] == "ok"


def test_export_settings() -> None:
    serve = load_settings(environ={}).serve
    assert (serve.export_dir, serve.export_reload, serve.export_reload_timeout) == ("", "", 300.0)
    env = {"KBSYNC_SERVE_EXPORT_DIR": "/srv/model", "KBSYNC_SERVE_EXPORT_RELOAD_TIMEOUT": "12"}
    serve = load_settings(environ=env).serve
    assert (serve.export_dir, serve.export_reload_timeout) == ("/srv/model", 12.0)
    with pytest.raises(BadInput, match="serve.export_reload_timeout must be > 0 seconds"):
        load_settings(environ={"KBSYNC_SERVE_EXPORT_RELOAD_TIMEOUT": "0"})
