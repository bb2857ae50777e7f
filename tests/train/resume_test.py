"""Resume after SIGKILL (between checkpoints, and during an async save) and save on SIGTERM.

Each run is a fresh python (tests.train.fakes_test.run_in_subprocess) killing itself at a chosen
point; the rerun in the same workdir must end with params and loss curve bitwise equal to an
uninterrupted run, and no temporary (unfinalised) checkpoint directory may remain.
"""

import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attnjax.train import checkpoint as checkpoint_lib
from attnjax.train import metrics as metrics_lib
from attnjax.train import trainer
from tests.train import fakes_test

# Seven fresh pythons (about 2 minutes on 2 busy cores): slow suite. trainer_test has a fast
# in-process resume check.
pytestmark = pytest.mark.slow

# 12 steps, checkpoints every 4 steps (async), eval every 4, a train record every step.
CONFIG = fakes_test.make_config(num_steps=12, checkpoint_every=4, eval_every=4, log_every=1)


def _final_params(workdir):
  step_dir = os.path.join(workdir, "checkpoints", "12", checkpoint_lib.STATE)
  state = ocp.StandardCheckpointer().restore(step_dir)
  return state["params"]


def _curve(workdir):
  """(step, train_loss) and (step, eval_loss) of the log, without timing fields."""
  records = metrics_lib.read_jsonl(workdir)
  train = [(r["step"], r["train_loss"], r["train_accuracy"], r["grad_norm"])
           for r in records if "train_loss" in r]
  evals = [(r["step"], r["eval_loss"], r["eval_accuracy"]) for r in records if "eval_loss" in r]
  return train, evals


def _no_tmp_checkpoints(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return [n for n in names if "tmp" in n]


def _assert_same_run(workdir, reference):
  np.testing.assert_equal(jax.tree.map(np.asarray, _final_params(workdir)),
                          jax.tree.map(np.asarray, _final_params(reference)))
  assert _curve(workdir) == _curve(reference)
  assert not _no_tmp_checkpoints(workdir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = fakes_test.run_in_subprocess(CONFIG, workdir)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  train, evals = _curve(workdir)
  assert [s for s, *_ in train] == list(range(1, 13))
  assert [s for s, *_ in evals] == [4, 8, 12]
  return str(workdir)


def test_sigkill_between_checkpoints_then_resume(tmp_path, reference):
  # Killed when step 6's batch is requested, once checkpoint 4 is complete: steps 5-6 are lost.
  proc = fakes_test.run_in_subprocess(CONFIG, tmp_path, env={"ATTNJAX_TEST_KILL_AT_STEP": "6",
                                                             "ATTNJAX_TEST_WAIT_FOR": "4"})
  assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
  assert checkpoint_lib.Checkpointer(tmp_path).latest_step() == 4
  proc = fakes_test.run_in_subprocess(CONFIG, tmp_path)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "resuming at step 4" in proc.stdout
  _assert_same_run(tmp_path, reference)


def test_sigkill_during_async_save_then_resume(tmp_path, reference):
  # Killed right after the async save of step 8 started (still in progress when killed), once
  # checkpoint 4 is complete.
  proc = fakes_test.run_in_subprocess(CONFIG, tmp_path, env={"ATTNJAX_TEST_KILL_AFTER_SAVE": "8"})
  assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
  with open(tmp_path / "kill_marker.json") as f:
    assert '"saving": true' in f.read()
  # The unfinished save is not a checkpoint: the latest complete one is step 4.
  assert checkpoint_lib.Checkpointer(tmp_path).latest_step() == 4
  proc = fakes_test.run_in_subprocess(CONFIG, tmp_path)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  _assert_same_run(tmp_path, reference)


def test_sigterm_saves_current_step_and_exits(tmp_path, reference):
  # SIGTERM arrives while step 6 (1-based: the 6th step, batch index 5) is being prepared; the loop
  # finishes that step, saves step 6 (not a periodic checkpoint step) and exits with status 143.
  proc = fakes_test.run_in_subprocess(CONFIG, tmp_path, env={"ATTNJAX_TEST_KILL_AT_STEP": "5",
                                                             "ATTNJAX_TEST_SIGNAL": "SIGTERM"})
  assert proc.returncode == trainer.PREEMPTED_EXIT_CODE, proc.stdout + proc.stderr
  ckpt = checkpoint_lib.Checkpointer(tmp_path)
  assert ckpt.latest_step() == 6
  assert not _no_tmp_checkpoints(tmp_path)
  proc = fakes_test.run_in_subprocess(CONFIG, tmp_path)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "resuming at step 6" in proc.stdout
  _assert_same_run(tmp_path, reference)
