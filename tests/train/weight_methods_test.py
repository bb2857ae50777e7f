"""The `train.weight_method` flag (DQA #230 and ASWL #169 on any model's kernels): the effective
kernels against the papers' pieces (dqa_quantize per kernel; scaled magnitude pruning with a
straight-through gradient), only kernels touched; 20 trainer steps of the fake task's tiny LM per
method, after which the evaluated DQA model is 2-bit (every kernel on the 4 levels of its min-max
grid), ASWL's attentions moved and each kernel has exactly its ratio of zeros, the exported
params reproduce the trainer's eval loss, and the method's parameters are checkpointed; bad
settings are errors naming the field."""

import os

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attnjax.train import checkpoint as checkpoint_lib
from attnjax.train import pruning
from attnjax.train import quantization
from attnjax.train import trainer
from attnjax.train import validate
from attnjax.train import weight_methods as wm
from tests import tolerances
from tests.train import fakes_test

_STEPS = 20
DQA = {"name": "dqa", "final_temperature": 0.01}
ASWL = {"name": "aswl"}


def _params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
  return {"embed": f(6, 4), "attn": {"query": {"kernel": f(4, 2, 3)}},
          "mlp": {"kernel": f(4, 5), "bias": f(5)}, "norm": {"scale": f(4)}}


def test_kernel_paths_and_extra_params():
  params = _params()
  assert sorted(wm.kernel_paths(params)) == [("attn", "query"), ("mlp",)]
  alphas = wm.extra_params(DQA, params)[wm.PARAM]
  np.testing.assert_array_equal(alphas["mlp"], quantization.init_alpha())
  assert float(wm.extra_params(ASWL, params)[wm.PARAM]["attn"]["query"]) == pruning.ATTENTION_INIT
  with pytest.raises(ValueError, match="kernel"):
    wm.extra_params(ASWL, {"embed": params["embed"]})


def test_dqa_effective_kernels_are_the_papers_mix():
  params = _params()
  extra = wm.extra_params(DQA, params)[wm.PARAM]
  extra["mlp"] = jnp.asarray([0.1, 0.9, 0.3])  # another mix than the initial one
  step, num_steps = 7, 20
  got = wm.effective_params(DQA, params, extra, step, num_steps)
  temperature = quantization.temperature_schedule(100.0, 0.01, num_steps)(step)
  for path in (("attn", "query"), ("mlp",)):
    node = traverse_util.flatten_dict(params)[path + ("kernel",)]
    theta = traverse_util.flatten_dict(extra)[path]
    want = quantization.dqa_quantize(node, theta, temperature)
    np.testing.assert_allclose(traverse_util.flatten_dict(got)[path + ("kernel",)], want,
                               **tolerances.OUTPUT[jnp.float32])
  for key in ("embed", "norm"):
    np.testing.assert_array_equal(jax.tree.leaves(got[key]), jax.tree.leaves(params[key]))
  np.testing.assert_array_equal(got["mlp"]["bias"], params["mlp"]["bias"])
  # Eq. 6: λ Σ_l gᵀ a(α_l) / S, S every weight of the model.
  size = sum(v.size for v in jax.tree.leaves(params))
  want = sum(float(jnp.asarray(quantization.PAPER_PENALTY) @ quantization.dqa_attention(
      a, temperature)) for a in jax.tree.leaves(extra)) / size
  np.testing.assert_allclose(wm.penalty(DQA, params, extra, step, num_steps), want,
                             **tolerances.OUTPUT[jnp.float32])


def test_aswl_kernels_are_scaled_sparse_with_straight_through_gradient():
  params = _params()
  extra = wm.extra_params(ASWL, params)[wm.PARAM]
  extra["mlp"] = jnp.float32(0.75)  # p = 0.25: 5 of the 20 weights pruned
  got = wm.effective_params(ASWL, params, extra, 0, 1)
  w = np.asarray(params["mlp"]["kernel"])
  k = np.asarray(got["mlp"]["kernel"])
  assert int(np.sum(k == 0)) == 5
  kept = np.abs(w) >= np.sort(np.abs(w).ravel())[5]
  np.testing.assert_allclose(k, np.where(kept, 0.75 * w, 0), **tolerances.OUTPUT[jnp.float32])
  assert int(np.sum(np.asarray(got["attn"]["query"]["kernel"]) == 0)) == 12  # p = 0.5 of 24

  # The gradient at the sparse weights reaches every dense weight, pruned ones included.
  r = jnp.asarray(np.random.default_rng(3).standard_normal(w.shape), jnp.float32)
  g = jax.grad(lambda p: jnp.sum(wm.effective_params(ASWL, p, extra, 0, 1)["mlp"]["kernel"] * r))(
      params)
  np.testing.assert_allclose(g["mlp"]["kernel"], 0.75 * r, **tolerances.OUTPUT[jnp.float32])
  # decay · (kept fraction - r)² over the two kernels (20 and 24 weights).
  kept_fraction = (0.75 * 20 + 0.5 * 24) / 44
  np.testing.assert_allclose(wm.penalty(ASWL, params, extra, 0, 1), 5.0 * kept_fraction ** 2,
                             **tolerances.OUTPUT[jnp.float32])


