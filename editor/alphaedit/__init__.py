"""AlphaEdit: MEMIT projected onto the null space of preserved knowledge (registers `alphaedit`)."""

from editor.alphaedit.method import AlphaEdit

__all__ = ["AlphaEdit"]
