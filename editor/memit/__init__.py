"""MEMIT: locate-and-edit with a closed-form update per MLP output matrix (registers `memit`)."""

from editor.memit.method import Memit

__all__ = ["Memit"]
