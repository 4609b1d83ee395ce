"""Daemon fault tests in-process, polls driven by hand: a real oxigraph KB (killed, throttled, garbled
through a loopback proxy), a real tiny Llama and a real SQLite audit log."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kbsync.daemon import Daemon, parse_watchlist, read_state
from kbsync.daemon.core import next_clock_time
from kbsync.errors import BadInput
from kbsync.kb.local import LocalKB
from kbsync.retain import BaseCache
from tests.daemon_helpers import ask, daemons, kb, make_daemon  # noqa: F401 (kb, daemons: fixtures)


class FlakyProxy:
    """A SPARQL endpoint on loopback that forwards to the real KB, or answers 429 / garbage on demand."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rsplit("/", 1)[0]
        self.mode = "pass"  # pass | malformed | not-json
        self.throttle = 0  # answer this many requests with 429 first
        self.retry_after = "1"
        self.requests: list[tuple[float, int]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                proxy.requests.append((time.monotonic(), status))
                self.send_response(status)
                for k, v in {"Content-Type": "application/sparql-results+json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method: str) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
                if proxy.throttle > 0:
                    proxy.throttle -= 1
                    return self._reply(429, b"slow down", {"Retry-After": proxy.retry_after})
                if proxy.mode == "malformed":
                    return self._reply(200, b'{"head": {"vars": []}, "results": {"bindings": "oops"}}')
                if proxy.mode == "not-json":
                    return self._reply(200, b"<html>maintenance</html>")
                req = urllib.request.Request(proxy.upstream + self.path, data=data, method=method)
                for h in ("Content-Type", "Accept"):
                    if self.headers.get(h):
                        req.add_header(h, self.headers[h])
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        return self._reply(r.status, r.read(), {"Content-Type": r.headers.get("Content-Type", "")})
                except urllib.error.HTTPError as e:
                    return self._reply(e.code, e.read())

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}/query"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxy(kb: LocalKB) -> Iterator[FlakyProxy]:
    p = FlakyProxy(kb.endpoint)
    yield p
    p.close()


def daemon_edits(d: Daemon) -> list:
    return [e for e in d.audit.history(limit=None) if e.source == "daemon"]


def wait_backoff(d: Daemon) -> None:
    while time.monotonic() < d.backoff_until:
        time.sleep(0.05)


def test_watchlist_entries_are_checked() -> None:
    assert parse_watchlist(["Namibia|P36", "GN1861060|p38"]) == [("Namibia", "P36"), ("GN1861060", "P38")]
    for bad in ("Namibia", "Namibia|capital", "|P36"):
        with pytest.raises(BadInput, match="subject\\|property"):
            parse_watchlist([bad])


def test_sparql_server_killed_mid_run_backs_off_and_catches_up(
        tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB, daemons: list[Daemon], caplog: pytest.LogCaptureFixture) -> None:
    d = make_daemon(tmp_path, tiny_llama_dir, kb.endpoint)
    daemons.append(d)
    first = d.tick()
    assert first is not None and first.facts == 0 and first.committed  # primed: nothing to edit yet
    assert len(d.watcher.pairs) == 3

    kb.set_fact("P36", "Nigeria", "Lagos")
    os.kill(kb.pid, signal.SIGKILL)  # the change is in the store; the server dies before the daemon sees it
    kb._proc.wait()
    with caplog.at_level(logging.WARNING, logger="kbsync.daemon"):
        assert d.tick() is None
    assert d.failures == 1 and "failed after 2 attempts" in d.last_error
    assert any("poll failed (1 in a row)" in r.getMessage() for r in caplog.records)
    polls = d.polls
    assert d.tick() is None and d.polls == polls  # backing off: no request at all
    first_backoff = read_state(d.settings)["backoff_s"]
    wait_backoff(d)
    assert d.tick() is None and d.failures == 2
    assert read_state(d.settings)["backoff_s"] > first_backoff  # exponential
    assert ask(d) == "Abuja"

    LocalKB(kb.data_dir, port=kb.port).start()  # the server comes back, same store
    wait_backoff(d)
    result = d.tick()
    assert result is not None and result.outcomes == {"applied": 1}
    assert d.failures == 0 and d.last_error == ""
    assert ask(d) == "Lagos"
    [edit] = daemon_edits(d)
    assert (edit.status, edit.subject_label, edit.object_label, edit.kb_revision) == ("applied", "Nigeria", "Lagos", "2")
    LocalKB.find_running(kb.data_dir).stop()


def test_daemon_restarts_its_own_local_kb(tmp_path: Path, tiny_llama_dir: Path, daemons: list[Daemon]) -> None:
    d = make_daemon(tmp_path, tiny_llama_dir, "local")
    daemons.append(d)
    assert d.owns_kb and d.tick() is not None
    d.kb.set_fact("P36", "Nigeria", "Lagos")
    os.kill(d.kb.pid, signal.SIGKILL)
    d.kb._proc.wait()
    assert d.tick() is None and d.failures == 1  # fails, then brings the KB back for the next poll
    assert LocalKB.find_running(d.kb.data_dir) is not None
    wait_backoff(d)
    result = d.tick()
    assert result is not None and result.outcomes == {"applied": 1}
    assert ask(d) == "Lagos"


def test_429_retry_after_is_honoured(tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB, proxy: FlakyProxy,
                                     daemons: list[Daemon]) -> None:
    d = make_daemon(tmp_path, tiny_llama_dir, proxy.endpoint, max_retries=3)
    daemons.append(d)
    assert d.tick() is not None
    kb.set_fact("P36", "Nigeria", "Lagos")
    proxy.requests.clear()
    proxy.throttle, proxy.retry_after = 2, "1"
    started = time.monotonic()
    result = d.tick()
    assert result is not None and result.outcomes == {"applied": 1}
    assert time.monotonic() - started >= 2.0
    statuses = [s for _, s in proxy.requests]
    assert statuses[:3] == [429, 429, 200]
    gaps = [b - a for (a, _), (b, _) in zip(proxy.requests, proxy.requests[1:3])]
    assert all(g >= 0.95 for g in gaps), gaps  # waited as told, not the 0.05 s backoff
    assert ask(d) == "Lagos"

    # Throttled past the retries: the poll fails, the daemon backs off, nothing is lost.
    kb.set_fact("P36", "Nigeria", "Abuja")
    proxy.throttle, proxy.retry_after = 10, "0"
    assert d.tick() is None and "429" in d.last_error
    proxy.throttle = 0
    wait_backoff(d)
    result = d.tick()
    assert result is not None and result.outcomes == {"applied": 1}
    assert ask(d) == "Abuja"
    assert [e.kb_revision for e in daemon_edits(d)] == ["3", "2"]


def test_malformed_answers_keep_the_cursor_and_edit_nothing(tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB,
                                                            proxy: FlakyProxy, daemons: list[Daemon]) -> None:
    d = make_daemon(tmp_path, tiny_llama_dir, proxy.endpoint)
    daemons.append(d)
    assert d.tick() is not None
    before = d.cursors.load(d.cursor_name).to_json()
    kb.set_fact("P36", "Nigeria", "Lagos")
    for mode, message in (("malformed", "no results.bindings list"), ("not-json", "not JSON")):
        proxy.mode = mode
        proxy.requests.clear()
        wait_backoff(d)
        assert d.tick() is None
        assert "malformed SPARQL answer" in d.last_error and message in d.last_error
        assert len(proxy.requests) == 1  # a garbled answer is not retried in a loop
        assert d.cursors.load(d.cursor_name).to_json() == before
        assert daemon_edits(d) == []
    proxy.mode = "pass"
    wait_backoff(d)
    result = d.tick()
    assert result is not None and result.outcomes == {"applied": 1}
    assert d.cursors.load(d.cursor_name).to_json() != before
    assert ask(d) == "Lagos"
    # A second poll sees no change and makes no second edit.
    again = d.tick()
    assert again is not None and again.facts == 0
    assert len(daemon_edits(d)) == 1


def test_cursor_survives_restart(tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB, daemons: list[Daemon]) -> None:
    d = make_daemon(tmp_path, tiny_llama_dir, kb.endpoint)
    assert d.tick() is not None
    d.close()
    kb.set_fact("P36", "Nigeria", "Lagos")  # changed while no daemon runs
    d2 = make_daemon(tmp_path, tiny_llama_dir, kb.endpoint)
    daemons.append(d2)
    assert d2.cursors.load(d2.cursor_name) is not None
    result = d2.tick()
    assert result is not None and result.outcomes == {"applied": 1}  # caught up, not re-primed past it
    assert ask(d2) == "Lagos"
    assert json.loads(d2.paths.state.read_text())["daemon_edits"] == {"applied": 1}


def test_modified_mode_watches_whole_properties(tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB,
                                                daemons: list[Daemon]) -> None:
    d = make_daemon(tmp_path, tiny_llama_dir, kb.endpoint, mode="modified", watchlist=[], properties=["P36"])
    daemons.append(d)
    primed = d.tick()
    assert primed is not None and primed.facts == 0  # every capital already in the KB is taken as is
    assert d.cursor_name == f"modified@{kb.endpoint}"
    kb.set_fact("P36", "Nigeria", "Lagos")  # not in any watchlist: found through the property
    result = d.tick()
    assert result is not None and result.outcomes == {"applied": 1}
    assert ask(d) == "Lagos"
    again = d.tick()
    assert again is not None and again.facts == 0  # inside the overlap window, but already seen


def test_warming_the_retain_cache_yields_to_the_next_poll(tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB,
                                                         daemons: list[Daemon]) -> None:
    """Warming runs at most one poll interval (at least one chunk) after a poll, so a KB change arriving
    meanwhile is polled; the next poll's warming goes on where it stopped."""
    d = make_daemon(tmp_path, tiny_llama_dir, kb.endpoint)
    daemons.append(d)
    settings = d.engine.pipeline.settings  # the engine's own copy
    settings.regression.retain_size = 100  # several chunks
    cache = d.engine.pipeline.retain_cache = BaseCache()  # empty (open() warmed the 20 configured ones)
    start = cache.misses
    d.settings.daemon.poll_interval = 1e-9  # the next poll is due at once: one chunk, then its turn
    d._warm()
    first = cache.misses - start
    assert first == 4  # one chunk
    d.settings.daemon.poll_interval = 600.0
    d._warm()
    rest = cache.misses - start
    assert rest == 100  # the remaining chunks, not the first again
    d._warm()
    assert cache.misses - start == rest  # warm: nothing left to compute


def test_the_changes_one_poll_finds_are_one_batch(tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB,
                                                 daemons: list[Daemon]) -> None:
    """Two KB changes seen by one poll: each its own audit row, linked by one batch id (kbsync history --batch);
    a poll with one change has no batch. With daemon.consolidate_every = 1 the poll that applied an edit
    consolidates what it applied (a daemon row, serving the same answers); later edits stack on top of it."""
    d = make_daemon(tmp_path, tiny_llama_dir, kb.endpoint)
    d.settings.daemon.consolidate_every = 1
    daemons.append(d)
    assert d.tick() is not None  # primed
    kb.set_fact("P36", "Nigeria", "Lagos")
    kb.set_fact("P36", "Kenya", "Mombasa")
    result = d.tick()
    assert result is not None and result.facts == 2
    applied = [e for e in d.audit.history(status="applied", limit=None)]
    folded = d.audit.history(status="consolidation", limit=None)
    assert applied and len(folded) == 1 and folded[0].source == "daemon", [(e.id, e.status, e.reasons) for e in d.audit.history()]
    assert folded[0].metrics["consolidates"] == sorted(e.id for e in applied)
    for e in applied:  # served from the one consolidated delta now
        assert ask(d, e.question) == e.object_label
    rows = [e for e in d.audit.history(limit=None) if e.source == "daemon" and e.method != "consolidate"]
    batches = {e.subject_label: e.metrics.get("batch") for e in rows}
    assert set(batches) == {"Nigeria", "Kenya"} and len(set(batches.values())) == 1 and batches["Kenya"]
    assert {e.id for e in d.audit.history(batch=batches["Kenya"], limit=None)} == {e.id for e in rows}
    kb.set_fact("P36", "Nigeria", "Abuja")
    assert d.tick() is not None
    newest = [e for e in d.audit.history(limit=None) if e.source == "daemon"][0]
    assert newest.object_label == "Abuja" and "batch" not in newest.metrics
    later = [e.id for e in d.audit.history(status="applied", limit=None) if e.id > folded[0].id]
    assert d.engine.pipeline.load_served_model().edit_ids[0] == folded[0].id
    assert d.engine.pipeline.load_served_model().edit_ids[1:] == sorted(later)


def test_the_daemon_consolidates_at_a_scheduled_time_of_day(tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB,
                                                            daemons: list[Daemon]) -> None:
    """daemon.consolidate_at = ["03:00"]: the first poll from 03:00 UTC on consolidates what stacks (a daemon
    row whose reason names the slot), the next slot is a day later, and a slot with nothing new stacked writes
    nothing; before the slot a poll only edits."""
    from datetime import datetime, timezone

    d = make_daemon(tmp_path, tiny_llama_dir, kb.endpoint)
    daemons.append(d)
    d.settings.daemon.consolidate_at = ["03:00"]
    now = datetime(2026, 12, 1, 2, 50, tzinfo=timezone.utc)
    d.clock = lambda: now
    d.next_consolidation = next_clock_time(d.settings.daemon.consolidate_at, now)
    assert d.next_consolidation == datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)
    assert next_clock_time(["15:30", "03:00"], datetime(2026, 12, 1, 15, 30, tzinfo=timezone.utc)) == \
        datetime(2026, 12, 2, 3, 0, tzinfo=timezone.utc)
    assert next_clock_time([], now) is None
    assert d.tick() is not None  # primed
    kb.set_fact("P36", "Nigeria", "Lagos")
    assert d.tick().outcomes == {"applied": 1}
    assert d.audit.history(status="consolidation", limit=None) == []
    assert d.summary()["next_consolidation"] == "2026-12-01T03:00:00+00:00"
    now = datetime(2026, 12, 1, 3, 4, tzinfo=timezone.utc)
    assert d.tick() is not None
    folded = d.audit.history(status="consolidation", limit=None)
    assert len(folded) == 1 and folded[0].source == "daemon", [(e.id, e.status, e.reasons) for e in d.audit.history()]
    assert folded[0].metrics["reason"] == "daemon.consolidate_at 03:00 UTC"
    assert ask(d, "What is the capital of Nigeria?") == "Lagos"
    assert d.next_consolidation == datetime(2026, 12, 2, 3, 0, tzinfo=timezone.utc)
    now = datetime(2026, 12, 2, 3, 1, tzinfo=timezone.utc)  # nothing stacked since: no row
    assert d.tick() is not None
    assert [e.id for e in d.audit.history(status="consolidation", limit=None)] == [folded[0].id]
    assert d.next_consolidation == datetime(2026, 12, 3, 3, 0, tzinfo=timezone.utc)


