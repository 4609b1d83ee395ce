"""The kbsync daemon, by concern: core (the Daemon: poll, edit, retry owed changes, serve), watchlist
(parsing what to watch), files (pid, state, token, lock), process (start and stop it as a process) and
exporter (the Hugging Face export it keeps current)."""

from kbsync.daemon.core import OWED_RETRY_MAX, Daemon, PollResult, owed_retry_at
from kbsync.daemon.exporter import Exporter
from kbsync.daemon.files import (
           DaemonPaths,
           api_token,
           daemon_holding,
           now_iso,
           pid_alive,
           read_state,
           running_pid,
)
from kbsync.daemon.process import health, setup_logging, start_background, stop_daemon
from kbsync.daemon.watchlist import parse_classes, parse_watchlist

__all__ = ["OWED_RETRY_MAX", "Daemon", "DaemonPaths", "Exporter", "PollResult", "api_token", "daemon_holding", "health",
           "now_iso", "owed_retry_at", "parse_classes", "parse_watchlist", "pid_alive", "read_state", "running_pid",
           "setup_logging", "start_background", "stop_daemon"]
