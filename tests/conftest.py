"""Shared test setup: offline, single-threaded, one cache of generated artefacts per checkout."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ.setdefault("ZK0_CACHE", str(ROOT / ".pytest_cache" / "zk0"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

FAST = {"local-steps": 2, "batch-size": 4, "eval-batches": 1, "min-stats-clients": 1}  # small federations


@pytest.fixture
def run_config(tmp_path):
    """Build a Flower run config (pyproject defaults + overrides) like `flwr run` does."""
    from flwr.common.config import get_fused_config_from_dir

    def make(**overrides) -> dict:
        values = {**FAST, "output-dir": str(tmp_path / "outputs"),
                  **{k.replace("_", "-"): v for k, v in overrides.items()}}
        return get_fused_config_from_dir(ROOT, values)

    return make


@pytest.fixture(scope="session")
def smolvla_base_folder(tmp_path_factory):
    """A local smolvla_base-format pretrained policy folder (see tests/realworld.py)."""
    from realworld import write_smolvla_base_format

    return write_smolvla_base_format(tmp_path_factory.mktemp("smolvla_base_format"))


@pytest.fixture(scope="session")
def lab_registry(tmp_path_factory):
    """A user's registry file outside the checkout, over datasets with their own camera names."""
    from realworld import write_lab

    return write_lab(tmp_path_factory.mktemp("lab"))
