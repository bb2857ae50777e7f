"""Sharded training: 8 fake CPU devices (data x fsdp x tensor, and context x data with ring
attention) against 1 device, and 2-process jax.distributed runs on localhost (data x fsdp, and data x
context). Each run is a fresh python (its own XLA device count), so the module is in the slow suite.

The sharded run splits the batch over data x fsdp, the parameters over fsdp (embed) and tensor
(mlp, heads, vocab); it computes the same sums in another order, so the loss curves agree within
the float32 gradient tolerance (GRAD of tests/tolerances.py) rather than bitwise.
"""

import json
import os
import socket

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.train import checkpoint as checkpoint_lib
from attnjax.train import metrics as metrics_lib
from tests import tolerances
from tests.train import fakes_test

pytestmark = pytest.mark.slow

CONFIG = fakes_test.make_config(num_steps=8, checkpoint_every=4, eval_every=4, log_every=1)
TOL = tolerances.grad(jnp.float32)


def _losses(workdir):
  records = metrics_lib.read_jsonl(workdir)
  return (np.array([r["train_loss"] for r in records if "train_loss" in r]),
          np.array([r["eval_loss"] for r in records if "eval_loss" in r]))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_device")
  proc = fakes_test.run_in_subprocess(CONFIG, workdir, devices=1)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return str(workdir)


def test_eight_fake_devices_data_fsdp_tensor_match_one_device(tmp_path, one_device):
  config = fakes_test.make_config(**CONFIG.train.to_dict())
  config.mesh = {"data": 2, "fsdp": 2, "tensor": 2}
  proc = fakes_test.run_in_subprocess(config, tmp_path, devices=8)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2, 'context': 1}" in proc.stdout
  with open(tmp_path / "param_shardings.json") as f:
    specs = {k: v["spec"] for k, v in json.load(f).items()}
  assert specs["['mlp_in']['kernel']"] == ["fsdp", "tensor"]  # really sharded, not replicated
  train, evals = _losses(tmp_path)
  ref_train, ref_evals = _losses(one_device)
  assert len(train) == len(ref_train) == 8 and len(evals) == len(ref_evals) == 2
  np.testing.assert_allclose(train, ref_train, **TOL)
  np.testing.assert_allclose(evals, ref_evals, **TOL)
  assert not np.allclose(train[0], train[-1])  # the curve moves: a real comparison


def test_context_parallel_training_matches_one_device(tmp_path, one_device):
  # context 4 x data 2: the attention layer runs ring attention over the context axis (zigzag over
  # the 16 tokens) and the batch splits over data; the loss curve is the one device's.
  config = fakes_test.make_config(**CONFIG.train.to_dict())
  config.mesh = {"context": 4, "data": 2}
  proc = fakes_test.run_in_subprocess(config, tmp_path, devices=8)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1, 'context': 4}" in proc.stdout
  train, evals = _losses(tmp_path)
  ref_train, ref_evals = _losses(one_device)
  assert len(train) == len(ref_train) == 8
  np.testing.assert_allclose(train, ref_train, **TOL)
  np.testing.assert_allclose(evals, ref_evals, **TOL)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(config, workdir):
  """Trains `config` in two jax.distributed processes of 2 CPU devices each; their outputs."""
  address = f"localhost:{_free_port()}"
  procs = [fakes_test.run_in_subprocess(
      config, workdir, devices=2, wait=False,
      env={"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": str(i)}) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out
  return outputs


def test_two_process_distributed_run_trains_and_checkpoints(tmp_path, one_device):
  # Two processes with 2 CPU devices each: a 4-device mesh (data 2 x fsdp 2); each process loads
  # only its half of every batch, and process 0 writes the logs.
  config = fakes_test.make_config(**CONFIG.train.to_dict())
  config.mesh = {"data": 2, "fsdp": 2}
  outputs = _two_processes(config, tmp_path)
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1, 'context': 1}" in outputs[0]
  results = []
  for i in range(2):
    with open(tmp_path / f"result{i}.json") as f:
      results.append(json.load(f))
  assert results[0]["step"] == results[1]["step"] == 8
  assert results[0]["eval_loss"] == results[1]["eval_loss"]  # one global computation
  ckpt = checkpoint_lib.Checkpointer(tmp_path)
  assert ckpt.all_steps() == [4, 8]
  assert not [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]
  train, evals = _losses(tmp_path)
  ref_train, ref_evals = _losses(one_device)
  np.testing.assert_allclose(train, ref_train, **TOL)
  np.testing.assert_allclose(evals, ref_evals, **TOL)


def test_two_process_context_parallel_run_matches_one_device(tmp_path, one_device):
  # Two processes with 2 CPU devices each: context 2 x data 2, so a context ring and the batch
  # split both cross the process boundary wherever the mesh puts them.
  config = fakes_test.make_config(**CONFIG.train.to_dict())
  config.mesh = {"data": 2, "context": 2}
  outputs = _two_processes(config, tmp_path)
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1, 'context': 2}" in outputs[0]
  train, evals = _losses(tmp_path)
  ref_train, ref_evals = _losses(one_device)
  np.testing.assert_allclose(train, ref_train, **TOL)
  np.testing.assert_allclose(evals, ref_evals, **TOL)
