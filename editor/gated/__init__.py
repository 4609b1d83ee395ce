"""Subject-gated target vectors: MEMIT's target vector, fired only where the input names the subject (registers `gated`)."""

from editor.gated.method import Gated

__all__ = ["Gated"]
