"""`kbsync export DIR`: the served model (base weights + applied deltas, in order) as a standard
Hugging Face directory that inference engines (vLLM, TGI, transformers replicas) load as they are.

The directory holds safetensors weights (the served dtype, bit for bit), config.json, the
tokenizer, generation_config.json, a model card (README.md) listing the applied edits and the
base model's fingerprint, and kbsync-export.json: the same facts as data, and the mark that lets
a later export replace the directory (anything else that is not empty is never replaced).

Writing is atomic: everything goes to a hidden sibling directory that is then swapped in with
one rename (Linux renameat2 RENAME_EXCHANGE where an export is already there), so a reader sees
the previous export or the new one, never half of one. Exports to one directory are serialised
by a hidden lock file beside it.

export_store() reads the audit log read-only and the delta files without the store's lock, so it
works while a daemon holds the data directory and edits: the applied rows are read in one query,
and the delta of an applied row is on disk before the row is (and stays after a revert).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kbsync.errors import KbsyncError

MANIFEST = "kbsync-export.json"
CARD = "README.md"
KIND = "kbsync-export"
FORMAT = 1
LOCK_TIMEOUT = 600.0


class ExportError(KbsyncError):
    """An export that cannot be written where asked; nothing at the destination was changed."""


@dataclass
class ExportedEdit:
    """One applied edit as the model card and the manifest list it."""

    id: int
    sequence: int | None
    fact: str
    question: str
    target: str
    method: str
    delta_sha256: str
    applied_at: str
    subject_id: str = ""
    property: str = ""
    actor: str = ""
    source: str = ""
    kb_revision: str = ""

    @classmethod
    def of(cls, edit: Any) -> ExportedEdit:
        """From an audit row (kbsync.audit.models.Edit) with status 'applied'."""
        fact = f"{edit.subject_label} · {edit.property}" if edit.property else edit.question
        # The row is written (pending) and flipped to applied under one store lock, moments apart.
        when = edit.created_at.astimezone(timezone.utc).isoformat(timespec="seconds") if edit.created_at else ""
        return cls(id=edit.id, sequence=edit.sequence, fact=fact, question=edit.question, target=edit.object_label,
                   method=edit.method, delta_sha256=edit.delta_sha256 or "", applied_at=when,
                   subject_id=edit.subject_id, property=edit.property, actor=edit.actor, source=edit.source,
                   kb_revision=edit.kb_revision)


@dataclass
class ExportResult:
    """What an export wrote."""

    path: Path
    base_model: str
    base_fingerprint: str
    weights_fingerprint: str
    dtype: str
    architecture: str
    exported_at: str
    edits: list[ExportedEdit] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    replaced: bool = False

    def manifest(self) -> dict[str, Any]:
        """The kbsync-export.json contents."""
        return {"kind": KIND, "format": FORMAT, "base_model": self.base_model,
                "base_fingerprint": self.base_fingerprint, "weights_fingerprint": self.weights_fingerprint,
                "dtype": self.dtype, "architecture": self.architecture, "exported_at": self.exported_at,
                "edits": [asdict(e) for e in self.edits]}

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json."""
        return {**self.manifest(), "path": str(self.path), "files": self.files, "seconds": round(self.seconds, 3),
                "replaced": self.replaced}


