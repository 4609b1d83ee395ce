"""The daemon's HTTP API: OpenAI-compatible completions from the live model and the audited edit log,
on FastAPI and uvicorn (kbsync.api.app has the routes, kbsync.api.server the server)."""

from kbsync.api.errors import TooLarge, Unauthorized
from kbsync.api.server import ApiServer

__all__ = ["ApiServer", "TooLarge", "Unauthorized"]
