"""The Pervasive Attention sequence model (arch "pervasive", #115): built from its config, it predicts
each target position from the earlier target tokens and the whole source only (a later token moves
no earlier logit; any source token moves every target logit), leaves the source positions' logits
at zero, trains on sorting, and bad fields are clear errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attnjax import data
from attnjax import models
from attnjax.train import trainer
from attnjax.train import validate
from experiments import sweep
from tests import tolerances
from tests import training_loop

V, T, S = 16, 10, 5


def _config(**overrides):
  fields = dict(arch="pervasive", width=8, depth=2, source_len=S, growth_rate=4, kernel_size=3,
                tie_embeddings=False)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _spec(seq_len=T):
  return data.make_task(ml_collections.ConfigDict(
      {"name": "sorting", "seed": 0, "vocab_size": V, "seq_len": seq_len})).spec


def _model_and_params(**overrides):
  model = models.build_model(_config(**overrides), _spec())
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32))
  return model, params


@pytest.mark.parametrize("tie", [False, True])
def test_target_logits_read_earlier_targets_and_the_whole_source(tie):
  model, params = _model_and_params(tie_embeddings=tie)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, V, size=(2, T)), jnp.int32)
  logits = model.apply(params, tokens)
  assert logits.shape == (2, T, V) and logits.dtype == jnp.float32
  assert np.all(np.asarray(logits[:, :S]) == 0.0)           # no prediction at source positions
  for p in range(S, T):                                       # a later token moves no earlier logit
    moved = model.apply(params, tokens.at[:, p].set((tokens[:, p] % (V - 1)) + 1))
    np.testing.assert_array_equal(moved[:, :p], logits[:, :p])
    assert np.all(np.abs(np.asarray(moved[:, p:p + 1] - logits[:, p:p + 1])).max(-1) > 0)
  for j in range(S):                                          # every source token reaches every row
    moved = model.apply(params, tokens.at[:, j].set((tokens[:, j] % (V - 1)) + 1))
    assert np.all(np.abs(np.asarray(moved[:, S:] - logits[:, S:])).max(-1) > 0), j


def test_examples_of_a_batch_are_independent():
  model, params = _model_and_params()
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, V, size=(3, T)), jnp.int32)
  together = model.apply(params, tokens)
  for b in range(3):
    np.testing.assert_allclose(model.apply(params, tokens[b:b + 1])[0], together[b],
                               **tolerances.output(jnp.float32))


@pytest.mark.parametrize("overrides,match", [
    (dict(source_len=None), "model.source_len is required"),
    (dict(source_len=T), "model.source_len .* must be less than"),
    (dict(kernel_size=4), "model.kernel_size must be odd"),
    (dict(growth_rate=0), "model.growth_rate must be a positive integer"),
    (dict(arch="decoder_lm", num_heads=2, source_len=S), "model.source_len is a field of arch"),
])
def test_config_errors_name_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    models.build_model(_config(**overrides), _spec())


def test_trains_on_sorting_loss_falls():
  spec_task = data.make_task(ml_collections.ConfigDict(
      {"name": "sorting", "seed": 0, "vocab_size": V, "seq_len": T}))
  model, variables = _model_and_params(depth=3, growth_rate=8, width=16)
  _, losses = training_loop.train(lambda p, x: model.apply({"params": p}, x), variables["params"],
                                  lambda s: spec_task.batch(s, 32), 60)
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("arg", ["model=pervasive,size=tiny", "model=pervasive,size=small",
                                 "model=decoder_lm,size=tiny"])
def test_config_builds_a_valid_run(arg, tmp_path):
  config = sweep.load_config(f"configs/pervasive_sorting.py:{arg}")
  validate.validate_config(config, str(tmp_path))
  task = data.make_task(config.task)
  model = models.build_model(trainer.model_config_for_run(config), task.spec)
  assert isinstance(model, models.PervasiveSeq2Seq) == ("pervasive" in arg)
  if "pervasive" in arg:
    assert model.source_len == config.task.seq_len // 2
  assert models.param_count(models.abstract_variables(model, task.spec)["params"]) > 0
