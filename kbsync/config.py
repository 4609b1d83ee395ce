"""Settings: embedded TOML defaults, overlaid by a user file and KBSYNC_* variables."""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from kbsync.errors import BadInput

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


@dataclass
class ModelConfig:
    path: str = "default"
    family: str = "auto"
    edit_layers: str = "-3:"
    edit_modules: list[str] = field(default_factory=list)
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class PredictConfig:
    max_new_tokens: int = 12
    num_beams: int = 1
    chat: bool = True


@dataclass
class EditorConfig:
    method: str = "alphaedit"
    loop: int = 5
    answer_style: str = "auto"
    shrink: bool = True
    # "nullspace": project every method's MLP delta onto the null space of preserved knowledge.
    preserve: str = ""
    # Methods tried in order when the configured method's proposal is rejected or it cannot run.
    fallback: list[str] = field(default_factory=lambda: ["ft-layer"])
    # Extra keyword options for the method (e.g. lr, max_steps for the fine-tuning baselines).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RegressionConfig:
    retain_size: int = 200
    seed: int = 0
    max_mean_kl: float = 0.05
    max_kl: float = 1.0
    min_unchanged: float = 0.95
    min_paraphrase_accuracy: float = 0.5
    tie_margin: float = 0.1
    keep_applied: bool = True


@dataclass
class StoreConfig:
    data_dir: str = "~/.local/share/kbsync"
    cache_dir: str = "~/.cache/kbsync"
    db: str = ""
    # Seconds an edit waits for another process's edit to finish before giving up.
    lock_timeout: float = 300.0

    @property
    def data_path(self) -> Path:
        """The data directory, expanded."""
        return Path(os.path.expanduser(self.data_dir))

    @property
    def cache_path(self) -> Path:
        """The cache directory, expanded."""
        return Path(os.path.expanduser(self.cache_dir))

    @property
    def db_url(self) -> str:
        """The audit log's SQLAlchemy URL (SQLite in the data directory unless set)."""
        return self.db or f"sqlite:///{self.data_path / 'audit.db'}"


@dataclass
class KBConfig:
    endpoint: str = "local"
    user_agent: str = ""
    timeout: float = 60.0
    max_retries: int = 5
    backoff_base: float = 1.0
    mode: str = "revision"
    watchlist: list[str] = field(default_factory=list)
    properties: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    overlap_minutes: float = 10.0
    batch_size: int = 50


@dataclass
class DaemonConfig:
    poll_interval: float = 60.0
    jitter: float = 5.0
    backoff_max: float = 600.0
    host: str = "127.0.0.1"
    port: int = 0
    token: str = ""
    method: str = ""
    method_options: dict[str, Any] = field(default_factory=dict)
    actor: str = "kbsync-daemon"
    start_timeout: float = 300.0
    stop_timeout: float = 300.0
    # After a poll, consolidate (kbsync consolidate) once this many applied edits stack outside a
    # consolidation; 0: never. A rejected consolidation is tried again this many edits later.
    consolidate_every: int = 0
    # Also consolidate at these times of day, UTC ("HH:MM", e.g. ["03:00"] for a quiet hour): at the
    # first poll from then on, if any applied edit stacks outside the consolidation. Either trigger may fire.
    consolidate_at: list[str] = field(default_factory=list)


@dataclass
class ServeConfig:
    """Per-request limits of the HTTP API (kbsync.api), so no request holds the model for long; and the
    Hugging Face export of the served model the daemon keeps current (kbsync.export)."""

    max_prompts: int = 16
    max_prompt_chars: int = 4000
    max_target_chars: int = 200
    max_tokens: int = 128
    # Empty: no export. Else the daemon re-exports there after each applied edit or revert.
    export_dir: str = ""
    # Shell command run after each export (empty: none), killed after export_reload_timeout seconds.
    export_reload: str = ""
    export_reload_timeout: float = 300.0


