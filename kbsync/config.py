"""Settings: embedded TOML defaults, overlaid by a user file and KBSYNC_* variables."""

from __future__ import annotations

import os
import tomllib
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


@dataclass
class PredictConfig:
    max_new_tokens: int = 12
    num_beams: int = 1
    chat: bool = True


@dataclass
class EditorConfig:
    method: str = "ke-loop"
    loop: int = 5
    answer_style: str = "auto"
    shrink: bool = True
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


@dataclass
class Settings:
    model: ModelConfig = field(default_factory=ModelConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    editor: EditorConfig = field(default_factory=EditorConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    kb: KBConfig = field(default_factory=KBConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    extra: dict[str, Any] = field(default_factory=dict)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise BadInput(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"config file {path} is not valid TOML: {e}") from None


def _merge(obj: Any, data: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in data.items():
        if key not in known:
            if isinstance(obj, Settings):
                obj.extra[key] = value
                continue
            raise BadInput(f"unknown setting {where}{key}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise BadInput(f"setting {where}{key} must be a table")
            _merge(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, current, f"{where}{key}"))


def _coerce(value: Any, current: Any, name: str) -> Any:
    # Environment variables arrive as strings; convert them to the default's type.
    if isinstance(value, str) and not isinstance(current, str):
        try:
            if isinstance(current, bool):
                return value.strip().lower() in ("1", "true", "yes", "on")
            if isinstance(current, list):
                return [v for v in value.split(",") if v]
            return type(current)(value)
        except ValueError:
            raise BadInput(f"setting {name}={value!r} is not a {type(current).__name__}") from None
    return value


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
    """Defaults from config/default.toml, then the user file, then KBSYNC_* variables."""
    environ = dict(os.environ) if environ is None else environ
    settings = Settings()
    _merge(settings, _read_toml(CONFIG_DIR / "default.toml"), "")
    user = path or environ.get("KBSYNC_CONFIG")
    if user:
        _merge(settings, _read_toml(Path(user)), "")
    _merge(settings, _env_overrides(environ), "")
    return settings
