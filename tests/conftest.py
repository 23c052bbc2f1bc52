"""Fixtures shared by every test; the helpers live in tests/support.py."""

from pathlib import Path

import pytest

from kube_control_plane import HOW_TO, SKIP_REASONS, require
from prometheus_server import live_metrics_run
from s3server import BACKENDS, S3Server, weed_binary
from support import values_file  # noqa: F401  (a fixture)


@pytest.fixture(scope="session", params=BACKENDS, ids=lambda backend: "moto-mock" if backend == "moto" else backend)
def s3_server(request):
    """An S3 server process, each test once per server: SeaweedFS, a real S3-compatible server (what the
    dev stack deploys), and moto, a mock of one (test ids say `moto-mock`). One process per server and
    session; each module makes its own bucket."""
    if request.param == "seaweedfs" and not weed_binary():
        require(f"SeaweedFS' weed is not built (KUBETRAIN_WEED); {HOW_TO}")
    server = S3Server(backend=request.param).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def live_run(tmp_path_factory):
    """One 2-rank run scraped by a real Prometheus, for the metrics, dashboard and alert tests."""
    with live_metrics_run(tmp_path_factory.mktemp("metrics")) as run:
        yield run


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cluster: needs a real cluster (tests/cluster: kube-apiserver + etcd; tests/node: a whole node); "
        "skipped where absent unless KUBETRAIN_REQUIRE_CLUSTER=1",
    )


CLUSTER_TIERS = [Path(__file__).resolve().parent / tier for tier in ("cluster", "node")]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(tier in Path(str(item.fspath)).resolve().parents for tier in CLUSTER_TIERS):
            item.add_marker(pytest.mark.cluster)


def pytest_terminal_summary(terminalreporter):
    for reason in sorted(set(SKIP_REASONS)):  # the cluster and node tiers' skips, said once each
        terminalreporter.write_sep("-", "cluster tier skipped")
        terminalreporter.write_line(reason)
