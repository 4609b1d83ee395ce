"""Adapter registry: families register themselves; lookup by name or by model config."""

from __future__ import annotations

from typing import Any

from kbsync.errors import NotFound

ADAPTERS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator adding an adapter under its `family` name."""
    ADAPTERS[cls.family] = cls
    return cls


def adapter_for(config: Any, family: str = "auto") -> type:
    """The adapter class for a family name, or the first registered one that accepts the config."""
    if family != "auto":
        try:
            return ADAPTERS[family]
        except KeyError:
            raise NotFound(f"unknown model family {family!r}; known: {', '.join(sorted(ADAPTERS))}") from None
    for cls in ADAPTERS.values():
        if cls.accepts(config):
            return cls
    raise NotFound(
        f"no adapter for model type {getattr(config, 'model_type', '?')!r}; "
        f"set model.family to one of {', '.join(sorted(ADAPTERS))}"
    )
