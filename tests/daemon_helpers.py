"""Scaffolding shared by the daemon tests: a daemon in this process with polls driven by hand (make_daemon),
a daemon as a user runs it (daemon_env, kbsync, write_config), a real oxigraph KB on loopback, and waiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from kbsync.audit import AuditLog, Edit
from kbsync.config import load_settings
from kbsync.daemon import Daemon, api_token, pid_alive, read_state
from kbsync.daemon_client import DaemonClient
from kbsync.kb.local import LocalKB, free_port
from tests.test_serve import tiny_settings

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of Nigeria?"
# ft-layer options (TOML inline tables) for the daemon's edits on the tiny Llama.
FAST = "{ lr = 1e-3, max_steps = 60, check_every = 2 }"
# An edit that never finishes on its own: the test kills the daemon in the middle of it.
ENDLESS = "{ lr = 1e-12, max_steps = 1000000000, check_every = 1000000000 }"


# --- a daemon in this process, polls driven by hand ---------------------------------------------

def make_daemon(tmp_path: Path, model_dir: Path, endpoint: str, **kb_settings: object) -> Daemon:
    """An opened Daemon (no scheduler: call tick()) over tmp_path, watching Nigeria's and Kenya's capitals
    and Japan's currency at endpoint, with fast edits and fast KB retries."""
    s = tiny_settings(tmp_path, model_dir)
    s.kb.endpoint = endpoint
    s.kb.watchlist = ["Nigeria|P36", "Kenya|P36", "GN1861060|P38"]  # the last by id: Japan's currency
    s.kb.timeout, s.kb.max_retries, s.kb.backoff_base = 5, 1, 0.05
    for k, v in kb_settings.items():
        setattr(s.kb, k, v)
    s.daemon.poll_interval = 0.3
    return Daemon(s).open()


@pytest.fixture
def kb(tmp_path: Path) -> Iterator[LocalKB]:
    """A real oxigraph KB (the shipped snapshot) on a free loopback port, stopped afterwards."""
    server = LocalKB(tmp_path / "kb", port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """In-process daemons the test made; closed afterwards."""
    made: list[Daemon] = []
    yield made
    for d in made:
        d.close()


@pytest.fixture
def daemon(tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB, daemons: list[Daemon]) -> Daemon:
    """make_daemon over the tiny Llama and the test's KB, closed afterwards."""
    d = make_daemon(tmp_path, tiny_llama_dir, kb.endpoint)
    daemons.append(d)
    return d


def ask(d: Daemon, question: str = QUESTION) -> str:
    """The answer an in-process daemon serves over its API."""
    return DaemonClient(d.api.url, api_token(d.settings)).ask(question)


# --- the daemon as a user runs it: `kbsync ...` in subprocesses ------------------------------------

def write_config(path: Path, model_dir: Path, options: str, extra: str = "") -> None:
    """A config file: the tiny Llama, a two-fact watchlist, 0.5 s polls, ft-layer with options, a lax
    regression check (tested in test_pipeline); extra is appended (more TOML)."""
    path.write_text(f"""
[model]
path = "{model_dir}"
[kb]
watchlist = ["Nigeria|P36", "Kenya|P36"]
[daemon]
poll_interval = 0.5
jitter = 0.1
method = "ft-layer"
method_options = {options}
start_timeout = 120
stop_timeout = 60
[regression]
retain_size = 20
max_mean_kl = 100.0
max_kl = 1000.0
min_unchanged = 0.0
min_paraphrase_accuracy = 0.0
{extra}""")


def kbsync(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`kbsync ARGS` in a subprocess; its completed process (text stdout/stderr)."""
    return subprocess.run([sys.executable, "-m", "kbsync.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    """check()'s first truthy value, polled every 0.1 s; AssertionError naming what after timeout s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def daemon_env(tmp_path: Path, model_dir: Path, options: str = FAST, **extra: str) -> Iterator[dict[str, str]]:
    """An environment for `kbsync` subprocesses: data dir tmp_path/data, config tmp_path/kbsync.toml
    (write_config with options), no other KBSYNC_ settings, plus extra variables. Afterwards a daemon left
    running (a failed test) is killed and the local KB it started stopped."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KBSYNC_")}
    environ.update(KBSYNC_STORE_DATA_DIR=str(tmp_path / "data"), KBSYNC_CONFIG=str(tmp_path / "kbsync.toml"),
                   PYTHONPATH=str(REPO), TRANSFORMERS_VERBOSITY="error", **extra)
    write_config(tmp_path / "kbsync.toml", model_dir, options)
    try:
        yield environ
    finally:
        settings = load_settings(environ=environ)
        state = read_state(settings)
        if state.get("pid") and pid_alive(int(state["pid"])):
            os.kill(int(state["pid"]), signal.SIGKILL)
        found = LocalKB.find_running(settings.store.data_path / "kb")
        if found is not None:
            found.stop()


def daemon_rows(env: dict[str, str], source: str = "daemon") -> list[Edit]:
    """Audit rows of one source (the daemon's own by default), newest first."""
    with AuditLog.open(load_settings(environ=env).store.db_url) as audit:
        return [e for e in audit.history(limit=None) if e.source == source]


# --- weights --------------------------------------------------------------------------------------

def weights(adapter: Any) -> dict[str, torch.Tensor]:
    """A copy of an adapter's model's state dict."""
    return {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit for bit the same tensors under the same names."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
