"""Model adapters, one module per family, registered by family name."""

from adapters import causal_lm, classifier, seq2seq  # noqa: F401  (registers the families)
from adapters.base import Adapter
from adapters.loading import load_adapter
from adapters.registry import ADAPTERS, adapter_for, register

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "load_adapter", "register"]
