"""Shared fixtures: audit log URLs for SQLite (always) and PostgreSQL (when KBSYNC_TEST_PG_URL is set),
and tiny models of each adapter family trained on real facts once per test session."""

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
    if not base and os.environ.get("CI"):
        pytest.fail(f"{PG_ENV} must be set in CI (.ci/run starts PostgreSQL)")
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


# --- tiny models --------------------------------------------------------------------------

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and two threads per process on a shared
# 2-core box oversubscribe badly (tiny-model training measured 5-20x slower); subprocesses
# started by tests inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def facts():
    """The 80 real facts (capital and currency of the 40 most populous countries) tiny models learn."""
    from adapters.tiny import tiny_facts

    return tiny_facts(n=40)


def _tiny(arch: str, facts):
    from adapters.tiny import PRESETS, build_tiny

    return build_tiny(PRESETS[arch], facts)


@pytest.fixture(scope="session")
def tiny_llama(facts):
    """A 2-layer Llama that answers its 80 facts (QA format, no chat template)."""
    return _tiny("llama", facts)


@pytest.fixture(scope="session")
def _llama4_trained():
    from adapters.tiny import PRESETS, build_tiny, tiny_facts

    facts = tiny_facts(n=60)
    return build_tiny(PRESETS["llama4"], facts), facts


@pytest.fixture(scope="module")
def llama4(_llama4_trained):
    """The 4-layer tiny Llama trained on the capital and currency of 60 countries: trained once per session
    (and xdist worker), a copy per test module, so one module's edits never reach another's model."""
    import copy

    adapter, facts = _llama4_trained
    return copy.deepcopy(adapter), facts


@pytest.fixture(scope="session")
def tiny_gpt2(facts):
    """A 2-layer GPT-2 trained on the same facts."""
    return _tiny("gpt2", facts)


@pytest.fixture(scope="session")
def tiny_t5(facts):
    """A 2+2-layer T5 trained on the same facts."""
    return _tiny("t5", facts)


@pytest.fixture(scope="session")
def tiny_bert(facts):
    """A 2-layer BERT classifier trained on true and corrupted claims of the same facts."""
    return _tiny("bert", facts)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama, tmp_path_factory):
    """The tiny Llama saved as a Hugging Face directory (what --model DIR reads)."""
    from adapters.tiny import save_tiny

    return save_tiny(tiny_llama, tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def kbsync_env(tmp_path):
    """Environment for running the CLI in a subprocess with its own data and cache directories."""
    env = dict(os.environ)
    env.update({
        "KBSYNC_STORE_DATA_DIR": str(tmp_path / "data"),
        "KBSYNC_STORE_CACHE_DIR": os.environ.get("KBSYNC_STORE_CACHE_DIR", str(tmp_path / "cache")),
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    })
    env.pop("KBSYNC_CONFIG", None)
    return env


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
