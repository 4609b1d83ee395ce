"""The review page at the daemon's `/`: the edit log with filters, one edit's answers and checks, the
daemon's status, and a revert button. Server-rendered HTML (no build step, no script from elsewhere);
the revert button posts to the API's own `POST /edits/{id}/revert` with the token the reviewer types,
so a revert from the page is audited like any other (source "api", the actor and reason given).
Every text from the audit log or the KB is HTML-escaped.
"""

from __future__ import annotations

from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse

from kbsync.api.server import ApiServer
from kbsync.audit import STATUSES

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; } th, td { padding: .25em .6em; border-bottom: 1px solid #ddd;
text-align: left; vertical-align: top; } th { background: #f4f4f4; }
.applied { color: #176b2c; } .rejected, .failed { color: #a01818; } .reverted, .revert { color: #8a6100; }
.status { display: flex; gap: 2em; flex-wrap: wrap; background: #f7f7fb; padding: .6em 1em; border-radius: 6px; }
form.filters input, form.filters select { margin-right: .6em; } .ok { color: #176b2c; } .bad { color: #a01818; }
code { background: #f4f4f4; padding: 0 .2em; }
"""

REVERT_SCRIPT = """
document.getElementById('revert').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = event.target, out = document.getElementById('revert-result');
  const response = await fetch(form.dataset.url, {method: 'POST',
    headers: {'Authorization': 'Bearer ' + form.token.value, 'Content-Type': 'application/json'},
    body: JSON.stringify({actor: form.actor.value || null, reason: form.reason.value})});
  const body = await response.json();
  if (response.ok) { out.className = 'ok'; out.textContent = 'Reverted: audit row ' + body.edit_id + '.';
                     setTimeout(() => location.reload(), 300); }
  else { out.className = 'bad'; out.textContent = 'Not reverted: ' + body.error.message; }
});
"""


def _page(title: str, body: str, script: str = "") -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
                        f"<style>{STYLE}</style></head><body>{body}"
                        + (f"<script>{script}</script>" if script else "") + "</body></html>")


def _status_panel(status: dict[str, Any]) -> str:
    """The daemon's state in one line of fields (what `kbsync daemon status` prints)."""
    if not status:
        return "<div class=status>No daemon status (an API without a daemon).</div>"
    fields = [("last poll", status.get("last_poll")), ("last good poll", status.get("last_ok")),
              ("polls", status.get("polls")), ("failures in a row", status.get("failures")),
              ("last error", status.get("last_error")), ("owed KB changes", status.get("owed")),
              ("cursor", status.get("cursor")), ("KB", status.get("endpoint")),
              ("edit in flight", (status.get("in_flight") or {}).get("subject"))]
    cells = "".join(f"<div><b>{escape(k)}</b><br><span data-field='{escape(k)}'>{escape(str(v if v not in (None, '') else '-'))}</span></div>"
                    for k, v in fields)
    return f"<div class=status id=daemon-status>{cells}</div>"


def _since(text: str | None) -> datetime | None:
    if not text:
        return None
    from kbsync.commands.audit import parse_since

    return parse_since(text)


def install(app: FastAPI, api: ApiServer) -> None:
    """Add GET / (the log) and GET /review/{id} (one edit) to the app."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(status: str | None = None, subject: str | None = None, prop: str | None = Query(None, alias="property"),
              since: str | None = None, limit: int = Query(100, ge=1, le=1000)) -> HTMLResponse:
        """The edit log, newest first, filtered by status, subject, property and age or date."""
        status = status or None  # an unknown one is the audit log's one-line error
        rows = api.audit.history(status=status, subject=subject or None, property=(prop or "").upper() or None,
                                 since=_since(since), limit=limit)
        owed = {o.edit.id for o in api.audit.owed()}
        options = "".join(f"<option{' selected' if s == status else ''}>{s}</option>" for s in STATUSES)
        filters = (f"<form class=filters method=get action='/'>status <select name=status><option value=''>any</option>{options}</select>"
                   f"subject <input name=subject value='{escape(subject or '')}' size=14>"
                   f"property <input name=property value='{escape(prop or '')}' size=5>"
                   f"since <input name=since value='{escape(since or '')}' size=8 placeholder='7d or 2026-11-01'>"
                   "<button>Filter</button></form>")
        head = "".join(f"<th>{c}</th>" for c in ("id", "when (UTC)", "status", "fact", "target", "before", "after",
                                                 "method", "actor"))
        body = []
        for e in rows:
            label = e.status + (f" of {e.reverts_edit_id}" if e.reverts_edit_id else "") + (", owed" if e.id in owed else "")
            body.append(f"<tr data-edit='{e.id}'><td><a href='/review/{e.id}'>{e.id}</a></td>"
                        f"<td>{e.created_at:%Y-%m-%d %H:%M:%S}</td><td class='{escape(e.status)}'>{escape(label)}</td>"
                        f"<td>{escape(e.subject_label or e.question)} <code>{escape(e.property)}</code></td>"
                        f"<td>{escape(e.object_label)}</td><td>{escape(e.before_answer)}</td><td>{escape(e.after_answer)}</td>"
                        f"<td>{escape(e.method)}</td><td>{escape(e.actor)}</td></tr>")
        table = f"<table id=edits><tr>{head}</tr>{''.join(body)}</table>" if body else "<p id=edits>No edit matches.</p>"
        return _page("kbsync review", f"<h1>kbsync: {escape(api.model_id)}</h1>{_status_panel(api.status())}"
                     f"<h2>Edits ({len(rows)}, newest first)</h2>{filters}{table}"
                     "<p>JSON: <a href='/edits'>/edits</a>, schema: <a href='/openapi.json'>/openapi.json</a></p>")

    @app.get("/review/{edit_id}", response_class=HTMLResponse, include_in_schema=False)
    def one(edit_id: int) -> HTMLResponse:
        """One edit: its answers before and after, its paraphrase and retain checks, its reasons, a revert form."""
        e = api.audit.get(edit_id)
        checks = api.audit.checks(edit_id)
        para = [c for c in checks if c.kind == "paraphrase"]
        changed = [c for c in checks if c.kind == "retain" and not c.ok]
        kept = sum(c.kind == "retain" and c.ok for c in checks)
        m = e.metrics or {}
        facts = [("status", e.status), ("fact", f"{e.subject_label} {e.property}".strip() or e.question),
                 ("question", e.question), ("target", e.object_label), ("answer before", e.before_answer),
                 ("answer after", e.after_answer), ("method", e.method), ("actor", f"{e.actor} ({e.source})"),
                 ("when (UTC)", f"{e.created_at:%Y-%m-%d %H:%M:%S}"), ("KB revision", e.kb_revision),
                 ("retain", f"mean KL {m['mean_kl']:.4g}, unchanged {m['unchanged']:.1%}" if "mean_kl" in m else ""),
                 ("scope", ", ".join(map(repr, m.get("fires_on", [])))), ("delta sha256", e.delta_sha256 or ""),
                 ("reverted by", e.reverted_by or "")]
        rows = "".join(f"<tr><th>{escape(k)}</th><td data-field='{escape(k)}'>{escape(str(v))}</td></tr>"
                       for k, v in facts if v not in ("", None))
        reasons = "".join(f"<li>{escape(r)}</li>" for r in e.reasons)

        def check_table(name: str, cs: list[Any]) -> str:
            if not cs:
                return f"<p id={name}>None.</p>"
            lines = "".join(f"<tr><td>{escape(c.prompt)}</td><td>{escape(c.before)}</td><td>{escape(c.after)}</td>"
                            f"<td>{'' if c.kl is None else f'{c.kl:.3g}'}</td><td class={'ok' if c.ok else 'bad'}>"
                            f"{'yes' if c.ok else 'no'}</td></tr>" for c in cs)
            return (f"<table id={name}><tr><th>prompt</th><th>before</th><th>after</th><th>KL</th><th>ok</th></tr>"
                    f"{lines}</table>")

        revert = ""
        if e.status in ("applied", "consolidation"):  # a consolidation reverts to its edits' own deltas
            revert = (f"<h2>Revert</h2><form id=revert data-url='/edits/{e.id}/revert'>"
                      "token <input name=token type=password size=24 required> actor <input name=actor size=12> "
                      "reason <input name=reason size=30> <button>Revert this edit</button></form>"
                      "<p id=revert-result></p><p>The token is in <code>&lt;data_dir&gt;/daemon/token</code>; the revert "
                      "is recorded in the audit log like <code>kbsync revert</code>.</p>")
        back = "/?" + urlencode({"subject": e.subject_label}) if e.subject_label else "/"
        return _page(f"kbsync edit {e.id}",
                     f"<p><a href='/'>All edits</a> · <a href='{escape(back)}'>this subject's</a></p>"
                     f"<h1>Edit {e.id}: <span class='{escape(e.status)}'>{escape(e.status)}</span></h1>"
                     f"<table id=facts>{rows}</table>" + (f"<h2>Reasons</h2><ul>{reasons}</ul>" if reasons else "")
                     + f"<h2>Paraphrases ({sum(c.ok for c in para)} of {len(para)} answer the target)</h2>"
                     + check_table("paraphrases", para)
                     + f"<h2>Retain answers it changed ({len(changed)}; {kept} unchanged)</h2>"
                     + check_table("changed", changed) + revert,
                     REVERT_SCRIPT if revert else "")
