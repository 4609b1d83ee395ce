"""SparqlClient politeness and failure handling against tiny real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kbsync.kb.local import free_port
from kbsync.kb.sparql import KBError, SparqlClient, parse_retry_after
from kbsync.kb.watch import Cursor, Watcher

GOOD = {"head": {"vars": ["x"]}, "results": {"bindings": [{"x": {"type": "literal", "value": "1"}}]}}

# Each step: (status, headers, body, delay seconds).
Step = tuple[int, dict[str, str], bytes, float]


def ok(body: object = GOOD) -> Step:
    return (200, {"Content-Type": "application/sparql-results+json"}, json.dumps(body).encode(), 0.0)


class Script:
    """A scripted SPARQL endpoint: answers requests with the given steps, the last one forever."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.requests: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0  # most requests in flight at once

    def next(self, headers: dict[str, str]) -> Step:
        with self.lock:
            self.requests.append(headers)
            self.active += 1
            self.peak = max(self.peak, self.active)
            return self.steps[min(len(self.requests), len(self.steps)) - 1]

    def done(self) -> None:
        with self.lock:
            self.active -= 1


@pytest.fixture
def endpoint() -> Iterator[Callable[[list[Step]], tuple[str, Script]]]:
    servers: list[ThreadingHTTPServer] = []

    def make(steps: list[Step]) -> tuple[str, Script]:
        script = Script(steps)

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                status, headers, body, delay = script.next(dict(self.headers))
                try:
                    time.sleep(delay)
                finally:
                    # Out of flight before the answer goes out: a client that waits for each answer can
                    # only send its next request after the body below, and counting the request until
                    # after the write let that next request overlap it on a loaded machine (peak 2 in CI).
                    script.done()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout test)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/sparql", script

    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


class Sleeps(list):
    """Records requested sleeps instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_user_agent_and_plain_success(endpoint) -> None:
    url, script = endpoint([ok()])
    client = SparqlClient(url, user_agent="kbsync-test/1 (https://example.org/contact)")
    assert client.select("SELECT ?x WHERE {}") == GOOD["results"]["bindings"]
    assert script.requests[0]["User-Agent"] == "kbsync-test/1 (https://example.org/contact)"
    assert "kbsync" in SparqlClient(url).user_agent and "http" in SparqlClient(url).user_agent


def test_429_retry_after_seconds_then_success(endpoint) -> None:
    url, script = endpoint([(429, {"Retry-After": "7"}, b"slow down", 0.0), ok()])
    sleeps = Sleeps()
    client = SparqlClient(url, sleep=sleeps, max_retries=3)
    assert client.select("SELECT ?x WHERE {}")[0]["x"]["value"] == "1"
    assert sleeps == [7.0]
    assert len(script.requests) == 2


def test_429_retry_after_http_date(endpoint) -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    url, _ = endpoint([(429, {"Retry-After": format_datetime(when, usegmt=True)}, b"", 0.0), ok()])
    sleeps = Sleeps()
    SparqlClient(url, sleep=sleeps).select("SELECT ?x WHERE {}")
    assert len(sleeps) == 1 and 25 <= sleeps[0] <= 31
    fixed = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("Thu, 01 Jan 2026 00:01:00 GMT", now=fixed) == 60.0
    assert parse_retry_after("Thu, 01 Jan 2025 00:01:00 GMT", now=fixed) == 0.0
    assert parse_retry_after("soon") is None


def test_5xx_backs_off_exponentially_then_succeeds(endpoint) -> None:
    url, script = endpoint([(503, {}, b"busy", 0.0), (500, {}, b"oops", 0.0), (502, {}, b"", 0.0), ok()])
    sleeps = Sleeps()
    client = SparqlClient(url, sleep=sleeps, max_retries=5, backoff_base=2.0)
    assert client.select("SELECT ?x WHERE {}")
    assert len(script.requests) == 4
    # Attempt n waits between half and all of base * 2**n.
    assert [1.0 <= sleeps[0] <= 2.0, 2.0 <= sleeps[1] <= 4.0, 4.0 <= sleeps[2] <= 8.0] == [True] * 3


def test_backoff_is_capped_and_gives_up_with_one_line(endpoint) -> None:
    url, script = endpoint([(503, {}, b"busy", 0.0)])
    sleeps = Sleeps()
    client = SparqlClient(url, sleep=sleeps, max_retries=6, backoff_base=1.0, backoff_cap=5.0)
    with pytest.raises(KBError) as info:
        client.select("SELECT ?x WHERE {}")
    assert len(script.requests) == 7 and len(sleeps) == 6
    assert max(sleeps) <= 5.0
    assert "failed after 7 attempts: HTTP 503" in str(info.value) and "\n" not in str(info.value)


def test_bad_request_is_not_retried(endpoint) -> None:
    url, script = endpoint([(400, {}, b"syntax error\nat line 1", 0.0)])
    with pytest.raises(KBError, match="rejected") as info:
        SparqlClient(url, sleep=Sleeps()).select("SELECT nonsense")
    assert len(script.requests) == 1 and "\n" not in str(info.value)


def test_timeout_is_retried(endpoint) -> None:
    url, script = endpoint([(200, {}, json.dumps(GOOD).encode(), 2.0), ok()])
    sleeps = Sleeps()
    client = SparqlClient(url, timeout=1, sleep=sleeps, max_retries=2, backoff_base=0.5)
    assert client.select("SELECT ?x WHERE {}")
    assert len(script.requests) == 2 and len(sleeps) == 1


def test_connection_refused_is_retried_then_one_line_error() -> None:
    sleeps = Sleeps()
    client = SparqlClient(f"http://127.0.0.1:{free_port()}/query", sleep=sleeps, max_retries=2)
    with pytest.raises(KBError, match="cannot reach endpoint") as info:
        client.ask("ASK {}")
    assert len(sleeps) == 2 and "\n" not in str(info.value)


@pytest.mark.parametrize("mode", ["revision", "modified"])
@pytest.mark.parametrize("body", [b"<html>not json</html>", b'{"head": {}}', b'{"results": {"bindings": 3}}',
                                  b'{"results": {"bindings": [{"value": {"type": "uri", "value": "x"}}]}}'])
def test_malformed_answer_raises_and_keeps_cursor(endpoint, body: bytes, mode: str) -> None:
    url, script = endpoint([(200, {"Content-Type": "application/sparql-results+json"}, body, 0.0)])
    cursor = Cursor(mode=mode, revisions={"GN3355338": 4}, values={"GN3355338|P36": "GN3352136"},
                    modified=datetime(2026, 1, 1, tzinfo=timezone.utc) if mode == "modified" else None)
    watcher = Watcher(SparqlClient(url, sleep=Sleeps()), pairs=[("GN3355338", "P36")], cursor=cursor, mode=mode)
    before = watcher.cursor.to_json()
    with pytest.raises(KBError, match="malformed SPARQL answer") as info:
        watcher.poll()
    assert "\n" not in str(info.value)
    assert watcher.cursor.to_json() == before
    assert len(script.requests) == 1  # a malformed answer is not retried


def test_one_request_at_a_time(endpoint) -> None:
    url, script = endpoint([(200, {}, json.dumps(GOOD).encode(), 0.15)])
    client = SparqlClient(url)
    threads = [threading.Thread(target=client.select, args=("SELECT ?x WHERE {}",)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The server is threaded: it would see three at once if the client sent them.
    assert len(script.requests) == 3 and script.peak == 1
