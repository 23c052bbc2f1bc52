"""Fixtures shared by every test; the helpers live in tests/support.py."""

import pytest

from prometheus_server import live_metrics_run
from s3server import S3Server
from support import values_file  # noqa: F401  (a fixture)


@pytest.fixture(scope="session")
def s3_server():
    """One real S3-compatible server process (moto) per session; each module makes its own bucket."""
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def live_run(tmp_path_factory):
    """One 2-rank run scraped by a real Prometheus, for the metrics, dashboard and alert tests."""
    with live_metrics_run(tmp_path_factory.mktemp("metrics")) as run:
        yield run
