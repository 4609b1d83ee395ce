"""Shared fixtures: audit log URLs for SQLite (always) and PostgreSQL (when KBSYNC_TEST_PG_URL is set)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

PG_ENV = "KBSYNC_TEST_PG_URL"


def _pg_engine(url: str) -> sa.Engine:
    u = make_url(url)
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    return sa.create_engine(u, connect_args={"connect_timeout": 5})


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def audit_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A URL to an empty audit database: a SQLite file, or a fresh PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'audit.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set (start one with: export {PG_ENV}=$(scripts/start_postgres.sh | tail -n 1))")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = _pg_engine(base)
    with engine.begin() as c:
        c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    # search_path in the connection options puts every table the test creates in its own schema.
    yield make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    with engine.begin() as c:
        c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()
