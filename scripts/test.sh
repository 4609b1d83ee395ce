#!/usr/bin/env bash
# Run the whole test suite against a throwaway PostgreSQL; exits with pytest's status.
# Extra arguments go to pytest (e.g. scripts/test.sh -x -k adapters).
set -euo pipefail
cd "$(dirname "$0")/.."

# (again when a dependency is missing: an older venv lacks pytest-xdist, fastapi, uvicorn or openai,
# or has a pytest whose ids drop xdist's groups, see pyproject.toml)
.venv/bin/python -c "import xdist, fastapi, uvicorn, openai, pytest
assert tuple(int(v) for v in pytest.__version__.split('.')[:2]) < (9, 2)" 2>/dev/null || KBSYNC_SETUP_STATS=0 bash scripts/setup.sh

# The review page's test drives a real headless chromium. In CI a browser that cannot be installed
# fails the run; elsewhere (no root, no network) that one test is skipped.
if ! bash scripts/setup_browser.sh; then
    [ -n "${CI:-}" ] && exit 1
    echo "no chromium/chromedriver: tests/test_review_page.py will be skipped" >&2
fi

url=$(bash scripts/start_postgres.sh | tail -n 1)
trap 'bash scripts/stop_postgres.sh >/dev/null 2>&1 || true' EXIT
export KBSYNC_TEST_PG_URL=$url

status=0
# One worker per core (each test process runs torch on one thread); the slowest tests are listed
# so that the suite's time stays visible.
.venv/bin/python -m pytest -q -ra -n "${KBSYNC_TEST_WORKERS:-auto}" --dist loadgroup --durations=15 "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    status=1
fi
exit "$status"
