"""The daemon's HTTP API over a real tiny Llama, a real SQLite audit log and delta store, on loopback."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kbsync.audit import AuditLog
from kbsync.config import ServeConfig, Settings, load_settings
from kbsync.daemon_client import DaemonClient
from kbsync.edit_engine import Engine, ModelLock
from kbsync.errors import BadInput, NotFound
from kbsync.api import ApiServer
from kbsync.served import model_fingerprint
from kbsync.store import DeltaStore

TOKEN = "test-token"
FAST_FT = {"lr": 1e-3, "max_steps": 60, "check_every": 2}


def tiny_settings(tmp_path: Path, model_dir: Path) -> Settings:
    """Settings over tmp_path with the tiny Llama and a fine-tuning method that flips in a few steps."""
    s = load_settings(environ={})
    s.model.path = str(model_dir)
    s.store.data_dir = str(tmp_path / "data")
    # The regression check itself is tested in test_pipeline; here it only must not block edits.
    s.regression.retain_size = 20
    s.regression.max_mean_kl, s.regression.max_kl, s.regression.min_unchanged = 100.0, 1000.0, 0.0
    s.regression.min_paraphrase_accuracy = 0.0
    s.daemon.method = "ft-layer"
    s.daemon.method_options = dict(FAST_FT)
    return s


def call(url: str, method: str = "GET", body: Any = None, token: str | None = None) -> tuple[int, dict[str, Any]]:
    """One HTTP request; (status, JSON body) also for error statuses."""
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def api(tmp_path: Path, tiny_llama_dir: Path) -> Iterator[ApiServer]:
    settings = tiny_settings(tmp_path, tiny_llama_dir)
    audit = AuditLog.open(settings.store.db_url)
    engine = Engine.load(settings, audit, DeltaStore(settings.store.data_path))
    server = ApiServer(engine, audit, TOKEN).start()
    yield server
    server.stop()
    audit.close()


def ask(url: str, question: str) -> str:
    status, out = call(f"{url}/v1/chat/completions", "POST", {"messages": [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]})
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    return out["choices"][0]["message"]["content"]


def test_health_and_completions_answer_from_the_model(api: ApiServer) -> None:
    status, health = call(f"{api.url}/health")
    assert status == 200 and health["status"] == "ok" and health["model"]
    assert api.host == "127.0.0.1" and api.port > 0
    assert ask(api.url, "What is the capital of Nigeria?") == "Abuja"
    status, out = call(f"{api.url}/v1/completions", "POST",
                       {"prompt": ["Question: What is the capital of Kenya?\nAnswer:", "Question: What is the capital of Japan?\nAnswer:"]})
    assert status == 200 and out["object"] == "text_completion"
    assert [c["text"] for c in out["choices"]] == ["Nairobi", "Tokyo"]


def test_mutating_endpoints_need_the_token(api: ApiServer) -> None:
    body = {"phrase": "capital of Nigeria", "target": "Lagos"}
    assert call(f"{api.url}/edits", "POST", body)[0] == 401
    assert call(f"{api.url}/edits", "POST", body, token="wrong")[0] == 401
    assert call(f"{api.url}/edits/1/revert", "POST", {})[0] == 401
    # Nothing was edited or logged.
    assert call(f"{api.url}/edits")[1]["edits"] == []
    assert ask(api.url, "What is the capital of Nigeria?") == "Abuja"


def test_edit_list_revert_through_the_api(api: ApiServer) -> None:
    status, out = call(f"{api.url}/edits", "POST", {"phrase": "capital of Nigeria", "target": "Lagos"}, token=TOKEN)
    assert status == 200, out
    assert out["status"] == "applied" and out["before"] == "Abuja" and out["after"] == "Lagos"
    assert ask(api.url, "What is the capital of Nigeria?") == "Lagos"
    assert ask(api.url, "What is the capital of Kenya?") == "Nairobi"

    edits = call(f"{api.url}/edits")[1]["edits"]
    assert [(e["id"], e["status"], e["source"], e["object_label"]) for e in edits] == [(out["edit_id"], "applied", "api", "Lagos")]
    status, one = call(f"{api.url}/edits/{out['edit_id']}")
    assert status == 200 and one["delta_sha256"] and one["sequence"] == 1

    status, rev = call(f"{api.url}/edits/{out['edit_id']}/revert", "POST", {}, token=TOKEN)
    assert status == 200 and rev["status"] == "revert"
    assert ask(api.url, "What is the capital of Nigeria?") == "Abuja"
    statuses = [e["status"] for e in call(f"{api.url}/edits?limit=10")[1]["edits"]]
    assert statuses == ["revert", "reverted"]
    # Reverting twice is a user error, not a crash.
    status, err = call(f"{api.url}/edits/{out['edit_id']}/revert", "POST", {}, token=TOKEN)
    assert status == 400 and "only applied edits" in err["error"]["message"]


def test_an_edit_that_fell_back_reports_its_earlier_attempts(api: ApiServer) -> None:
    """The daemon's answer names the methods of the fallback list tried first (kbsync edit prints them)."""
    s = api.engine.pipeline.settings
    s.editor.method, s.editor.fallback = "zhu", ["ft-layer"]
    # zhu held to no change never takes; fine-tuning then does.
    s.editor.options = {"zhu": {"linf": 0.0, "max_steps": 2, "lr": 1e-3}, "ft-layer": dict(FAST_FT)}
    status, out = call(f"{api.url}/edits", "POST", {"phrase": "capital of Nigeria", "target": "Lagos"}, token=TOKEN)
    assert status == 200 and out["status"] == "applied" and out["method"] == "ft-layer", out
    [zhu] = out["earlier_attempts"]
    assert zhu["method"] == "zhu" and zhu["reasons"][-1] == "falling back to ft-layer", zhu
    assert call(f"{api.url}/edits/{zhu['id']}")[1]["status"] == "rejected"


