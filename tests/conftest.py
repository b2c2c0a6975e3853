import os
import subprocess
import sys
import uuid
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two pytest workers on 2 cores: one thread each,
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the processes a test starts (set before torch loads)

import pytest
import sqlalchemy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long(seconds): starts search processes, Ray or a compiler; runs first, "
                            "the longest (seconds it took alone on 2 cores) first")
    config.addinivalue_line("markers", "waits: sleeps while a heartbeat goes stale or a bound passes; runs beside "
                            "the first long tests, whose processes keep both cores busy meanwhile")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests first, longest first: with ``--maxschedchunk 1`` each worker takes the next test when
    it is free, so the workers end together (longest-first scheduling). The waiting tests come right after one
    long test per worker: pytest-xdist starts each worker on two tests, so the first worker gets the two longest
    and the second sleeps through the waiting ones beside them (side by side, two of them had left both cores
    idle for 10 s)."""

    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("long")
        return -1 if mark is None else mark.args[0] if mark.args else 0

    items.sort(key=seconds, reverse=True)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    waiting = [item for item in items if item.get_closest_marker("waits")]
    rest = [item for item in items if not item.get_closest_marker("waits")]
    items[:] = rest[:workers] + waiting + rest[workers:]


PG_SERVER = os.environ.get("SNN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test, dropped afterwards. Without a server the test is skipped
    with the reason (a laptop), unless ``CI`` is set: there it fails, so CI always runs these tests."""
    admin = sqlalchemy.create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    try:
        admin.connect().close()
    except sqlalchemy.exc.OperationalError:
        reason = f"PostgreSQL is not reachable at {PG_SERVER} (start it: see docs/development.md)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    name = f"snn_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    yield f"{PG_SERVER}/{name}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


def communicate(proc: subprocess.Popen, timeout: float = 600) -> str:
    """The output of a search process; on timeout the process is killed, never left running."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