def test_a_polls_changes_are_one_gated_update(tmp_path: Path, tiny_llama_dir: Path, kb: LocalKB,
                                              daemons: list[Daemon]) -> None:
    """With the gated method, the two changes one poll finds are proposed on one model and judged together:
    each applied as its own row and delta (metrics.joint = 2, one batch id), both answered, each revertible."""
    from tests.test_serve import tiny_settings

    s = tiny_settings(tmp_path, tiny_llama_dir)
    s.kb.endpoint, s.kb.watchlist = kb.endpoint, ["India|P36", "Peru|P36"]
    s.kb.timeout, s.kb.max_retries, s.kb.backoff_base = 5, 1, 0.05
    s.daemon.poll_interval = 0.3
    s.daemon.method, s.daemon.method_options = "gated", {"embeddings": True, "prefixes": 0}
    d = Daemon(s).open()
    daemons.append(d)
    assert d.tick() is not None  # primed
    peru = ask(d, "What is the capital of Peru?")
    kb.set_fact("P36", "India", "Paris")
    kb.set_fact("P36", "Peru", "Tokyo")
    result = d.tick()
    assert result is not None and result.outcomes == {"applied": 2}, [(e.method, e.reasons, e.metrics.get("joint")) for e in d.audit.history()]
    rows = d.audit.history(status="applied", limit=None)
    assert {e.subject_label for e in rows} == {"India", "Peru"}
    assert all(e.method == "gated" and e.metrics["joint"] == 2 for e in rows), [e.metrics for e in rows]
    assert len({e.metrics["batch"] for e in rows}) == 1 and len({e.delta_path for e in rows}) == 2
    assert ask(d, "What is the capital of India?") == "Paris" and ask(d, "What is the capital of Peru?") == "Tokyo"
    d.engine.revert(next(e.id for e in rows if e.subject_label == "Peru"))
    assert ask(d, "What is the capital of Peru?") == peru and ask(d, "What is the capital of India?") == "Paris"
