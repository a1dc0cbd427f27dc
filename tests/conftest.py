"""Shared fixtures: one Prefect test server for the session, tiny real checkpoints, and
a real S3-compatible server (moto's server mode on 127.0.0.1) with a fresh bucket per test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from flows.demo import build_mlp_checkpoint, feature_names
from tests.helpers import N_FEATURES, SEEDS


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.testing.utilities import prefect_test_harness

    # Prefect configures its logging on first use of its API; done here, its console
    # handler writes to the session's stderr, not to the capture of the first test that
    # happens to run a flow (closed after that test, and written to at teardown).
    ensure_logging_setup()
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three TF1 checkpoints of one MLP: identical variable names, different weights."""
    root = tmp_path_factory.mktemp("ckpts")
    return [
        build_mlp_checkpoint(root / f"m{i}" / "model.ckpt", seed=s, n_features=N_FEATURES,
                             hidden=(16, 8))
        for i, s in enumerate(SEEDS)
    ]


@pytest.fixture(scope="session")
def features() -> list[str]:
    return feature_names(N_FEATURES)


S3_REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free 127.0.0.1 port, stopped by its pid whatever happens."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"moto server exited: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(url + "/moto-api/data.json", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, "moto server did not answer in 60 s"
                time.sleep(0.1)
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, with the AWS_* variables pointing at the local server."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_S3_REGION", S3_REGION)
    monkeypatch.setenv("AWS_S3_REGION", S3_REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    name = f"test-{uuid.uuid4().hex[:12]}"
    admin = pafs.S3FileSystem(endpoint_override=s3_endpoint.split("://", 1)[1], scheme="http",
                              region=S3_REGION, allow_bucket_creation=True)
    admin.create_dir(name)
    return name
