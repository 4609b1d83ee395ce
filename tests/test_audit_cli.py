"""`kbsync history` and `kbsync show` in subprocesses against a real SQLite audit log: hostile text, read-only data."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kbsync.audit import AuditLog, Edit, EditCheck

REPO = Path(__file__).resolve().parent.parent
MARKUP = "[/]x[bold]"


def kbsync(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m kbsync.cli ARGS` on this data directory, with a wide terminal so cells are not folded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBSYNC_")}
    env.update(KBSYNC_STORE_DATA_DIR=str(data), KBSYNC_STORE_CACHE_DIR=str(data.parent / "cache"),
               PYTHONPATH=str(REPO), COLUMNS="400")
    return subprocess.run([sys.executable, "-m", "kbsync.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def write_rows(data: Path) -> int:
    """An applied edit whose stored text is rich markup, with a paraphrase and a changed retain check."""
    with AuditLog.open(f"sqlite:///{data / 'audit.db'}") as log:
        row = log.record(
            Edit(actor="[red]mallory", source="cli", subject_id="Q1030", subject_label="Namibia [b]", property="P36",
                 object_label=MARKUP, question="What is the capital of Namibia?", before_answer="Windhoek",
                 after_answer=MARKUP, method="ft", status="applied", reasons=["odd [/] reason :thumbs_up:"]),
            [EditCheck(kind="paraphrase", prompt="Namibia's capital [i]?", expected=MARKUP, before="Windhoek",
                       after=MARKUP, ok=True),
             EditCheck(kind="retain", prompt="Capital of Peru [/]?", expected="Lima", before="Lima", after="[x]",
                       kl=0.5, ok=False)])
        return row.id


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with its mode, size and modification time (ns)."""
    out = {str(root): (root.stat().st_mode, 0, root.stat().st_mtime_ns)}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def test_markup_in_audit_text_is_printed_literally(tmp_path: Path) -> None:
    data = tmp_path / "data"
    edit_id = write_rows(data)

    listed = kbsync(data, "history")
    assert listed.returncode == 0, listed.stderr
    assert MARKUP in listed.stdout and "[red]mallory" in listed.stdout and "Namibia [b]" in listed.stdout

    shown = kbsync(data, "show", str(edit_id))
    assert shown.returncode == 0, shown.stderr
    # Emoji codes stay as typed too (rich would print ":thumbs_up:" as a picture).
    for text in (MARKUP, "[red]mallory", "odd [/] reason :thumbs_up:", "Namibia's capital [i]?",
                 "Capital of Peru [/]?", "'[x]'"):
        assert text in shown.stdout, text

    as_json = kbsync(data, "history", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)[0]["object_label"] == MARKUP