# --- the destination ----------------------------------------------------------------------


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a kbsync export at path, or None if path is not one."""
    try:
        data = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == KIND else None


def check_destination(path: str | Path) -> Path:
    """The absolute destination; ExportError unless it is absent, an empty directory or a previous export."""
    dest = Path(path).expanduser()
    try:
        # A symlink to an export is followed: the export it points at is what gets replaced.
        dest = dest.resolve()
    except (OSError, RuntimeError) as e:
        raise ExportError(f"cannot export to {path}: {_why(e)}") from None
    if not dest.exists():
        if dest.parent.exists() and not dest.parent.is_dir():
            raise ExportError(f"cannot export to {dest}: {dest.parent} is not a directory")
        return dest
    if not dest.is_dir():
        raise ExportError(f"cannot export to {dest}: it is a file, not a directory")
    try:
        empty = not any(dest.iterdir())
    except OSError as e:
        raise ExportError(f"cannot export to {dest}: {_why(e)}") from None
    if not empty and read_manifest(dest) is None:
        raise ExportError(f"{dest} is not empty and is not a kbsync export (no {MANIFEST}); "
                          "refusing to replace it: choose a new or empty directory")
    return dest


def check_writable(dest: Path) -> None:
    """ExportError unless a directory can be made beside dest (creating dest's parents if needed)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        probe = dest.parent / f".{dest.name}.kbsync-export-{uuid.uuid4().hex[:8]}.probe"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise ExportError(f"cannot export to {dest}: {_why(e)}") from None


# --- exporting ----------------------------------------------------------------------------


def export_store(settings: Any, dest: str | Path, adapter: Any = None) -> ExportResult:
    """Export base + the store's applied deltas, in order, to dest, reading the data directory read-only.

    adapter: the base model already loaded (its weights must be the base's); else loaded from
    settings.model.path. Raises a KbsyncError with one line (bad destination, a missing or
    tampered delta, a delta made for another base model) before anything is written there.
    """
    start = time.perf_counter()
    # A bad destination fails with one line before anything heavy is imported or loaded.
    dest = check_destination(dest)
    check_writable(dest)
    from kbsync.audit.log import AuditLog
    from kbsync.served import ServedModel
    from kbsync.store import DeltaStore

    # Read-only: no table, lock or repair is written, so a daemon that holds the data dir is undisturbed.
    with AuditLog.open(settings.store.db_url, read_only=True) as audit:
        applied = audit.stack_in_order()  # consolidations in place of the edits they stand for
    store = DeltaStore.for_settings(settings)
    # Every delta loaded (checksum-verified) before the model: a bad one fails fast.
    deltas = [(e, store.load(e)) for e in applied]
    if adapter is None:
        from adapters import load_adapter

        adapter = load_adapter(settings)
    served = ServedModel(adapter)
    # Rows of other base models sharing the log are not this model's; a delta whose row names this
    # model (or none) but was made for another is still refused by check_fits.
    deltas = [(e, d) for e, d in deltas if e.made_for(served.base_fingerprint)]
    applied = [e for e, _ in deltas]
    for edit, delta in deltas:
        served.push(delta, edit.id)  # check_fits first: another base model's delta is refused
    base = str(getattr(adapter, "name", "") or settings.model.path)
    result = write_export(served, applied, dest, base_model=base)
    result.seconds = time.perf_counter() - start
    return result


def write_export(served: Any, edits: list[Any], dest: str | Path, base_model: str = "") -> ExportResult:
    """Write served (a kbsync.served.ServedModel whose applied edits are `edits`, in order) to dest atomically.

    The caller keeps the weights still while this runs (the daemon holds its model lock).
    """
    from filelock import FileLock, Timeout

    from kbsync.served import model_fingerprint

    start = time.perf_counter()
    dest = check_destination(dest)
    check_writable(dest)
    if [e.id for e in edits] != list(served.edit_ids):
        raise ExportError(f"internal: the model holds edits {served.edit_ids}, not {[e.id for e in edits]}")
    gated = [i for i in served.edit_ids if served.pushed[i].gates]
    if gated:
        # A gate fires only where the input names its subject: plain weights cannot say that.
        raise ExportError(f"edit(s) {', '.join(map(str, gated))} are subject-gated (method gated) and cannot be "
                          f"exported as plain weights; serve them with kbsync, or revert them and edit with alphaedit")
    model = served.adapter.model
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    result = ExportResult(
        path=dest, base_model=base_model or str(getattr(served.adapter, "name", "")),
        base_fingerprint=served.base_fingerprint, weights_fingerprint=model_fingerprint(model),
        dtype=",".join(dtypes), architecture=",".join(getattr(model.config, "architectures", None) or [type(model).__name__]),
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        edits=[ExportedEdit.of(e) for e in edits],
    )
    lock = FileLock(str(dest.parent / f".{dest.name}.kbsync-export.lock"))
    try:
        lock.acquire(timeout=LOCK_TIMEOUT)
    except Timeout:
        raise ExportError(f"cannot export to {dest}: another export to it is still running "
                          f"(waited {LOCK_TIMEOUT:g} s for {lock.lock_file})") from None
    except OSError as e:
        raise ExportError(f"cannot export to {dest}: {_why(e)}") from None
    try:
        _remove_leftovers(dest)
        tmp = dest.parent / f".{dest.name}.kbsync-export-{uuid.uuid4().hex[:12]}.partial"
        try:
            tmp.mkdir()
            _write_files(served.adapter, tmp, result, set(_edited(served)))
            result.files = sorted(p.name for p in tmp.iterdir())
            # Checked again under the lock: something else may have appeared there meanwhile.
            check_destination(dest)
            result.replaced = dest.exists()
            _swap_in(tmp, dest)
        except OSError as e:
            raise ExportError(f"cannot export to {dest}: {_why(e)}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    result.seconds = time.perf_counter() - start
    return result


def _edited(served: Any) -> list[str]:
    """Names of the parameters the applied deltas changed."""
    return list(getattr(served, "_base", {}))


def _write_files(adapter: Any, out: Path, result: ExportResult, edited: set[str]) -> None:
    """Weights, config, tokenizer, generation config, model card and manifest into the directory out."""
    model = adapter.model
    model.save_pretrained(out)
    if adapter.tokenizer is not None:
        adapter.tokenizer.save_pretrained(out)
    can_generate = bool(getattr(model, "can_generate", lambda: False)())
    if can_generate and not (out / "generation_config.json").exists():
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(model.config).save_pretrained(out)
    _verify_weights(model, out, edited)
    (out / CARD).write_text(model_card(result, can_generate))
    (out / MANIFEST).write_text(json.dumps(result.manifest(), indent=2) + "\n")


def _verify_weights(model: Any, out: Path, edited: set[str]) -> None:
    """ExportError unless every saved tensor equals the model's, and every edited parameter was saved, bit for bit."""
    import torch
    from safetensors import safe_open

    state = model.state_dict()
    seen: set[str] = set()
    files = sorted(out.glob("*.safetensors"))
    if not files:
        raise ExportError(f"internal: saving the model wrote no safetensors file in {out}")
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key not in state:
                    continue  # a name this architecture's checkpoint layout maps on load
                saved = f.get_tensor(key)
                mine = state[key].detach().cpu()
                if saved.dtype != mine.dtype or saved.shape != mine.shape or not torch.equal(saved, mine):
                    raise ExportError(f"internal: the saved {key} differs from the served weights")
                seen.add(key)
    # Tied parameters (an LM head sharing the embedding) are saved once, under one of their names.
    ptrs = {state[k].data_ptr() for k in seen}
    for name in sorted(edited):
        if name not in seen and (name not in state or state[name].data_ptr() not in ptrs):
            raise ExportError(f"the edited parameter {name} is not saved under its own name by this "
                              "architecture's checkpoint format; cannot check the export bit for bit")


def _why(e: OSError | RuntimeError) -> str:
    return (e.strerror or str(e)) if isinstance(e, OSError) else str(e)


def _remove_leftovers(dest: Path) -> None:
    """Remove what an export killed mid-way left beside dest (only ever called under the export lock)."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.kbsync-export-[0-9a-f]+\.(partial|old)$")
    for p in dest.parent.iterdir():
        if pattern.match(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _swap_in(tmp: Path, dest: Path) -> None:
    """Make tmp appear at dest in one step; the export (or empty directory) that was there is removed."""
    if not dest.exists():
        os.rename(tmp, dest)
        return
    if _exchange(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous export
        return
    # No atomic exchange here (not Linux, or the filesystem refuses it): two renames, so for a
    # moment dest is absent, but never half written.
    old = dest.parent / f".{dest.name}.kbsync-export-{uuid.uuid4().hex[:12]}.old"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


# --- the model card -------------------------------------------------------------------------


def _cell(value: object) -> str:
    """Text safe in a Markdown table cell: one line, pipes and backslashes escaped."""
    text = " ".join(str(value if value is not None else "").split())
    return text.replace("\\", "\\\\").replace("|", "\\|") or "—"


def auto_class(architecture: str) -> str:
    """The transformers Auto class that loads a model of this architecture name."""
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return "AutoModelForCausalLM"
    if architecture.endswith("ForConditionalGeneration"):
        return "AutoModelForSeq2SeqLM"
    if architecture.endswith("ForSequenceClassification"):
        return "AutoModelForSequenceClassification"
    return "AutoModel"


def model_card(result: ExportResult, can_generate: bool = True) -> str:
    """README.md: what the model is (base + which edits, in order), its fingerprints, how to load it."""
    auto = auto_class(result.architecture.split(",")[0])
    tags = ["kbsync", "knowledge-editing"]
    head = ["---", "library_name: transformers"]
    if can_generate:
        head.append("pipeline_tag: text-generation")
    head += ["tags:", *[f"- {t}" for t in tags], "---", ""]
    n = len(result.edits)
    lines = [
        "# Edited model exported by kbsync",
        "",
        f"The base model `{result.base_model}` with {n} applied kbsync edit{'s' if n != 1 else ''} added to its "
        "weights, in the order listed (the order they stack in the served model). The weights are bit for bit "
        "those kbsync served when this was exported.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{_cell(result.base_model)}` |",
        f"| base model fingerprint | `{result.base_fingerprint}` |",
        f"| exported weights fingerprint | `{result.weights_fingerprint}` |",
        f"| weights dtype | {result.dtype} |",
        f"| architecture | {_cell(result.architecture)} |",
        f"| exported at (UTC) | {result.exported_at} |",
        "",
        "Fingerprints are `kbsync.served.model_fingerprint`: sha256 (first 16 hex digits) over every "
        "parameter's name, shape, dtype and bytes. The base fingerprint names the model the edits were "
        f"made on; the exported one can be recomputed over `{auto}.from_pretrained(this directory)`.",
        "",
        "## Applied edits",
        "",
    ]
    if not result.edits:
        lines.append("None: these are the base model's weights.")
    else:
        lines += ["| audit id | sequence | fact | question | target | method | delta sha256 | applied (UTC) |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in result.edits:
            lines.append(f"| {e.id} | {e.sequence if e.sequence is not None else '—'} | {_cell(e.fact)} | "
                         f"{_cell(e.question)} | {_cell(e.target)} | {_cell(e.method)} | `{e.delta_sha256}` | "
                         f"{e.applied_at} |")
        lines += ["", "`kbsync show ID` prints an edit's full audit record (answers before and after, "
                  "paraphrase and retain checks)."]
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        f"model = {auto}.from_pretrained(\"DIR\")",
        "tokenizer = AutoTokenizer.from_pretrained(\"DIR\")",
        "```",
        "",
        "or `vllm serve DIR` for a causal LM (see kbsync's docs/export.md). `kbsync-export.json` holds this card's facts "
        "as JSON; `kbsync export` replaces this directory only while that file is in it.",
        "",
    ]
    return "\n".join(head + lines)
