"""Test setup: 8 fake CPU devices for sharding tests, paths to the test bed in testbed/."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ORTHRUS_JAX_COMPILATION_CACHE_DIR", "none")  # hermetic: no cache in ~/.cache

import pathlib  # noqa: E402

import pytest  # noqa: E402

from orthrus_jax.paths import (DEV_PROMPTS, MICRO_MODEL_DIR as MICRO_MODEL,  # noqa: E402,F401
                               REPO_ROOT as REPO, TRAIN_PROMPTS)


@pytest.fixture(scope="session")
def micro_model_dir() -> pathlib.Path:
    if not MICRO_MODEL.exists():
        pytest.fail(f"{MICRO_MODEL} is missing: the test bed ships in testbed/ of the repo")
    return MICRO_MODEL


@pytest.fixture(scope="session")
def micro_fp32(micro_model_dir):
    """(config, fp32 params with _diff copied from AR) of the micro model."""
    from orthrus_jax.hf import read_hf_params

    return read_hf_params(str(micro_model_dir))
