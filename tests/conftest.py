"""Shared fixtures: one Prefect test server for the session, and tiny real checkpoints."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
