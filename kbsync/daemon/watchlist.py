"""The watchlist and class settings: `label-or-id|property` entries, parsed and checked."""

from __future__ import annotations

import re

from kbsync.errors import BadInput

# Entity ids in a watchlist: Wikidata's Q123, or any token with a digit and no lower-case letter (GN3355338).
_ENTITY_ID = re.compile(r"^(Q\d+|(?=\S*\d)[^\sa-z]+)$")


def parse_watchlist(entries: list[str]) -> list[tuple[str, str]]:
    """("subject label or id", "P..") pairs from "subject|property" strings; BadInput on a bad one."""
    out = []
    for entry in entries:
        subject, sep, pid = entry.rpartition("|")
        subject, pid = subject.strip(), pid.strip().upper()
        if not sep or not subject or not re.fullmatch(r"P\d+", pid):
            raise BadInput(f"watchlist entry {entry!r} is not \"subject|property\" (e.g. \"Namibia|P36\")")
        out.append((subject, pid))
    return out


def parse_classes(entries: list[str]) -> list[tuple[str, str]]:
    """("P..", "class label or id") pairs from "property|class" strings; BadInput on a bad one."""
    out = []
    for entry in entries:
        pid, sep, cls = entry.partition("|")
        pid, cls = pid.strip().upper(), cls.strip()
        if not sep or not cls or not re.fullmatch(r"P\d+", pid):
            raise BadInput(f"classes entry {entry!r} is not \"property|class\" (e.g. \"P36|country\" or \"P36|Q6256\")")
        out.append((pid, cls))
    return out
