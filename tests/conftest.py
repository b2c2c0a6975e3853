import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test, dropped afterwards (fails, never skips, without a server)."""
    admin = sqlalchemy.create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    try:
        admin.connect().close()
    except sqlalchemy.exc.OperationalError:
        pytest.fail(f"PostgreSQL is not reachable at {PG_SERVER} (start it: see docs/development.md)")
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
