"""The train loop in-process on the fake task and model: outputs, metrics, resume, accumulation,
mixed precision, and (when attnjax.data / attnjax.models exist) a real MQAR run."""

import glob
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attnjax.train import checkpoint as checkpoint_lib
from attnjax.train import metrics as metrics_lib
from attnjax.train import trainer
from tests import tolerances
from tests.train import fakes_test


def _train(config, workdir, **parts):
  parts = parts or fakes_test.fake_parts(config)
  return trainer.train_and_evaluate(config, str(workdir), **parts)


def _params(workdir, step):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), checkpoint_lib.STATE))["params"]


def test_trains_and_writes_metrics_checkpoints_and_events(tmp_path):
  config = fakes_test.make_config(num_steps=40, eval_every=20, checkpoint_every=20, log_every=10)
  config.optimizer.learning_rate = 1e-2
  result = _train(config, tmp_path)
  for key in ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "steps_per_sec",
              "tokens_per_sec", "num_params"):
    assert key in result and np.isfinite(result[key]), key
  assert result["step"] == 40
  assert result["tokens_per_sec"] == pytest.approx(result["steps_per_sec"] * 8 * 16)
  records = metrics_lib.read_jsonl(tmp_path)
  train = [r for r in records if "train_loss" in r]
  assert [r["step"] for r in train] == [10, 20, 30, 40]
  assert train[-1]["train_loss"] < train[0]["train_loss"]  # it learns
  assert [r["step"] for r in records if "eval_accuracy" in r] == [20, 40]
  assert all(0 <= r.get("eval_accuracy", 0) <= 1 for r in records)
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert checkpoint_lib.Checkpointer(tmp_path).all_steps() == [20, 40]


@pytest.mark.slow
def test_rerun_of_a_finished_run_resumes_and_does_not_retrain(tmp_path):
  config = fakes_test.make_config(num_steps=8)
  first = _train(config, tmp_path)
  again = _train(config, tmp_path)
  assert again["step"] == 8
  assert again["eval_loss"] == first["eval_loss"]
  assert again["eval_accuracy"] == first["eval_accuracy"]


class _Interrupt(Exception):
  pass


class _FailingTask(fakes_test.FakeTask):
  """Raises when the train batch of `fail_at` is requested (a crash between checkpoints)."""

  def __init__(self, fail_at, **kw):
    super().__init__(**kw)
    self.fail_at = fail_at

  def batch(self, step, batch_size, *, split="train", **kw):
    if split == "train" and step == self.fail_at:
      raise _Interrupt(step)
    return super().batch(step, batch_size, split=split, **kw)


def test_resume_after_a_crash_repeats_the_uninterrupted_run_bitwise(tmp_path):
  # In-process version of tests/train/resume_test.py (which SIGKILLs real processes).
  config = fakes_test.make_config(num_steps=12, checkpoint_every=4, eval_every=4, log_every=1)
  _train(config, tmp_path / "ref")
  parts = fakes_test.fake_parts(config)
  with pytest.raises(_Interrupt):
    _train(config, tmp_path / "run", task=_FailingTask(6), model=parts["model"])
  assert checkpoint_lib.Checkpointer(tmp_path / "run").latest_step() == 4
  _train(config, tmp_path / "run")
  chex.assert_trees_all_equal(_params(tmp_path / "run", 12), _params(tmp_path / "ref", 12))
  strip = lambda rs: [{k: v for k, v in r.items() if "per_sec" not in k} for r in rs]
  assert strip(metrics_lib.read_jsonl(tmp_path / "run")) == strip(
      metrics_lib.read_jsonl(tmp_path / "ref"))


