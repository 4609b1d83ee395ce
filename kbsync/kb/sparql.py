"""A polite SPARQL client over SPARQLWrapper: one request at a time, retries, strict parsing."""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import socket
import threading
import time
import urllib.error
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from SPARQLWrapper import JSON, POST, SPARQLWrapper
from SPARQLWrapper.SPARQLExceptions import EndPointInternalError, SPARQLWrapperException

from kbsync.errors import KbsyncError

DEFAULT_USER_AGENT = "kbsync/0.1 (https://example.org/kbsync; kbsync@example.org) SPARQLWrapper/2.0"
# Queries longer than this go by POST: long VALUES lists overflow URL limits.
MAX_GET_QUERY = 2000


class KBError(KbsyncError):
    """The knowledge base could not be queried or answered something unusable."""


class _Retryable(Exception):
    """A failure worth retrying, with an optional server-requested delay."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SparqlClient:
    """Run SPARQL SELECT/ASK queries and updates against one endpoint, politely."""

    def __init__(
        self,
        endpoint: str,
        user_agent: str = DEFAULT_USER_AGENT,
        timeout: float = 60,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        update_endpoint: str | None = None,
        *,
        backoff_cap: float = 60.0,
        max_retry_after: float = 600.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.update_endpoint = update_endpoint
        self.user_agent = user_agent
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_retry_after = max_retry_after
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.requests = 0
        self._lock = threading.Lock()

    def select(self, query: str) -> list[dict[str, Any]]:
        """The bindings of a SELECT query, each as {var: {"type", "value", ...}}."""
        data = self._request(query, update=False)
        results = data.get("results") if isinstance(data, dict) else None
        bindings = results.get("bindings") if isinstance(results, dict) else None
        if not isinstance(bindings, list) or not all(isinstance(b, dict) for b in bindings):
            raise KBError(f"malformed SPARQL answer from {self.endpoint}: no results.bindings list")
        return bindings

    def ask(self, query: str) -> bool:
        """The boolean answer of an ASK query."""
        data = self._request(query, update=False)
        if not isinstance(data, dict) or not isinstance(data.get("boolean"), bool):
            raise KBError(f"malformed SPARQL answer from {self.endpoint}: no boolean")
        return data["boolean"]

    def update(self, update: str) -> None:
        """Run a SPARQL UPDATE on the update endpoint."""
        if not self.update_endpoint:
            raise KBError(f"SPARQL endpoint {self.endpoint} is read-only (no update endpoint)")
        self._request(update, update=True)

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter (half to all of the step) for the given retry attempt (0-based), capped."""
        ceiling = min(self.backoff_cap, self.backoff_base * (2 ** attempt))
        return self.rng.uniform(ceiling / 2, ceiling)

    def _request(self, text: str, update: bool) -> Any:
        # One request at a time per client: Wikidata asks bots not to run queries in parallel.
        with self._lock:
            last = ""
            for attempt in range(self.max_retries + 1):
                try:
                    return self._once(text, update)
                except _Retryable as e:
                    last = e.reason
                    if attempt == self.max_retries:
                        break
                    if e.retry_after is not None:
                        delay = min(e.retry_after, self.max_retry_after)
                    else:
                        delay = self.backoff(attempt)
                    self.sleep(delay)
            where = self.update_endpoint if update else self.endpoint
            raise KBError(f"SPARQL endpoint {where} failed after {self.max_retries + 1} attempts: {last}")

    def _wrapper(self, update: bool) -> SPARQLWrapper:
        sw = SPARQLWrapper(self.endpoint, updateEndpoint=self.update_endpoint, agent=self.user_agent)
        sw.setTimeout(int(max(1, round(self.timeout))))
        if update:
            sw.setMethod(POST)
        else:
            sw.setReturnFormat(JSON)
        return sw

    def _once(self, text: str, update: bool) -> Any:
        sw = self._wrapper(update)
        sw.setQuery(text)
        if not update and len(text) > MAX_GET_QUERY:
            sw.setMethod(POST)
        self.requests += 1
        try:
            result = sw.query()
            body = result.response.read()
        except urllib.error.HTTPError as e:
            if e.code == 429:
                raise _Retryable("HTTP 429 Too Many Requests",
                                 parse_retry_after(e.headers.get("Retry-After"))) from None
            if e.code >= 500:
                raise _Retryable(f"HTTP {e.code}", parse_retry_after(e.headers.get("Retry-After"))) from None
            raise KBError(f"SPARQL endpoint refused the request: HTTP {e.code} {_one_line(e.reason)}") from None
        except EndPointInternalError:
            raise _Retryable("HTTP 500 internal error") from None
        except SPARQLWrapperException as e:
            # 400/401/404/414: retrying the same request cannot help.
            raise KBError(f"SPARQL endpoint rejected the request: {_one_line(e)}") from None
        except urllib.error.URLError as e:
            raise _Retryable(f"cannot reach endpoint: {_one_line(e.reason)}") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"timed out after {self.timeout:g} s") from None
        except http.client.HTTPException as e:
            # A server dying mid-answer: IncompleteRead, RemoteDisconnected, BadStatusLine.
            raise _Retryable(f"bad HTTP answer: {type(e).__name__}") from None
        except OSError as e:
            raise _Retryable(f"connection failed: {_one_line(e)}") from None
        if update:
            return None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise KBError(f"malformed SPARQL answer from {self.endpoint}: not JSON") from None