def test_history_and_show_read_a_read_only_data_dir_and_write_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    edit_id = write_rows(data)
    # A copied or restored data dir has only the database; a writer would create the lock files again.
    for p in data.glob("*.lock"):
        p.unlink()
    # chmod -R a-w: binding for a normal user; root ignores it, so the snapshot checks that nothing
    # was created (no lock file, no directory) and nothing written (audit.db's mtime and size).
    for p in [data, *data.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        ro = snapshot(data)
        for args in (["history"], ["history", "--json", "--status", "applied"], ["show", str(edit_id)],
                     ["show", str(edit_id), "--json"]):
            proc = kbsync(data, *args)
            assert proc.returncode == 0, (args, proc.stderr)
            assert MARKUP in proc.stdout
            assert snapshot(data) == ro, args
        missing = kbsync(data, "show", str(edit_id + 1))
        assert missing.returncode == 2 and missing.stderr.strip() == f"kbsync: error: no edit with id {edit_id + 1}"
    finally:
        for p in [data, *data.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_history_of_a_data_dir_with_no_log_yet_creates_nothing(tmp_path: Path) -> None:
    data = tmp_path / "never-used"
    listed = kbsync(data, "history")
    assert listed.returncode == 0, listed.stderr
    assert "0 edit(s)" in listed.stdout
    assert kbsync(data, "history", "--json").stdout.strip() == "[]"
    shown = kbsync(data, "show", "1")
    assert shown.returncode == 2 and shown.stderr.strip() == "kbsync: error: no edit with id 1"
    assert not data.exists()


@pytest.mark.parametrize("args, line", [
    (["history", "--limit", "-1"], "--limit must be 0 (all) or more"),
    (["history", "--since", "[bold]yesterday"], "--since '[bold]yesterday': use an ISO date/time"),
    (["history", "--since", "99999999d"], "--since '99999999d' reaches back before the year 1"),
    (["show", "99999999999999999999"], "edit id 99999999999999999999 is out of range: ids run from 1 to 2147483647"),
    (["show", "0"], "edit id 0 is out of range"),
    (["revert", "2147483648"], "edit id 2147483648 is out of range"),
])
def test_bad_ids_and_options_are_one_line_errors(tmp_path: Path, args: list[str], line: str) -> None:
    write_rows(tmp_path / "data")
    proc = kbsync(tmp_path / "data", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(f"kbsync: error: {line}")


def test_a_limit_beyond_any_id_lists_everything(tmp_path: Path) -> None:
    write_rows(tmp_path / "data")
    proc = kbsync(tmp_path / "data", "history", "--json", "--limit", "99999999999999999999")
    assert proc.returncode == 0, proc.stderr
    assert [e["object_label"] for e in json.loads(proc.stdout)] == [MARKUP]


def test_a_read_only_audit_log_reads_rows_and_refuses_writes(audit_url: str, tmp_path: Path) -> None:
    from kbsync.audit import AuditError

    with AuditLog.open(audit_url, read_only=True) as ro:
        assert ro.history() == []  # nothing recorded yet reads as empty ...
    assert not (tmp_path / "db").exists()  # ... and creates nothing (the SQLite case)
    with AuditLog.open(audit_url) as rw:
        rw.record(Edit(actor="a", object_label=MARKUP, status="noop"))
    with AuditLog.open(audit_url, read_only=True) as ro:
        assert [e.object_label for e in ro.history()] == [MARKUP]
        with pytest.raises(AuditError, match="read-only|readonly"):
            ro.record(Edit(actor="b", status="noop"))
    with AuditLog.open(audit_url) as rw:
        assert len(rw.history()) == 1


def test_reading_the_audit_log_does_not_load_torch(tmp_path: Path) -> None:
    """history and show only read the log: importing torch for them cost every call 2-4 s (settings
    validation imported the device module)."""
    data = tmp_path / "data"
    data.mkdir()
    edit_id = write_rows(data)
    probe = ("import sys, runpy\n"
             "sys.argv = ['kbsync'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('kbsync.cli', run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "print('torch' in sys.modules, 'transformers' in sys.modules)\n")
    for args in (["history"], ["show", str(edit_id)], ["history", "--json"]):
        env = {k: v for k, v in os.environ.items() if not k.startswith("KBSYNC_")}
        env.update(KBSYNC_STORE_DATA_DIR=str(data), PYTHONPATH=str(REPO), COLUMNS="400")
        r = subprocess.run([sys.executable, "-c", probe, *args], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == "False False", (args, r.stdout[-300:])


def test_history_fits_an_80_column_terminal_one_line_per_edit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with AuditLog.open(f"sqlite:///{data / 'audit.db'}") as log:
        for i, target in enumerate(["Lagos", "A city whose name goes on and on and on past any column " * 2]):
            log.record(Edit(actor="a-long-actor-name@example.org", source="cli", subject_id=f"Q{i}",
                            subject_label="Nigeria", property="P36", object_label=target, before_answer="Abuja",
                            after_answer=target, method="gated", status="applied", sequence=i + 1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBSYNC_")}
    env.update(KBSYNC_STORE_DATA_DIR=str(data), PYTHONPATH=str(REPO), COLUMNS="80")
    run = lambda *a: subprocess.run([sys.executable, "-m", "kbsync.cli", "history", *a], cwd=REPO, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    narrow = run()
    assert narrow.returncode == 0, narrow.stderr
    lines = narrow.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, narrow.stdout
    body = [line for line in lines if "applied" in line]
    assert len(body) == 2, narrow.stdout  # one line per edit, no cell wrapped onto a second
    assert "Lagos" in body[1] and "applied" in body[1] and "Nigeria P36" in body[1] and "…" in body[0]
    assert "a-long-actor" not in narrow.stdout  # the narrow set leaves the actor to --wide
    wide = run("--wide")
    assert "a-long-actor-name@example.org" in wide.stdout and "Abuja -> Lagos" in wide.stdout
