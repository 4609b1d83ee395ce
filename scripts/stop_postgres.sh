#!/usr/bin/env bash
# Stop the server started by start_postgres.sh (same KBSYNC_PG_DIR/KBSYNC_PG_PORT); the cluster is kept.
# Pass --purge to also delete the cluster directory.
set -euo pipefail

PG_DIR=${KBSYNC_PG_DIR:-/tmp/kbsync-pg}
PORT=${KBSYNC_PG_PORT:-55432}
DATA=$PG_DIR/data
SOCK=/tmp/kbsync-pg-sock-$PORT

PG_CTL=$(command -v pg_ctl 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$PG_CTL" ]; then
    echo "pg_ctl not found; nothing to stop" >&2
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_db() { runuser -u postgres -- "$@"; }
else
    as_db() { "$@"; }
fi

if [ -f "$DATA/PG_VERSION" ] && as_db "$PG_CTL" -D "$DATA" status >/dev/null 2>&1; then
    as_db "$PG_CTL" -D "$DATA" -m fast -w stop
else
    echo "no server running in $DATA" >&2
fi

if [ "${1:-}" = "--purge" ]; then
    rm -rf "$PG_DIR" "$SOCK"
    echo "removed $PG_DIR and $SOCK" >&2
fi