def test_client_edits_a_prompt_and_reports_errors(api: ApiServer) -> None:
    client = DaemonClient(api.url, TOKEN)
    out = client.edit(prompt="What is the capital of Japan?", target="Osaka")
    assert out["status"] == "applied"
    assert client.ask("What is the capital of Japan?") == "Osaka"
    noop = client.edit("capital of Japan", "Osaka", batch="0a1b2c")
    assert noop["status"] == "noop" and client.edit_row(noop["edit_id"])["metrics"]["batch"] == "0a1b2c"
    with pytest.raises(BadInput, match="batch id 'Robert; drop' must be 1-32 lower-case hex digits"):
        client.edit("capital of Japan", "Kyoto", batch="Robert; drop")
    # Per-request method options reach the method: a learning rate this small cannot flip anything.
    stuck = client.edit("capital of Kenya", "Mombasa", options={"lr": 1e-12, "max_steps": 2, "check_every": 1},
                        dry_run=True)
    assert stuck["status"] == "rejected" and stuck["edit_id"] is None
    assert [e["status"] for e in client.edits()] == ["noop", "applied"]  # the dry run wrote nothing
    with pytest.raises(NotFound):
        client.revert(999)
    with pytest.raises(BadInput, match="target"):
        client.edit("capital of Japan", "  ")


def test_bad_requests_are_json_errors(api: ApiServer) -> None:
    assert call(f"{api.url}/v1/completions", "POST", b"{not json")[0] == 400
    assert call(f"{api.url}/v1/chat/completions", "POST", {"messages": []})[0] == 400
    assert call(f"{api.url}/v1/completions", "POST", {"prompt": 3})[0] == 400
    status, err = call(f"{api.url}/nope")
    assert status == 404 and "no endpoint" in err["error"]["message"]
    assert call(f"{api.url}/edits/abc")[0] == 404
    status, err = call(f"{api.url}/edits", "POST", {"phrase": "mayor of Nigeria", "target": "X"}, token=TOKEN)
    assert status == 404 and "unknown relation" in err["error"]["message"]


# --- request limits and the model lock ------------------------------------------------------

LIMITS = ServeConfig(max_prompts=2, max_prompt_chars=50, max_target_chars=10, max_tokens=4)
KENYA = "Question: What is the capital of Kenya?\nAnswer:"


