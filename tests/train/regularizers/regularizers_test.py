"""The `train.attention_regularizer` flag: each regularizer trains 20 steps of the fake task's tiny
LM (a real attnjax.nn.MultiHeadAttention) with a finite loss and parameters that differ from the
unregularized run's; bad settings are errors naming the field; the sown maps are found."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attnjax.nn.attention import CAPTURE
from attnjax.train import checkpoint as checkpoint_lib
from attnjax.train import regularizers
from attnjax.train import trainer
from attnjax.train import validate
from tests import tolerances
from tests.train import fakes_test

_STEPS = 20


def _run(tmp_path, name, reg):
  config = fakes_test.make_config(num_steps=_STEPS, eval_every=_STEPS, checkpoint_every=_STEPS,
                                  log_every=10)
  if reg is not None:
    config.train.attention_regularizer = ml_collections.ConfigDict(reg)
  workdir = str(tmp_path / name)
  result = trainer.train_and_evaluate(config, workdir, **fakes_test.fake_parts(config))
  params = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(_STEPS), checkpoint_lib.STATE))["params"]
  return result, params


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  return _run(tmp_path_factory.mktemp("plain"), "plain", None)


@pytest.mark.parametrize("reg", [
    {"name": "deceive", "weight": 1.0, "impermissible_tokens": [1, 2]},
    {"name": "entropy", "weight": 1.0, "target": 0.2, "tolerance": 0.1},
    {"name": "diversity", "weight": 1.0},
], ids=lambda r: r["name"])
def test_flag_trains_with_a_finite_loss_and_changes_the_trajectory(tmp_path, plain, reg):
  result, params = _run(tmp_path, reg["name"], reg)
  assert result["step"] == _STEPS
  assert np.isfinite(result["train_loss"]) and np.isfinite(result["eval_loss"])
  leaves = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                                        params, plain[1]))
  assert max(leaves) > 1e-4, reg["name"]


def test_learned_entropy_targets_are_trained_per_head_and_checkpointed(tmp_path):
  reg = {"name": "entropy", "weight": 1.0, "target": 0.2, "tolerance": 0.05, "learn_target": True}
  result, params = _run(tmp_path, "learned", reg)
  assert np.isfinite(result["train_loss"])
  target = np.asarray(params[regularizers.TARGET_PARAM])
  assert target.shape == (fakes_test.make_config().model.num_heads,)
  # Pulled from the start 0.2 towards the heads' entropies (outside the band at the start).
  assert np.abs(target - 0.2).max() > 1e-4, target


@pytest.mark.parametrize("reg, field", [
    ({"name": "dropout_of_heads", "weight": 1.0}, "attention_regularizer.name"),
    ({"name": "entropy", "weight": -1.0}, "attention_regularizer.weight"),
    ({"name": "entropy", "weight": 1.0, "target": 1.5}, "attention_regularizer.target"),
    ({"name": "deceive", "weight": 1.0}, "attention_regularizer.impermissible_tokens"),
    ({"name": "diversity", "weight": 1.0, "target": 0.5}, "are not settings of 'diversity'"),
    ({"name": "entropy", "weight": 1.0, "learn_target": 1}, "attention_regularizer.learn_target"),
])
def test_bad_settings_are_errors_naming_the_field(reg, field):
  config = fakes_test.make_config()
  config.train.attention_regularizer = ml_collections.ConfigDict(reg)
  with pytest.raises(ValueError, match=field):
    validate.check_config(config)


def test_penalty_reads_the_sown_maps_and_needs_them():
  model = fakes_test.TinyLM()
  x = np.zeros((2, 5), np.int32)
  variables = model.init(jax.random.PRNGKey(0), x)
  _, state = model.apply(variables, x, mutable=[CAPTURE])
  weights, logits = regularizers.sown_maps(state)
  assert len(weights) == 1 and weights[0].shape == (2, 2, 5, 5) == logits[0].shape
  # Every key holds the impermissible token 0: each row's mass is 1, clamped to -log(eps).
  np.testing.assert_allclose(
      regularizers.penalty({"name": "deceive", "impermissible_tokens": [0], "eps": 1e-3}, state, x),
      -np.log(1e-3), **tolerances.output(jnp.float32))
  with pytest.raises(ValueError, match="nothing was sown"):
    regularizers.sown_maps({CAPTURE: {}})