def _run(tmp_path, method):
  config = fakes_test.make_config(num_steps=_STEPS, eval_every=_STEPS, checkpoint_every=_STEPS,
                                  log_every=10, eval_batches=1)
  config.train.weight_method = ml_collections.ConfigDict(method)
  parts = fakes_test.fake_parts(config)
  workdir = str(tmp_path / method["name"])
  result = trainer.train_and_evaluate(config, workdir, **parts)
  params = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(_STEPS), checkpoint_lib.STATE))["params"]
  exported = wm.export(method, params, _STEPS, _STEPS)
  # The exported params are the model the trainer evaluated (its eval loss, recomputed here).
  batch = parts["task"].batch(0, config.train.batch_size, split="valid")
  logits = parts["model"].apply({"params": exported}, jnp.asarray(batch["inputs"]))
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  loss = float(jnp.sum(nll * batch["weights"]) / jnp.sum(batch["weights"]))
  np.testing.assert_allclose(result["eval_loss"], loss, rtol=tolerances.GRAD[jnp.float32]["rtol"])
  assert wm.PARAM not in exported
  return result, params, exported


def test_dqa_flag_trains_a_two_bit_model(tmp_path):
  result, params, exported = _run(tmp_path, DQA)
  assert np.isfinite(result["train_loss"])
  alphas = traverse_util.flatten_dict(params[wm.PARAM])
  assert len(alphas) == len(wm.kernel_paths(exported)) >= 4
  moved = max(float(np.abs(np.asarray(a) - quantization.init_alpha()).max())
              for a in alphas.values())
  assert moved > 0, "the quantizer logits were not trained"
  for path in wm.kernel_paths(exported):
    k = np.asarray(traverse_util.flatten_dict(exported)[path + ("kernel",)], np.float64)
    dense = np.asarray(traverse_util.flatten_dict(params)[path + ("kernel",)], np.float64)
    # At T(B) = 0.01 the mix is the 2-bit quantizer of the dense kernel: 4 levels on [min, max].
    levels = dense.min() + (dense.max() - dense.min()) * np.arange(4) / 3
    assert np.abs(k[..., None] - levels).min(axis=-1).max() < tolerances.OUTPUT[jnp.float32][
        "atol"], path


def test_aswl_flag_prunes_each_kernel_at_its_trained_ratio(tmp_path):
  result, params, exported = _run(tmp_path, ASWL)
  assert np.isfinite(result["train_loss"])
  attentions = traverse_util.flatten_dict(params[wm.PARAM])
  # The penalty (target 0) pulls the kept fraction down: the attentions fall below 0.5.
  assert max(float(a) for a in attentions.values()) < pruning.ATTENTION_INIT, attentions
  for path, a in attentions.items():
    k = np.asarray(traverse_util.flatten_dict(exported)[path + ("kernel",)])
    ratio = pruning.pruning_ratios(jnp.float32(a))
    assert int(np.sum(k == 0)) == int(jnp.floor(k.size * ratio)), path


@pytest.mark.parametrize("method, field", [
    ({"name": "ternary"}, "weight_method.name"),
    ({"name": "dqa", "bits": [4, 2, 8]}, "weight_method.bits"),
    ({"name": "dqa", "penalty": [1, 4]}, "weight_method.penalty"),
    ({"name": "dqa", "final_temperature": 0}, "weight_method.final_temperature"),
    ({"name": "aswl", "target": 2.0}, "weight_method.target"),
    ({"name": "aswl", "bits": [2, 4]}, "are not settings of 'aswl'"),
])
def test_bad_settings_are_errors_naming_the_field(method, field):
  config = fakes_test.make_config()
  config.train.weight_method = ml_collections.ConfigDict(method)
  with pytest.raises(ValueError, match=field):
    validate.check_config(config)
