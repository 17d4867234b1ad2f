"""`distributed: true` for real: jax.distributed.initialize() in fresh processes (CPU, gloo).

One process: initialize() must run before anything touches the backend. Two processes x 4 fake
CPU devices: the global batch is split over them, the losses equal the 1-device losses, and the
export (gathered from all processes, written by process 0) holds the trained heads.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from tests.conftest import REPO
from tests.test_train import losses, tiny_cfg, tiny_setup  # noqa: F401  (fixture)

RUN = dict(global_batch=16, grad_accum=2, max_steps=2, save_every=1, export_at_end=True,
           export_dtype="float32", mesh_fsdp=-1, export_at_minutes="0.0001")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(pid: int, n_proc: int, port: int, devices: int) -> dict[str, str]:
    """Process pid's environment: n_proc jax.distributed processes coordinated on
    127.0.0.1:port, each with `devices` fake CPU devices."""
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES=str(n_proc), JAX_PROCESS_ID=str(pid),
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def communicate_all(procs: list[subprocess.Popen], timeout: int) -> list[tuple[str, str]]:
    """(stdout, stderr) of each process in order; whatever is still running on the way out (a
    timeout, or peers left waiting for a process that failed) is killed, even when the test
    fails, so no process outlives it."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def launch(n_proc: int, devices: int, cfg, timeout: int = 400) -> list[str]:
    """train.run's main over cfg (distributed=true) in n_proc processes of `devices` CPU devices
    each; returns their outputs."""
    port = free_port()
    sets = [f"{k}={v}" for k, v in {**dataclasses.asdict(cfg), "distributed": True}.items()]
    code = (
        "import sys, jax; from train.run import main; rc = main(sys.argv[1:]); "
        "print('initialized', jax.distributed.is_initialized(), jax.process_count()); "
        "sys.exit(rc)")
    procs = [subprocess.Popen([sys.executable, "-c", code, "--set", *sets], cwd=REPO,
                              env=process_env(pid, n_proc, port, devices),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(n_proc)]
    outs = [out for out, _ in communicate_all(procs, timeout)]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_initialize_runs_with_one_process(tiny_setup, tmp_path):
    out = tmp_path / "one"
    [log] = launch(1, 1, tiny_cfg(tiny_setup, out, global_batch=2, grad_accum=1, max_steps=1))
    assert "initialized True 1" in log, log[-2000:]
    assert len(losses(out)) == 1


def test_two_processes_match_one_device(tiny_setup, tmp_path):
    ref_dir, out = tmp_path / "ref", tmp_path / "two"
    from train.run import train
    train(tiny_cfg(tiny_setup, ref_dir, **{**RUN, "mesh_fsdp": 1}))
    logs = launch(2, 4, tiny_cfg(tiny_setup, out, **RUN))
    assert all("initialized True 2" in log for log in logs), logs[0][-2000:]
    np.testing.assert_allclose(losses(out), losses(ref_dir), rtol=2e-5, atol=1e-6)
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]
    assert os.path.isdir(out / "model-0.0001min")            # exported at step 1, saved once
    from orthrus_jax.checkpoint import load_model
    _, got = load_model(str(out / "model"), jnp.float32)
    _, want = load_model(str(ref_dir / "model"), jnp.float32)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                            jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    assert json.loads(open(out / "config.json").read())["distributed"] is True