@pytest.fixture
def limited(api: ApiServer) -> Iterator[ApiServer]:
    """A second server over the same engine with small [serve] limits."""
    server = ApiServer(api.engine, api.audit, TOKEN, limits=LIMITS).start()
    yield server
    server.stop()


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/completions", {"prompt": [KENYA] * 3}, 413, "'prompt' has 3 prompts; the limit is 2 per request (serve.max_prompts)"),
    ("/v1/completions", {"prompt": "x" * 51}, 413, "'prompt' has 51 characters; the limit is 50 (serve.max_prompt_chars)"),
    ("/v1/completions", {"prompt": [KENYA, "y" * 60]}, 413, "prompt 1 has 60 characters; the limit is 50 (serve.max_prompt_chars)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "z" * 51}]}, 413,
     "the last user message has 51 characters; the limit is 50 (serve.max_prompt_chars)"),
    ("/v1/completions", {"prompt": KENYA, "max_tokens": 5}, 400, "'max_tokens' is 5; the limit is 4 (serve.max_tokens)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "What is the capital of Kenya?"}], "max_tokens": 99},
     400, "'max_tokens' is 99; the limit is 4 (serve.max_tokens)"),
    # Types are the schema's (OpenAPI): a string or a boolean is not a token count, whatever it spells.
    ("/v1/completions", {"prompt": KENYA, "max_tokens": 0}, 400, "'max_tokens': Input should be greater than or equal to 1"),
    ("/v1/completions", {"prompt": KENYA, "max_tokens": "3"}, 400, "'max_tokens': Input should be a valid integer"),
    ("/v1/completions", {"prompt": KENYA, "max_tokens": True}, 400, "'max_tokens': Input should be a valid integer"),
    ("/edits", {"phrase": "capital of Nigeria", "target": "L" * 11}, 413, "'target' has 11 characters; the limit is 10 (serve.max_target_chars)"),
    ("/edits", {"phrase": "capital of " + "N" * 60, "target": "Lagos"}, 413, "'phrase' has 71 characters; the limit is 50 (serve.max_prompt_chars)"),
    ("/edits", {"prompt": "Q" * 51, "target": "Lagos"}, 413, "'prompt' has 51 characters; the limit is 50 (serve.max_prompt_chars)"),
])
def test_requests_over_the_serve_limits_are_4xx_naming_the_setting(limited: ApiServer, path: str, body: dict,
                                                                   status: int, message: str) -> None:
    got, err = call(f"{limited.url}{path}", "POST", body, token=TOKEN)
    assert (got, err["error"]["message"]) == (status, message)
    assert err["error"]["type"] == "invalid_request_error"  # OpenAI's error shape
    assert call(f"{limited.url}/edits")[1]["edits"] == []  # nothing was edited or recorded


def test_requests_within_the_limits_are_answered_and_max_tokens_applies(limited: ApiServer) -> None:
    # The tiny Llama answers " Nairobi" as two tokens, a space and the word: one token is only the space.
    status, out = call(f"{limited.url}/v1/completions", "POST", {"prompt": [KENYA, KENYA], "max_tokens": 1})
    assert status == 200 and [c["text"] for c in out["choices"]] == ["", ""], out
    status, out = call(f"{limited.url}/v1/completions", "POST", {"prompt": KENYA, "max_tokens": 2})
    assert status == 200 and out["choices"][0]["text"] == "Nairobi", out
    # The request's max_tokens was its own: the next request gets the configured length again.
    assert call(f"{limited.url}/v1/completions", "POST", {"prompt": KENYA})[1]["choices"][0]["text"] == "Nairobi"
    assert limited.engine.adapter.max_new_tokens == 12
    # A client of the daemon gets the 413 as a one-line BadInput.
    with pytest.raises(BadInput, match=r"^'target' has 11 characters; the limit is 10 \(serve.max_target_chars\)$"):
        DaemonClient(limited.url, TOKEN).edit("capital of Nigeria", "L" * 11)


def test_default_limits_refuse_the_probes_500_prompts(api: ApiServer) -> None:
    status, err = call(f"{api.url}/v1/completions", "POST", {"prompt": [KENYA] * 500})
    assert status == 413 and err["error"]["message"].endswith("the limit is 16 per request (serve.max_prompts)")
    status, err = call(f"{api.url}/edits", "POST", {"phrase": "capital of Nigeria", "target": "x" * 99_000}, token=TOKEN)
    assert status == 413 and "(serve.max_target_chars)" in err["error"]["message"]


def test_the_model_lock_is_first_come_first_served_and_reentrant() -> None:
    lock = ModelLock()
    order: list[str] = []

    def take(name: str) -> None:
        with lock:
            order.append(name)

    lock.acquire()
    with lock:  # re-entrant for its holder
        pass
    waiters = []
    for name in ("first", "second"):
        t = threading.Thread(target=take, args=(name,))
        t.start()
        waiters.append(t)
        deadline = time.monotonic() + 30
        while len(lock._queue) < len(waiters) and time.monotonic() < deadline:
            time.sleep(0.005)
    assert len(lock._queue) == 2
    # The holder releasing and taking it again at once (an edit between phases) goes behind both.
    lock.release()
    with lock:
        order.append("again")
    for t in waiters:
        t.join(30)
    assert order == ["first", "second", "again"]
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()


