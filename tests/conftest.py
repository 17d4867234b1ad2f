"""Test setup: 8 fake CPU devices for sharding tests, paths to the shared test bed."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MICRO_MODEL = SHARED / "models" / "micro-qwen3"
DEV_PROMPTS = SHARED / "data" / "prompts-dev.jsonl"
TRAIN_PROMPTS = SHARED / "data" / "prompts-train.jsonl"


@pytest.fixture(scope="session")
def micro_model_dir() -> pathlib.Path:
    if not MICRO_MODEL.exists():
        pytest.fail(f"{MICRO_MODEL} is missing: the shared test bed must sit beside the repo")
    return MICRO_MODEL


@pytest.fixture(scope="session")
def micro_fp32(micro_model_dir):
    """(config, fp32 params with _diff copied from AR) of the shared micro model."""
    from convert.hf_params import read_hf_params

    return read_hf_params(str(micro_model_dir))
