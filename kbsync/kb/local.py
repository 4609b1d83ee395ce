"""The embedded local KB: an `oxigraph serve` process on 127.0.0.1 holding the snapshot."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from filelock import FileLock

from kbsync.corpus import FactTable
from kbsync.errors import BadInput, KbsyncError
from kbsync.facts import Entity, Fact, get_relation
from kbsync.kb import lookup
from kbsync.kb.snapshot import datetime_literal, en, entity_iri, write_snapshot
from kbsync.kb.sparql import KBError, SparqlClient

HOST = "127.0.0.1"
STATE_FILE = "state.json"


def find_oxigraph() -> str:
    """The oxigraph binary: next to the running Python first (the venv), then on PATH."""
    here = Path(sys.executable).parent / "oxigraph"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("oxigraph")
    if found:
        return found
    raise KbsyncError("oxigraph not found next to Python or on PATH; install it with `pip install oxigraph`")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _death_signal_hook() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when its parent dies (Linux), or None."""
    # The signal fires when the forking *thread* exits, so only the main thread may use it;
    # a KB started from a scheduler thread would otherwise die with that thread.
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: no dlopen after fork
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a crashed test run or daemon leaves no server

    return hook


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie or a recycled pid is not our server.
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return b"oxigraph" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class FactChange:
    """What set_fact did: the subject's old values and the new fact with its revision."""

    old: tuple[Entity, ...]
    new: Fact
    changed: bool