SLOW_DRY_EDIT = {"phrase": "capital of Kenya", "target": "Mombasa", "dry_run": True,
                 # A learning rate this small never flips the answer: every step runs, nothing is written.
                 "options": {"lr": 1e-12, "max_steps": 300, "check_every": 300}}


def test_generation_waits_for_one_edit_phase_not_for_queued_edits(api: ApiServer) -> None:
    """Three edits queued; a completion sent meanwhile is answered before the second edit ends (FIFO model
    lock, taken by edits per phase). With one lock held per edit it waited for all three."""
    finished: list[float] = []

    def edit() -> None:
        status, out = call(f"{api.url}/edits", "POST", SLOW_DRY_EDIT, token=TOKEN)
        assert status == 200 and out["status"] == "rejected", out
        finished.append(time.monotonic())

    start = time.monotonic()
    edits = [threading.Thread(target=edit) for _ in range(3)]
    for t in edits:
        t.start()
    while api.requests < 3:
        time.sleep(0.01)
    time.sleep(0.2)
    sent = time.monotonic()
    status, out = call(f"{api.url}/v1/completions", "POST", {"prompt": KENYA})
    answered = time.monotonic()
    done_by_then = len(finished)
    for t in edits:
        t.join(300)
    assert status == 200 and out["choices"][0]["text"] == "Nairobi"
    # The edit in progress when it was sent may finish first; the two queued behind it may not.
    assert done_by_then <= 1, (done_by_then, answered - sent, [f - start for f in finished])
    assert len(finished) == 3


def test_generation_never_reads_half_edited_weights(api: ApiServer) -> None:
    """Weights read under the model lock while an edit runs are the base or the edited ones, nothing between,
    and the lock is free between the edit's phases (several reads during one edit)."""
    model = api.engine.adapter.model
    before = model_fingerprint(model)
    seen: list[tuple[float, str]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            with api.engine.model_lock:
                seen.append((time.monotonic(), model_fingerprint(model)))
            time.sleep(0.001)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        start = time.monotonic()
        status, out = call(f"{api.url}/edits", "POST", {"phrase": "capital of Nigeria", "target": "Lagos"}, token=TOKEN)
        end = time.monotonic()
    finally:
        stop.set()
        reader.join(30)
    assert status == 200 and out["status"] == "applied", out
    after = model_fingerprint(model)
    assert after != before
    assert {fp for _, fp in seen} <= {before, after}
    during = [fp for t, fp in seen if start < t < end]
    assert len(during) >= 3, len(during)
    assert ask(api.url, "What is the capital of Nigeria?") == "Lagos"


def test_a_gated_edit_through_the_api_answers_in_chat_and_reverts(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The daemon's served model fires a gated edit in chat completions (the subject inside a chat
    template, behind a system message), leaves other countries' answers alone, and drops it on revert."""
    settings = tiny_settings(tmp_path, tiny_llama_dir)
    settings.daemon.method, settings.daemon.method_options = "gated", {"embeddings": True, "prefixes": 0}
    audit = AuditLog.open(settings.store.db_url)
    server = ApiServer(Engine.load(settings, audit, DeltaStore(settings.store.data_path)), audit, TOKEN).start()
    try:
        before = ask(server.url, "What is the capital of India?")
        status, out = call(f"{server.url}/edits", "POST", {"phrase": "capital of India", "target": "Paris"}, token=TOKEN)
        assert status == 200 and out["status"] == "applied" and out["method"] == "gated", out
        assert ask(server.url, "What is the capital of India?") == "Paris"
        assert ask(server.url, "What is the capital of Kenya?") == "Nairobi"
        # Consolidated in the daemon: the served model is base + the one delta, answering the same.
        assert call(f"{server.url}/consolidate", "POST", {})[0] == 401
        status, err = call(f"{server.url}/consolidate", "POST", {"without": [99]}, token=TOKEN)
        assert status == 400 and "edit 99 is not an applied edit" in err["error"]["message"]
        status, con = call(f"{server.url}/consolidate", "POST", {"reason": "test"}, token=TOKEN)
        assert status == 200 and con["status"] == "consolidation" and con["consolidates"] == [out["edit_id"]], con
        assert server.engine.pipeline.load_served_model().edit_ids == [con["id"]]
        assert ask(server.url, "What is the capital of India?") == "Paris"
        # Reverting the consolidated edit is a consolidation without it.
        status, _ = call(f"{server.url}/edits/{out['edit_id']}/revert", "POST", {}, token=TOKEN)
        assert status == 200 and ask(server.url, "What is the capital of India?") == before
    finally:
        server.stop()
        audit.close()
