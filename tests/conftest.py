"""Test setup: 8 fake CPU devices for sharding tests, paths to the test bed in testbed/."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache per test session, never the user's ~/.cache: the xdist
# workers (which inherit this environment) and the command-line subprocesses that tests start
# compile many of the same programs, and load them from here after the first compile. Tests
# about the cache itself give their servers a fresh directory of their own.
if "ORTHRUS_JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _session_cache = tempfile.mkdtemp(prefix="orthrus-jax-test-cache-")
    os.environ["ORTHRUS_JAX_COMPILATION_CACHE_DIR"] = _session_cache
    atexit.register(shutil.rmtree, _session_cache, True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

from orthrus_jax import compilation_cache  # noqa: E402

compilation_cache.enable()

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
