#!/usr/bin/env bash
# Start a throwaway PostgreSQL for kbsync's tests; idempotent. The last line printed is the URL.
#   KBSYNC_PG_DIR   cluster directory (default /tmp/kbsync-pg); data in $KBSYNC_PG_DIR/data
#   KBSYNC_PG_PORT  TCP port on 127.0.0.1 (default 55432)
# Usage: export KBSYNC_TEST_PG_URL=$(scripts/start_postgres.sh | tail -n 1)
set -euo pipefail

PG_DIR=${KBSYNC_PG_DIR:-/tmp/kbsync-pg}
PORT=${KBSYNC_PG_PORT:-55432}
DATA=$PG_DIR/data
# Unix sockets have a ~107-byte path limit, so keep the socket dir short and in /tmp.
SOCK=/tmp/kbsync-pg-sock-$PORT
DB=kbsync_test

find_bin() {
    local p
    p=$(command -v initdb 2>/dev/null || true)
    if [ -z "$p" ]; then
        # Debian keeps server binaries out of PATH, under /usr/lib/postgresql/<major>/bin.
        p=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
    fi
    [ -n "$p" ] && dirname "$(readlink -f "$p")"
}

BIN=$(find_bin || true)
if [ -z "$BIN" ]; then
    echo "initdb not found; installing postgresql with apt-get" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "need root to apt-get install postgresql" >&2
        exit 1
    fi
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql >&2
    BIN=$(find_bin)
fi

# initdb and postgres refuse to run as root: run them as the postgres system user.
if [ "$(id -u)" -eq 0 ]; then
    DB_USER=postgres
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    as_db() { runuser -u postgres -- "$@"; }
else
    DB_USER=$(id -un)
    as_db() { "$@"; }
fi

mkdir -p "$PG_DIR" "$SOCK"
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$PG_DIR" "$SOCK"
fi
chmod 700 "$SOCK"

if [ ! -f "$DATA/PG_VERSION" ]; then
    echo "creating cluster in $DATA" >&2
    # Trust auth is fine for a test server that listens only on 127.0.0.1 and a private socket.
    as_db "$BIN/initdb" -D "$DATA" -U "$DB_USER" --auth=trust --encoding=UTF8 --locale=C.UTF-8 >&2 \
        || as_db "$BIN/initdb" -D "$DATA" -U "$DB_USER" --auth=trust --encoding=UTF8 --no-locale >&2
fi

if as_db "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    echo "server already running in $DATA" >&2
else
    echo "starting server on 127.0.0.1:$PORT" >&2
    as_db "$BIN/pg_ctl" -D "$DATA" -l "$PG_DIR/server.log" -w -t 30 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $SOCK -c fsync=off" start >&2 || {
        echo "server failed to start; last lines of $PG_DIR/server.log:" >&2
        tail -n 20 "$PG_DIR/server.log" >&2 || true
        exit 1
    }
fi

PSQL=("$BIN/psql" -h 127.0.0.1 -p "$PORT" -U "$DB_USER" -d postgres -v ON_ERROR_STOP=1 -qtA)
if [ "$(as_db "${PSQL[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != "1" ]; then
    as_db "${PSQL[@]}" -c "CREATE DATABASE $DB" >&2
fi

echo "postgresql+psycopg://$DB_USER@127.0.0.1:$PORT/$DB"
