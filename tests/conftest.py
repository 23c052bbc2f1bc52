"""Fixtures shared by every test; the helpers live in tests/support.py."""

import pytest

from s3server import S3Server
from support import values_file  # noqa: F401  (a fixture)


@pytest.fixture(scope="session")
def s3_server():
    """One real S3-compatible server process (moto) per session; each module makes its own bucket."""
    server = S3Server().start()
    yield server
    server.stop()