@dataclass
class Settings:
    model: ModelConfig = field(default_factory=ModelConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    editor: EditorConfig = field(default_factory=EditorConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    kb: KBConfig = field(default_factory=KBConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise BadInput(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"config file {path} is not valid TOML: {e}") from None


def _merge(obj: Any, data: dict[str, Any], where: str, env: bool = False) -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in data.items():
        if key not in known:
            if isinstance(obj, Settings):
                # A misspelt or misplaced section would otherwise be ignored without a word.
                sections = ", ".join(f"[{f.name}]" for f in fields(Settings))
                what = f"settings section [{key}]" if isinstance(value, dict) else f"setting {key}"
                raise BadInput(f"unknown {what}; the sections are {sections}")
            raise BadInput(f"unknown setting {where}{key}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise BadInput(f"setting {where}{key} must be a table ([{where}{key}]), not {_shown(value)}")
            _merge(current, value, f"{where}{key}.", env)
        else:
            setattr(obj, key, _coerce(value, current, f"{where}{key}", env))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(value: Any, current: Any, name: str, env: bool = False) -> Any:
    """value as the type of the setting's default; env: it is a KBSYNC_* variable's text, parsed to that type.

    A TOML value must have the right type already ("80" is not a port), as TOML has types.
    """
    text = value.strip() if env and isinstance(value, str) else None
    if isinstance(current, bool):
        if value is True or (text is not None and text.lower() in _TRUE):
            return True
        if value is False or (text is not None and text.lower() in _FALSE):
            return False
        raise BadInput(f"{name} must be true or false, not {_shown(value)}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(current, int):
        if number and isinstance(value, int):
            return value
        try:
            if text is not None:
                return int(text)
        except ValueError:
            pass
        raise BadInput(f"{name} must be a whole number, not {_shown(value)}")
    if isinstance(current, float):
        out = float(value) if number else math.nan
        try:
            if text is not None:
                out = float(text)
        except ValueError:
            pass
        if math.isnan(out):
            raise BadInput(f"{name} must be a number, not {_shown(value)}")
        return out
    if isinstance(current, str):
        if not isinstance(value, str):
            raise BadInput(f"{name} must be a string, not {_shown(value)}")
        return value
    if isinstance(current, list):
        if env and isinstance(value, str):
            return [v for v in value.split(",") if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadInput(f"{name} must be a list of strings, not {_shown(value)}")
        return value
    if isinstance(current, dict):  # free-form options: the edit method checks their keys itself
        if not isinstance(value, dict):
            raise BadInput(f"{name} must be a table ([{name}] in the config file), not {_shown(value)}")
        return value
    return value


# The longest duration a setting may give: a year. Longer ones overflow timers and datetime
# arithmetic (threading.TIMEOUT_MAX, timedelta) somewhere down the line.
MAX_SECONDS = 365 * 24 * 3600.0

Check = Callable[[Any], "str | None"]  # None when the value is fine, else what it must be


def _between(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v <= hi else f"between {lo:g} and {hi}"


def _seconds(positive: bool) -> Check:
    def check(v: float) -> str | None:
        low_ok = v > 0 if positive else v >= 0
        if low_ok and v <= MAX_SECONDS:
            return None
        return f"{'> 0' if positive else '>= 0'} seconds and at most a year ({MAX_SECONDS:.0f})"

    return check


def _not_negative(v: float) -> str | None:
    return None if v >= 0 else ">= 0"


def _not_empty(v: str) -> str | None:
    return None if v.strip() else "a non-empty string"


def _one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"one of {', '.join(choices)}"


def _layer_slice(v: str) -> str | None:
    """The slice syntax adapters.base.parse_layer_slice reads, refusing one that selects no layer of any model."""
    need = 'a Python slice over the layers such as "-3:", "2:5" or "4"'
    spec = v.strip() or ":"
    parts = spec.split(":")
    try:
        nums = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        return need
    if len(parts) > 3 or (len(parts) == 1 and nums[0] is None):
        return need
    if len(nums) == 3 and nums[2] == 0:
        return f"{need} (a step of 0 is not one)"
    start, stop = nums[0], nums[1] if len(nums) > 1 else None
    step = nums[2] if len(nums) == 3 and nums[2] is not None else 1
    if start is not None and stop is not None and (start < 0) == (stop < 0) and step > 0 and start >= stop:
        return f"{need} that selects at least one layer"
    return None


# Here, not in adapters.device: validating settings must not import torch (`kbsync history` would pay 2 s).
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def _device(value: Any) -> str | None:
    return None if isinstance(value, str) and DEVICE_PATTERN.fullmatch(value) else "auto, cpu, cuda or cuda:N"


CLOCK_TIME = re.compile(r"([01]\d|2[0-3]):[0-5]\d")


def _clock_times(v: list[str]) -> str | None:
    ok = all(isinstance(t, str) and CLOCK_TIME.fullmatch(t.strip()) for t in v)
    return None if ok else 'a list of UTC times of day "HH:MM" (00:00 to 23:59), e.g. ["03:00"]'


def _modes() -> Check:
    from kbsync.kb import MODES

    return _one_of(*MODES)


# Every setting whose type alone does not make it valid, by dotted name. Types are checked for
# all settings by _coerce; [editor.options] and [daemon.method_options] are the edit method's.
RULES: dict[str, Check] = {
    "model.path": _not_empty,
    "model.edit_layers": _layer_slice,
    "model.device": _device,
    "model.dtype": _one_of("auto", "float32", "bfloat16", "float16"),
    "predict.max_new_tokens": _between(1, 4096),
    "predict.num_beams": _between(1, 64),
    "editor.method": _not_empty,
    "editor.loop": _between(1, 1000),
    "editor.answer_style": _one_of("auto", "claim", "bare"),
    "regression.retain_size": _between(0, 1_000_000),
    "regression.seed": _between(0, 2**63 - 1),
    "regression.max_mean_kl": _not_negative,
    "regression.max_kl": _not_negative,
    "regression.min_unchanged": _between(0, 1),
    "regression.min_paraphrase_accuracy": _between(0, 1),
    "regression.tie_margin": _between(0, 1),
    "store.data_dir": _not_empty,
    "store.cache_dir": _not_empty,
    "store.lock_timeout": _seconds(positive=False),
    "kb.endpoint": _not_empty,
    "kb.timeout": _seconds(positive=True),
    "kb.max_retries": _between(0, 1000),
    "kb.backoff_base": _seconds(positive=False),
    "kb.overlap_minutes": _between(0, MAX_SECONDS / 60),
    "kb.batch_size": _between(1, 10_000),
    "daemon.poll_interval": _seconds(positive=True),
    "daemon.jitter": _seconds(positive=False),
    "daemon.backoff_max": _seconds(positive=False),
    "daemon.host": _not_empty,
    "daemon.port": _between(0, 65535),
    "daemon.start_timeout": _seconds(positive=True),
    "daemon.stop_timeout": _seconds(positive=True),
    "daemon.consolidate_every": _between(0, 1_000_000),
    "daemon.consolidate_at": _clock_times,
    "serve.max_prompts": _between(1, 10_000),
    "serve.max_prompt_chars": _between(1, 1_000_000),
    "serve.max_target_chars": _between(1, 100_000),
    "serve.max_tokens": _between(1, 4096),
    "serve.export_reload_timeout": _seconds(positive=True),
}


def validate(settings: Settings) -> Settings:
    """Check every setting with a rule; BadInput names the first bad one (dotted) and what it must be."""
    rules = {**RULES, "kb.mode": _modes()}
    for name, check in rules.items():
        section, key = name.split(".", 1)
        value = getattr(getattr(settings, section), key)
        need = check(value)
        if need is not None:
            raise BadInput(f"{name} must be {need}, not {_shown(value)}")
    return settings


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith("KBSYNC_") or key == "KBSYNC_CONFIG":
            continue
        parts = key[len("KBSYNC_"):].lower().split("_", 1)
        if len(parts) == 2 and parts[0] in {f.name for f in fields(Settings)}:
            out.setdefault(parts[0], {})[parts[1]] = value
    return out


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Defaults from config/default.toml, then the user file, then KBSYNC_* variables; all validated."""
    environ = dict(os.environ) if environ is None else environ
    settings = Settings()
    _merge(settings, _read_toml(CONFIG_DIR / "default.toml"), "")
    user = path or environ.get("KBSYNC_CONFIG")
    if user:
        _merge(settings, _read_toml(Path(user)), "")
    _merge(settings, _env_overrides(environ), "", env=True)
    return validate(settings)