def test_gradient_accumulation_updates_every_k_steps(tmp_path):
  config = fakes_test.make_config(num_steps=4, checkpoint_every=1, eval_every=4,
                                  keep_checkpoints=10)
  config.optimizer.grad_accum_steps = 2
  config.optimizer.warmup_steps = 0
  _train(config, tmp_path)
  p1, p2, p3, p4 = (_params(tmp_path, s) for s in (1, 2, 3, 4))
  changed = lambda a, b: any(not np.array_equal(x, y)
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  # Odd steps only accumulate; even steps apply the mean gradient of the last two micro-batches.
  assert changed(p1, p2) and changed(p3, p4)
  chex.assert_trees_all_equal(p2, p3)


def test_mixed_precision_keeps_float32_params(tmp_path):
  config = fakes_test.make_config(num_steps=4, mixed_precision=True)
  result = _train(config, tmp_path)
  assert np.isfinite(result["train_loss"])
  for leaf in jax.tree.leaves(_params(tmp_path, 4)):
    assert leaf.dtype == np.float32
  assert trainer.model_config_for_run(config).dtype == "bfloat16"


def test_keeps_latest_n_and_the_best_checkpoint(tmp_path):
  config = fakes_test.make_config(num_steps=16, checkpoint_every=2, eval_every=2,
                                  keep_checkpoints=2, best_metric="eval_loss")
  config.optimizer.learning_rate = 0.3  # diverges after a while: the best is not the latest
  _train(config, tmp_path)
  records = [r for r in metrics_lib.read_jsonl(tmp_path) if "eval_loss" in r]
  best = min(records, key=lambda r: r["eval_loss"])["step"]
  steps = checkpoint_lib.Checkpointer(tmp_path, best_metric="eval_loss").all_steps()
  assert set(steps) == {14, 16} | {best}


def test_weighted_metrics():
  logits = jnp.array([[[2.0, 0.0], [0.0, 2.0], [5.0, 0.0]]])
  targets = jnp.array([[0, 0, 1]])
  weights = jnp.array([[1.0, 1.0, 0.0]])
  sums = trainer.weighted_metrics(logits, targets, weights)
  assert float(sums["weight_sum"]) == 2.0
  assert float(sums["correct_sum"]) == 1.0
  ce = -jax.nn.log_softmax(logits[0], -1)
  np.testing.assert_allclose(float(sums["loss_sum"]), float(ce[0, 0] + ce[1, 0]),
                             **tolerances.ELEMENTWISE[jnp.float32])


def _real_modules():
  try:
    from attnjax import data, models  # noqa: F401  (only: are they importable)
  except ImportError:
    return False
  return True


@pytest.mark.slow
@pytest.mark.skipif(not _real_modules(), reason="attnjax.data / attnjax.models not present")
def test_real_mqar_end_to_end(tmp_path):
  from configs import mqar  # pylint: disable=import-outside-toplevel
  config = mqar.get_config("mechanism=softmax,size=tiny")
  config.train.num_steps = 6
  config.train.eval_every = 3
  config.train.checkpoint_every = 3
  config.train.batch_size = 8
  config.train.eval_batch_size = 8
  config.train.eval_batches = 1
  config.model.width = 16
  config.model.mlp_dim = 16
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 6 and np.isfinite(result["eval_loss"])
  assert checkpoint_lib.Checkpointer(tmp_path).latest_step() == 6


def _buffers(workdir, step):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), checkpoint_lib.STATE))["buffers"]


@pytest.mark.parametrize("redraw_every", [0, 3])
def test_fixed_random_features_are_not_trained_and_redraw_on_schedule(tmp_path, redraw_every):
  # FAVOR+'s random features live in 'buffers': training never moves them; with
  # `redraw_buffers_every` they are drawn afresh at those steps only.
  config = fakes_test.make_config(num_steps=4, checkpoint_every=2, eval_every=4,
                                  redraw_buffers_every=redraw_every)
  parts = dict(task=fakes_test.FakeTask(seed=0),
               model=fakes_test.TinyLM(mechanism="favor_plus_attention"))
  _train(config, tmp_path, **parts)
  init = parts["model"].init(jax.random.split(jax.random.PRNGKey(0), 3)[0],
                             jnp.zeros((1, 16), jnp.int32))
  assert "projection" not in init["params"]["attn"]
  at2, at4 = _buffers(tmp_path, 2), _buffers(tmp_path, 4)
  chex.assert_trees_all_equal(at2, jax.device_get(init["buffers"]))   # no redraw before step 3
  if redraw_every:
    assert not np.allclose(at4["attn"]["projection"], at2["attn"]["projection"])
  else:
    chex.assert_trees_all_equal(at4, at2)
  assert not np.allclose(_params(tmp_path, 4)["attn"]["query"]["kernel"],
                         init["params"]["attn"]["query"]["kernel"])   # while the params train
