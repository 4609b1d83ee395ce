"""The kbsync daemon: poll the KB on a schedule, edit changed facts into the served model, serve it.

One process holds the model. An APScheduler interval job (coalesce, max_instances=1,
jitter) polls the Watcher; each changed fact goes through the edit engine with
source="daemon" and the KB revision; the watcher's cursor is committed to the database only
after every fact of a poll has an audit row, so a crash re-delivers them (and an edit that
is already in the model is a noop). An edit that raises gets a 'failed' row with the reason;
a failed or rejected change stays owed (kbsync.audit.log) and is retried after the poll's own
facts, per fact with exponential backoff from poll_interval up to OWED_RETRY_MAX, until it
lands, the model answers it, or a person dismisses it. Each poll first takes in store
changes made by other processes. The HTTP API (kbsync.api) answers from the same
model under the same lock. With [serve] export_dir set, an Exporter thread keeps a Hugging
Face export of the served model there (kbsync.export), re-exported after each applied edit or
revert, and runs the configured reload command after each. Files live in <data_dir>/daemon:
daemon.pid, daemon.log, state.json (port, last poll, errors) and token.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from filelock import FileLock, Timeout

from kbsync.batch import new_batch_id
from kbsync.config import Settings
from kbsync.daemon.exporter import Exporter
from kbsync.daemon.files import DaemonPaths, api_token, now_iso, running_pid
from kbsync.daemon.watchlist import _ENTITY_ID, parse_classes, parse_watchlist
from kbsync.errors import BadInput, KbsyncError, NotFound
from kbsync.facts import Entity, Fact, get_relation

log = logging.getLogger("kbsync.daemon")


# Cap of the per-fact retry backoff of owed KB changes (it starts at poll_interval and doubles): a
# change that keeps failing or being rejected costs at most one attempt, and one audit row, an hour.
OWED_RETRY_MAX = 3600.0


def owed_retry_at(owed: Any, settings: Settings) -> datetime:
    """When the daemon retries an owed KB change (kbsync.audit.log.Owed) next."""
    return owed.next_retry(settings.daemon.poll_interval, OWED_RETRY_MAX)


def next_clock_time(times: list[str], after: datetime) -> datetime | None:
    """The first of the UTC times of day ("HH:MM") strictly after `after`; None for no times."""
    slots = []
    for t in times:
        hour, minute = (int(x) for x in t.strip().split(":"))
        at = after.astimezone(timezone.utc).replace(hour=hour, minute=minute, second=0, microsecond=0)
        slots.append(at if at > after else at + timedelta(days=1))
    return min(slots, default=None)


class _Until:
    """An Event-like stop signal for a loop of chunks: set when `event` is, or, from the second look on
    (so one chunk always runs), once the monotonic clock reaches `deadline`."""

    def __init__(self, event: threading.Event, deadline: float) -> None:
        self.event, self.deadline, self.looked = event, deadline, False

    def is_set(self) -> bool:
        """Whether to stop now."""
        first, self.looked = not self.looked, True
        return self.event.is_set() or (not first and time.monotonic() >= self.deadline)


@dataclass
class PollResult:
    """What one poll did."""

    facts: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    committed: bool = False
    seconds: float = 0.0
    # Owed KB changes retried after the poll's own facts, by outcome.
    retries: dict[str, int] = field(default_factory=dict)


class Daemon:
    """KB watcher + edit engine + HTTP API + scheduler over one data directory."""

    def __init__(self, settings: Settings, *, engine: Any = None) -> None:
        self.settings = settings
        self.paths = DaemonPaths.of(settings)
        self.engine = engine
        self.audit: Any = None
        self.cursors: Any = None
        self.kb: Any = None  # LocalKB when the endpoint is "local"
        self.owns_kb = False
        self.client: Any = None
        self.watcher: Any = None
        self.api: Any = None
        self.exporter: Exporter | None = None
        self.scheduler: Any = None
        self.stopping = threading.Event()
        self._poll_lock = threading.Lock()
        self._file_lock: FileLock | None = None
        self.started = now_iso()
        self.polls = 0
        self.failures = 0
        self.backoff_until = 0.0  # monotonic
        self.last_poll: str | None = None
        self.last_ok: str | None = None
        self.last_error = ""
        self.in_flight: dict[str, str] | None = None
        self.counts: dict[str, int] = {}
        # Owed KB changes as of the last poll (the audit log is the truth; this feeds /health cheaply).
        self.owed = 0
        self.next_retry: str | None = None
        # Stacked edits at the last rejected consolidation: the next try waits for consolidate_every more.
        self._consolidation_refused_at = 0
        self.clock = lambda: datetime.now(timezone.utc)  # tests move it to a scheduled consolidation
        self.next_consolidation = next_clock_time(settings.daemon.consolidate_at, self.clock())

    # --- wiring -------------------------------------------------------------------------

    @property
    def cursor_name(self) -> str:
        """The cursor's key in sync_cursor: one per watch mode and endpoint."""
        return f"{self.settings.kb.mode}@{self.settings.kb.endpoint}"

    def open(self) -> Daemon:
        """Open the audit log, the KB client, the engine (loads the model) and the API server."""
        from kbsync.api import ApiServer
        from kbsync.audit import AuditLog
        from kbsync.cursor_store import CursorStore
        from kbsync.edit_engine import Engine
        from kbsync.store import DeltaStore

        self.check_settings()
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog.open(self.settings.store.db_url)
        self.cursors = CursorStore(self.audit)
        self._connect_kb()
        if self.engine is None:
            self.engine = Engine.load(self.settings, self.audit, DeltaStore.for_settings(self.settings))
        d = self.settings.daemon
        self.api = ApiServer(self.engine, self.audit, api_token(self.settings, create=True), host=d.host,
                             port=d.port, resolve_fact=self.resolve_fact, status=self.summary, actor="api",
                             limits=self.settings.serve).start()
        log.info("serving %s on %s", getattr(self.engine.adapter, "name", "model"), self.api.url)
        if self.settings.serve.export_dir:
            self.exporter = Exporter(self.settings, self.engine).start()
        self._note_owed()
        if self.owed:
            log.warning("%d KB change(s) owed from earlier runs (kbsync history --owed); retried as their backoff allows", self.owed)
        self.write_state()
        return self

    def check_settings(self) -> None:
        """Fail with one line on settings that cannot work, before the model is loaded."""
        from kbsync.kb.watch import MODES

        kb, d = self.settings.kb, self.settings.daemon
        if kb.mode not in MODES:
            raise BadInput(f"kb.mode must be one of {', '.join(MODES)}, not {kb.mode!r}")
        pairs = parse_watchlist(kb.watchlist)
        classes = parse_classes(kb.classes)
        for pid in [p for _, p in pairs] + list(kb.properties) + [p for p, _ in classes]:
            get_relation(pid)
        if kb.mode == "revision" and kb.properties:
            raise BadInput("kb.properties needs kb.mode = \"modified\" (revision mode re-reads the watchlist)")
        if not pairs and not kb.properties and not classes:
            raise BadInput("nothing to watch: set kb.watchlist, kb.properties or kb.classes")
        if d.poll_interval <= 0 or d.jitter < 0:
            raise BadInput("daemon.poll_interval must be > 0 and daemon.jitter >= 0")
        if not (kb.endpoint == "local" or kb.endpoint.startswith(("http://", "https://"))):
            raise BadInput(f"kb.endpoint must be \"local\" or an http(s) SPARQL URL, not {kb.endpoint!r}")
        if self.settings.serve.export_dir:
            from kbsync.export import check_destination, check_writable

            try:
                check_writable(check_destination(self.settings.serve.export_dir))
            except KbsyncError as e:
                raise BadInput(f"serve.export_dir: {e}") from None

    def _connect_kb(self) -> None:
        from kbsync.kb.local import LocalKB
        from kbsync.kb.sparql import DEFAULT_USER_AGENT, SparqlClient

        kb = self.settings.kb
        if kb.endpoint == "local":
            kb_dir = self.settings.store.data_path / "kb"
            running = LocalKB.find_running(kb_dir)
            if running is None:
                self.kb, self.owns_kb = LocalKB(kb_dir).start(), True
                log.info("started the local KB at %s", self.kb.endpoint)
            else:
                self.kb, self.owns_kb = running, False
                log.info("using the running local KB at %s", running.endpoint)
            endpoint, update = self.kb.endpoint, self.kb.update_endpoint
        else:
            endpoint, update = kb.endpoint, None
        self.client = SparqlClient(endpoint, user_agent=kb.user_agent or DEFAULT_USER_AGENT, timeout=kb.timeout,
                                   max_retries=kb.max_retries, backoff_base=kb.backoff_base, update_endpoint=update)

    def _revive_local_kb(self) -> None:
        """After a failed poll on the local KB: use a restarted one, or restart ours if it died."""
        from kbsync.kb.local import LocalKB

        if self.settings.kb.endpoint != "local" or self.kb is None:
            return
        if self.kb.is_running() and LocalKB.find_running(self.kb.data_dir) is not None:
            return
        found = LocalKB.find_running(self.kb.data_dir)
        if found is None and self.owns_kb:
            log.warning("the local KB died; restarting it")
            found = LocalKB(self.kb.data_dir).start()
        if found is not None and found.endpoint != self.client.endpoint:
            log.info("local KB now at %s", found.endpoint)
            self.kb = found
            self.client.endpoint, self.client.update_endpoint = found.endpoint, found.update_endpoint

    def resolve_fact(self, pid: str, subject: str) -> Fact:
        """A fact for an API edit: from the KB when it answers, else from the shipped fact table."""
        from kbsync.kb import lookup

        try:
            return lookup.get_facts(self.client, pid, subject)[0]
        except KbsyncError as e:
            log.info("KB lookup of %s of %s failed (%s); using the fact table", pid, subject, e)
        from kbsync.corpus import resolve

        return resolve(pid, subject)

    def _watch_pairs(self) -> list[tuple[str, str]]:
        from kbsync.kb import lookup

        pairs = []
        for subject, pid in parse_watchlist(self.settings.kb.watchlist):
            if _ENTITY_ID.match(subject):
                pairs.append((subject, pid))
                continue
            try:
                pairs.append((lookup.resolve_entity(self.client, subject, pid).id, pid))
            except NotFound:
                log.warning("watchlist: no entity labelled %r in the KB; skipped", subject)
        return pairs

    def _watch_classes(self) -> list[tuple[str, str]]:
        """kb.classes as (property, class entity id), class labels resolved in the KB (unknown: skipped)."""
        from kbsync.kb import lookup

        classes = []
        for pid, name in parse_classes(self.settings.kb.classes):
            try:
                classes.append((pid, lookup.resolve_class(self.client, name)))
            except NotFound:
                log.warning("classes: no entity labelled %r in the KB; skipped", name)
        return list(dict.fromkeys(classes))

    def ensure_watcher(self) -> Any:
        """The Watcher, built on first use: watchlist resolved, cursor loaded or primed to the KB's present."""
        if self.watcher is not None:
            return self.watcher
        from kbsync.kb.watch import Watcher

        kb = self.settings.kb
        cursor = self.cursors.load(self.cursor_name)
        watcher = Watcher(self.client, pairs=self._watch_pairs(), properties=kb.properties,
                          classes=self._watch_classes(), mode=kb.mode, cursor=cursor, overlap=timedelta(minutes=kb.overlap_minutes), batch_size=kb.batch_size)
        if cursor is None:
            # First start: watch from now on rather than re-checking every fact already in the KB.
            self.cursors.save(self.cursor_name, watcher.prime())
            log.info("primed the KB cursor (%s, %d pairs, %d properties, %d classes)", kb.mode,
                     len(watcher.pairs), len(watcher.properties), len(watcher.classes))
        self.watcher = watcher
        return watcher

    # --- polling ------------------------------------------------------------------------

    def poll_once(self) -> PollResult:
        """Fetch changed facts, edit each into the model, then commit the cursor; KB errors propagate."""
        with self._poll_lock:
            started = time.monotonic()
            self.polls += 1
            self.last_poll = now_iso()
            self._sync_store()
            watcher = self.ensure_watcher()
            facts, cursor = watcher.fetch()
            result = PollResult(facts=len(facts))
            # The changes one poll found are one batch: their rows share metrics.batch (kbsync history --batch).
            batch = new_batch_id() if len({f.key for f in facts}) > 1 else ""
            done_slots: set[tuple[str, str]] = set()
            todo: list[Fact] = []
            for fact in facts:
                if fact.key in done_slots:
                    # A multi-valued slot reports each value; the model takes one answer per question.
                    result.outcomes["skipped"] = result.outcomes.get("skipped", 0) + 1
                    continue
                done_slots.add(fact.key)
                todo.append(fact)
            if len(todo) > 1:
                # One update (kbsync/batch_edit.py): proposed on one model, judged together; a fact it
                # cannot take goes the single way (_edit: fallbacks, a failure recorded as owed).
                for status in self._edit_joint(todo, batch):
                    result.outcomes[status] = result.outcomes.get(status, 0) + 1
            for fact in todo if len(todo) == 1 else []:
                if self.stopping.is_set():
                    log.info("stopping: %d fact(s) left for the next start", len(facts) - sum(result.outcomes.values()))
                    result.seconds = time.monotonic() - started
                    return result
                status = self._edit(fact, batch)
                result.outcomes[status] = result.outcomes.get(status, 0) + 1
            # Every fact of the poll has an audit row now (failures too), so the cursor may move on.
            changed = cursor.to_json() != watcher.cursor.to_json()
            watcher.cursor = cursor
            if changed:  # an idle poll leaves the cursor as it was: no write
                self.cursors.save(self.cursor_name, cursor)
            result.committed = True
            self.failures, self.last_ok, self.last_error = 0, now_iso(), ""
            self._retry_owed(done_slots, result)
            self._consolidate_if_due()
            result.seconds = time.monotonic() - started
            if facts:
                log.info("poll: %d changed fact(s): %s (%.1f s)", len(facts), result.outcomes, result.seconds)
            self._warm()
            return result

    def _retry_owed(self, skip: set[tuple[str, str]], result: PollResult) -> None:
        """Attempt again each owed KB change whose backoff has run out, unless this poll just attempted its slot."""
        now = datetime.now(timezone.utc)
        owed_now = self.audit.owed()
        for owed in owed_now:
            e = owed.edit
            if self.stopping.is_set():
                break
            if (e.subject_id, e.property) in skip or owed_retry_at(owed, self.settings) > now:
                continue
            fact = Fact(Entity(e.subject_id, e.subject_label), e.property, Entity(e.object_id, e.object_label),
                        e.kb_revision)
            log.info("retrying owed edit %d (attempt %d after %s)", e.id, owed.attempts + 1, e.status)
            status = self._edit(fact)
            result.retries[status] = result.retries.get(status, 0) + 1
        # This poll's own facts may have settled or added owed changes too.
        self._note_owed(owed_now if not result.retries and not result.facts else None)

    def _note_owed(self, owed: list[Any] | None = None) -> None:
        """Refresh the owed count and the earliest retry that /health and state.json report."""
        owed = self.audit.owed() if owed is None else owed
        self.owed = len(owed)
        first = min((owed_retry_at(o, self.settings) for o in owed), default=None)
        self.next_retry = first.isoformat(timespec="seconds") if first else None

    def _sync_store(self) -> None:
        """Take in edits and reverts another process made in the store (`kbsync revert` goes through the
        API while we answer; this catches one made while we could not, e.g. during start-up)."""
        try:
            for line in self.engine.sync():
                log.info("store changed by another process: %s", line)
        except KbsyncError as e:  # a bad delta must not stop polling; edits will refuse with the same error
            log.error("cannot take in the store's changes: %s", e)

    def _warm(self) -> None:
        """Between polls, get the next edit's regression check ready (cheap when already warm), for one
        poll interval at most: then the next poll runs and warming goes on after it. Warming a 135M
        model's 200 retain answers takes a minute or two on a CPU, and a KB change arriving meanwhile
        waited for all of it (SmolLM2 sync benchmark: 71 s)."""
        t = time.monotonic()
        try:
            n = self.engine.warm(stop=_Until(self.stopping, t + self.settings.daemon.poll_interval))
        except Exception:  # only a cache: an edit computes what it lacks
            log.exception("warming the retain cache failed")
            return
        if n:
            log.info("retain cache: %d item(s) computed for the served weights (%.1f s)", n, time.monotonic() - t)

    def _edit_joint(self, facts: list[Fact], batch: str) -> list[str]:
        """A poll's facts as one update; each fact's status (the ones it cannot take edited by _edit)."""
        method, actor = self.settings.daemon.method or None, self.settings.daemon.actor
        singles: dict[int, str] = {}

        def single(i: int) -> str:
            singles[i] = self._edit(facts[i], batch)
            return singles[i]

        self.in_flight = {"subject": f"{len(facts)} facts as one update", "batch": batch, "since": now_iso()}
        self.write_state()
        try:
            out = self.engine.edit_batch(facts, method=method, source="daemon", actor=actor, batch=batch,
                                         single=single)
        except Exception as e:
            # The joint part failed before its commits (the audit log, the store): every fact the single way.
            log.warning("batch %s: the joint update failed (%s); editing its %d facts one by one", batch, e, len(facts))
            out = [singles.get(i) or self._edit(f, batch) for i, f in enumerate(facts)]
        finally:
            self.in_flight = None
        statuses = []
        for i, o in enumerate(out):
            if isinstance(o, str):  # edited by _edit, which logged and counted it
                statuses.append(o)
                continue
            f = facts[i]
            log.info("%s of %s = %s (rev %s): %s (edit %s, one update of %d)", get_relation(f.property).label,
                     f.subject.label, f.object.label, f.revision, o.status, o.edit_id, len(facts))
            self.counts[o.status] = self.counts.get(o.status, 0) + 1
            statuses.append(o.status)
        self.write_state()
        return statuses

    def _consolidate_if_due(self) -> None:
        """Consolidate when daemon.consolidate_every applied edits stack outside a consolidation, or at a
        daemon.consolidate_at time when any does (a failure is logged)."""
        d = self.settings.daemon
        now = self.clock()
        slot = self.next_consolidation if self.next_consolidation is not None and now >= self.next_consolidation else None
        if not d.consolidate_every and slot is None:
            return
        served = self.engine.pipeline.load_served_model()
        loose = sum(e.status == "applied" for e in self.audit.stack_in_order(served.base_fingerprint))
        if slot is not None:
            # A slot missed while an edit ran is taken once, at the next poll, not once per missed day.
            self.next_consolidation = next_clock_time(d.consolidate_at, now)
            if loose:
                self._consolidate(loose, f"daemon.consolidate_at {slot:%H:%M} UTC")
            return
        if loose >= d.consolidate_every and loose >= self._consolidation_refused_at + d.consolidate_every:
            self._consolidate(loose, f"daemon.consolidate_every = {d.consolidate_every}")

    def _consolidate(self, loose: int, reason: str) -> None:
        try:
            out = self.engine.consolidate(source="daemon", actor=self.settings.daemon.actor, reason=reason)
        except KbsyncError as e:
            log.warning("consolidation of %d stacked edit(s) failed: %s", loose, e)
            self._consolidation_refused_at = loose
            return
        if out["status"] == "consolidation":
            self._consolidation_refused_at = 0
            log.info("consolidated %d edit(s) as edit %s (%.1f s; %s)", len(out["consolidates"]), out["id"],
                     out["metrics"]["seconds"], reason)
        else:
            self._consolidation_refused_at = loose
            log.warning("consolidation of %d stacked edit(s) rejected (edit %s): %s", loose, out["id"],
                        "; ".join(out["reasons"]))

    def _edit(self, fact: Fact, batch: str = "") -> str:
        from kbsync.edit_engine import EditSummary
        from kbsync.store import CommitFailed

        what = f"{get_relation(fact.property).label} of {fact.subject.label} = {fact.object.label} (rev {fact.revision})"
        self.in_flight = {"subject": fact.subject.label, "property": fact.property, "object": fact.object.label,
                          "revision": fact.revision, "since": now_iso()}
        self.write_state()
        method, actor = self.settings.daemon.method or None, self.settings.daemon.actor
        try:
            try:
                outcome = self.engine.edit(fact, fact.object.label, method=method, source="daemon", actor=actor,
                                           kb_revision=fact.revision, batch=batch)
            except CommitFailed as e:
                # Its delta could not be written: the edit's own row is already 'failed' with the reason.
                outcome = EditSummary.of(e.edit)
            except Exception as e:
                # Recorded as 'failed' with the reason, so the change stays owed and is retried with
                # backoff; a fact that cannot be edited does not block the later ones. If even the row
                # cannot be written (audit log down), this raises and the poll's cursor stays put.
                if isinstance(e, KbsyncError):
                    reason = str(e)
                else:
                    log.exception("%s: the edit crashed", what)
                    reason = f"internal error: {type(e).__name__}: {e}"
                outcome = self.engine.record_failure(fact, " ".join(reason.split()), method=method or "",
                                                     source="daemon", actor=actor, kb_revision=fact.revision)
            status = outcome.status
            if status == "failed":
                log.error("%s: edit failed (edit %s, owed): %s", what, outcome.edit_id, "; ".join(outcome.reasons))
            else:
                log.info("%s: %s (edit %s)%s", what, status, outcome.edit_id,
                         f" {'; '.join(outcome.reasons)}" if outcome.reasons and status != "applied" else "")
        finally:
            self.in_flight = None
        self.counts[status] = self.counts.get(status, 0) + 1
        self.write_state()
        return status

    def tick(self) -> PollResult | None:
        """The scheduled job: poll unless backing off; a KB failure is logged and backs off exponentially."""
        if self.stopping.is_set() or time.monotonic() < self.backoff_until:
            return None
        try:
            return self.poll_once()
        except KbsyncError as e:
            self.failures += 1
            delay = min(self.settings.daemon.backoff_max, self.settings.daemon.poll_interval * 2 ** (self.failures - 1))
            self.backoff_until = time.monotonic() + delay
            self.last_error = str(e)
            log.warning("poll failed (%d in a row): %s; next poll in %.1f s or later", self.failures, e, delay)
            try:
                self._revive_local_kb()
            except KbsyncError as e2:
                log.warning("local KB restart failed: %s", e2)
            return None
        except Exception:
            self.failures += 1
            self.last_error = "internal error (see log)"
            log.exception("poll crashed")
            return None
        finally:
            self.write_state()

    # --- state --------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Daemon fields for /health and state.json."""
        backoff = max(0.0, self.backoff_until - time.monotonic())
        return {"pid": os.getpid(), "started": self.started, "polls": self.polls, "last_poll": self.last_poll,
                "last_ok": self.last_ok, "failures": self.failures, "last_error": self.last_error,
                "backoff_s": round(backoff, 1), "in_flight": self.in_flight, "daemon_edits": dict(self.counts),
                "owed": self.owed, "next_retry": self.next_retry,
                "next_consolidation": self.next_consolidation.isoformat(timespec="seconds") if self.next_consolidation else None,
                "endpoint": self.client.endpoint if self.client else None, "cursor": self.cursor_name,
                "export": self.exporter.summary() if self.exporter else None}

    def write_state(self) -> None:
        """Atomically rewrite state.json (for `daemon status` and clients finding the port)."""
        api = self.api
        state = {**self.summary(), "host": api.host if api else None, "port": api.port if api else None,
                 "url": api.url if api else None, "running": not self.stopping.is_set(), "updated": now_iso()}
        tmp = self.paths.state.with_name(f"state.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(state, indent=2) + "\n")
            tmp.replace(self.paths.state)
        except OSError as e:
            log.warning("cannot write %s: %s", self.paths.state, e)
            try:
                tmp.unlink(missing_ok=True)  # a full disk: no empty or partial file left behind
            except OSError:
                pass

    # --- lifecycle ----------------------------------------------------------------------

    def acquire(self) -> None:
        """Become the one daemon of this data directory (pid file), or fail with one line."""
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self._file_lock = FileLock(str(self.paths.lock))
        try:
            self._file_lock.acquire(timeout=0)
        except Timeout:
            raise KbsyncError(f"a kbsync daemon already runs over {self.settings.store.data_path} "
                              f"(pid {running_pid(self.settings) or '?'})") from None
        self.paths.pid.write_text(f"{os.getpid()}\n")

    def start_scheduler(self) -> None:
        """The poll job: every poll_interval s plus jitter; coalesced, never two at once."""
        from apscheduler.schedulers.background import BackgroundScheduler

        d = self.settings.daemon
        self.scheduler = BackgroundScheduler(timezone=timezone.utc)
        self.scheduler.add_job(self.tick, "interval", seconds=d.poll_interval, jitter=d.jitter or None,
                               coalesce=True, max_instances=1, id="kb-poll", name="kb poll",
                               next_run_time=datetime.now(timezone.utc), misfire_grace_time=None)
        self.scheduler.start()

    def run(self) -> None:
        """Foreground: acquire, open, poll on schedule until SIGTERM/SIGINT, then stop gracefully."""
        self.acquire()
        try:
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, lambda signum, _frame: self.request_stop(signal.Signals(signum).name))
            self.open()
            self.start_scheduler()
            while not self.stopping.wait(1.0):
                pass
        finally:
            self.close()

    def request_stop(self, why: str = "") -> None:
        """Ask the daemon to stop after the edit in flight."""
        log.info("stop requested%s; finishing the edit in flight", f" ({why})" if why else "")
        self.stopping.set()

    def close(self) -> None:
        """Stop the scheduler (waiting for the running poll), the API, the KB we started; remove the pid file."""
        self.stopping.set()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
            self.scheduler = None
        if self.api is not None:
            self.api.stop()
        if self.exporter is not None:
            self.exporter.stop(self.settings.daemon.stop_timeout)
        if self.kb is not None and self.owns_kb:
            self.kb.stop()
            self.kb = None
        if self.audit is not None:
            self.write_state()
            self.audit.close()
            self.audit = None
        if self._file_lock is not None:
            self.paths.pid.unlink(missing_ok=True)
            self._file_lock.release()
            self._file_lock = None
        log.info("daemon stopped")