class LocalKB:
    """An oxigraph server over DATA_DIR/store, loaded from the snapshot of a fact table on first use."""

    def __init__(self, data_dir: str | Path, *, table: FactTable | None = None, port: int | None = None,
                 binary: str | None = None, startup_timeout: float = 20.0) -> None:
        self.data_dir = Path(data_dir)
        self.table = table
        self.port = port
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: SparqlClient | None = None

    # Paths and endpoints.
    @property
    def location(self) -> Path:
        """The oxigraph store directory."""
        return self.data_dir / "store"

    @property
    def snapshot_path(self) -> Path:
        """The N-Triples snapshot loaded into a fresh store."""
        return self.data_dir / "snapshot.nt"

    @property
    def state_path(self) -> Path:
        """Where a running server's pid and port are recorded for other kbsync processes."""
        return self.data_dir / STATE_FILE

    @property
    def log_path(self) -> Path:
        """The server's stdout and stderr."""
        return self.data_dir / "oxigraph.log"

    @property
    def endpoint(self) -> str:
        """The SPARQL query endpoint URL."""
        return f"http://{HOST}:{self.port}/query"

    @property
    def update_endpoint(self) -> str:
        """The SPARQL update endpoint URL."""
        return f"http://{HOST}:{self.port}/update"

    # Lifecycle.
    def __enter__(self) -> LocalKB:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def ensure_loaded(self) -> None:
        """Load the snapshot into the store once (a marker records that it was loaded)."""
        marker = self.data_dir / "store.loaded"
        if marker.exists() and self.location.exists():
            return
        from kbsync.corpus import default_fact_table

        table = self.table if self.table is not None else default_fact_table()
        write_snapshot(table, self.snapshot_path)
        if self.location.exists():
            shutil.rmtree(self.location)  # a half-loaded store from an interrupted first use
        proc = subprocess.run(
            [self._binary(), "load", "--location", str(self.location), "--file", str(self.snapshot_path)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise KbsyncError(f"oxigraph load failed: {_last_line(proc.stderr)}")
        digest = hashlib.sha256(self.snapshot_path.read_bytes()).hexdigest()
        marker.write_text(digest + "\n")

    def start(self, detach: bool = False) -> LocalKB:
        """Start the server (loading the snapshot first if needed) and wait until it answers."""
        if self.is_running():
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.data_dir / "kb.lock"), timeout=60):
            other = LocalKB.find_running(self.data_dir)
            if other is not None:
                # Another kbsync process started it meanwhile: use that one.
                self.port, self.pid, self._proc = other.port, other.pid, None
                return self
            self.ensure_loaded()
            fixed = self.port is not None
            for _ in range(1 if fixed else 3):
                port = self.port if fixed else free_port()
                if self._spawn(port, detach):
                    self._write_state()
                    return self
            raise KbsyncError(f"oxigraph serve did not start: {_last_line(self._log_tail())}")

    def _spawn(self, port: int, detach: bool) -> bool:
        """Start one server on port; True once it answers, False if it exited (e.g. port taken)."""
        self.port = port
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self._binary(), "serve", "--location", str(self.location), "--bind", f"{HOST}:{port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=detach, preexec_fn=None if detach else _death_signal_hook(),
            )
        self.pid = self._proc.pid
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if self._answers():
                if detach:
                    self._proc = None  # not ours to wait for: `kb stop` ends it by pid
                return True
            time.sleep(0.05)
        self._terminate(self.pid)
        raise KbsyncError(f"oxigraph serve on port {port} did not answer within {self.startup_timeout:g} s")

    def _answers(self) -> bool:
        url = f"{self.endpoint}?query={quote('ASK {}')}"
        req = urllib.request.Request(url, headers={"Accept": "application/sparql-results+json"})
        try:
            with urllib.request.urlopen(req, timeout=1) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server cleanly (SIGTERM, then SIGKILL after timeout) and remove the state file."""
        if self.pid is not None:
            self._terminate(self.pid, timeout)
        self.pid, self._proc, self._client = None, None, None
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return
        if not _alive(int(state.get("pid", 0)) or -1):
            self.state_path.unlink(missing_ok=True)

    def _terminate(self, pid: int, timeout: float = 10.0) -> None:
        proc = self._proc
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    return
            elif not _alive(pid):
                return
            time.sleep(0.02)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if proc is not None:
            proc.wait()

    def is_running(self) -> bool:
        """Whether this object's server process is alive."""
        if self.pid is None:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        return _alive(self.pid)

    def _write_state(self) -> None:
        state = {"pid": self.pid, "port": self.port, "endpoint": self.endpoint,
                 "update_endpoint": self.update_endpoint, "location": str(self.location),
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_path)

    @classmethod
    def find_running(cls, data_dir: str | Path) -> LocalKB | None:
        """The server another kbsync process started over data_dir, if it is still alive."""
        data_dir = Path(data_dir)
        try:
            state = json.loads((data_dir / STATE_FILE).read_text())
            pid, port = int(state["pid"]), int(state["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not _alive(pid):
            (data_dir / STATE_FILE).unlink(missing_ok=True)  # stale: the server died
            return None
        kb = cls(data_dir, port=port)
        kb.pid = pid
        return kb

    def _binary(self) -> str:
        if self.binary is None:
            self.binary = find_oxigraph()
        return self.binary

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    # Data.
    def client(self, **kwargs: object) -> SparqlClient:
        """A SparqlClient for this server (query and update endpoints); loopback needs few retries."""
        if self.port is None:
            raise KbsyncError("the local KB is not started")
        if kwargs:
            return SparqlClient(self.endpoint, update_endpoint=self.update_endpoint, **kwargs)  # type: ignore[arg-type]
        if self._client is None or self._client.endpoint != self.endpoint:
            self._client = SparqlClient(self.endpoint, update_endpoint=self.update_endpoint,
                                        timeout=10, max_retries=2, backoff_base=0.2)
        return self._client

    def get_facts(self, pid: str, subject_label: str) -> list[Fact]:
        """The current facts for a property of the entity labelled subject_label."""
        return lookup.get_facts(self.client(), pid, subject_label)

    def set_fact(self, pid: str, subject_label: str, object_label: str,
                 when: datetime | None = None) -> FactChange:
        """Replace the subject's pid value(s) by the entity labelled object_label, as a Wikidata edit.

        The object entity is created (with an English label) when no entity has that label.
        The subject's schema:version is bumped and schema:dateModified set to when (now).
        Setting the value it already has is a no-op, as on Wikidata.
        """
        rel = get_relation(pid)
        object_label = " ".join(object_label.split())
        if not object_label:
            raise BadInput(f"empty new value for {rel.label}")
        client = self.client()
        subject = lookup.resolve_entity(client, subject_label, pid, "subject")
        before = lookup.claims(client, [(subject.id, pid)])
        old = tuple(Entity(r.value, r.value_label) for r in before if r.value)
        candidates = lookup.resolve_candidates(client, object_label, pid, "object")
        obj = candidates[0] if candidates else Entity(_new_entity_id(object_label), object_label)
        if [e.id for e in old] == [obj.id]:
            rev = next((r.revision for r in before if r.revision is not None), None)
            fact = Fact(subject, pid, old[0], "" if rev is None else str(rev))
            return FactChange(old, fact, changed=False)
        when = when or datetime.now(timezone.utc)
        client.update(_set_update(subject.id, pid, obj, create=not candidates, when=when))
        after = [r for r in lookup.claims(client, [(subject.id, pid)]) if r.value == obj.id]
        if not after:
            raise KBError(f"the update of {rel.label} of {subject.label} did not take effect")
        return FactChange(old, lookup.row_fact(after[0]), changed=True)


def _new_entity_id(label: str) -> str:
    # Wikidata would mint a fresh Q-id; a label-derived id keeps the local KB reproducible.
    return "KB-" + "_".join(label.split())


def _set_update(subject_id: str, pid: str, obj: Entity, create: bool, when: datetime) -> str:
    s, o, now = f"<{entity_iri(subject_id)}>", f"<{entity_iri(obj.id)}>", datetime_literal(when)
    prefixes = ("PREFIX rdfs: <http://www.w3.org/2000/01/rdf-schema#>\n"
                "PREFIX schema: <http://schema.org/>\n"
                "PREFIX wdt: <http://www.wikidata.org/prop/direct/>\n")
    create_part = (f"INSERT DATA {{ {o} rdfs:label {en(obj.label)} ; schema:version 1 ;"
                   f" schema:dateModified {now} }} ;\n") if create else ""
    # One request, one transaction: the new revision is computed from the stored one.
    return f"""{prefixes}{create_part}DELETE {{ ?s wdt:{pid} ?old . ?s schema:version ?v . ?s schema:dateModified ?m }}
INSERT {{ ?s wdt:{pid} {o} . ?s schema:version ?nv . ?s schema:dateModified {now} }}
WHERE {{
  BIND({s} AS ?s)
  OPTIONAL {{ ?s wdt:{pid} ?old }}
  OPTIONAL {{ ?s schema:version ?v }}
  OPTIONAL {{ ?s schema:dateModified ?m }}
  BIND(COALESCE(?v, 0) + 1 AS ?nv)
}}"""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
