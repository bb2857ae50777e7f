"""ResNetCNN: built from config with no module / SE / ECA, the module sits in every block (its
parameters and gates), the parameter count against a hand count, the budget helper, the config
checks, and a few training steps on sklearn's digits that lower the loss."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attnjax import models
from attnjax import modules
from attnjax.data import shipped
from attnjax.data.base import TaskSpec
from attnjax.models import cnn
from tests import tolerances
from tests import training_loop

SPEC = TaskSpec(name="digits", kind="classify", input_shape=(8, 8, 1), input_dtype="float32",
                vocab_size=0, num_classes=10, seq_len=64)
WIDTHS, BLOCKS = (8, 16), (1, 2)


def _config(**overrides):
  config = dict(arch="cnn", width=64, depth=2, num_heads=2, widths=list(WIDTHS),
                blocks=list(BLOCKS))
  return ml_collections.ConfigDict({**config, **overrides})


def _hand_count(widths, blocks, in_channels=1, num_classes=10):
  """Conv kernels (no bias), GroupNorm scale + bias, the head: counted from the layout."""
  total = 9 * in_channels * widths[0] + 2 * widths[0]  # stem
  c = widths[0]
  for s, (w, n) in enumerate(zip(widths, blocks, strict=True)):
    for b in range(n):
      total += 9 * c * w + 2 * w + 9 * w * w + 2 * w
      if c != w or (s > 0 and b == 0):
        total += c * w + 2 * w  # 1x1 shortcut + its norm
      c = w
  return total + c * num_classes + num_classes


@pytest.mark.parametrize("module", [None, "squeeze_excitation", "eca_channel_attention"])
def test_builds_from_config_with_module_in_every_block(module):
  model = models.build_model(_config(attention_module=module), SPEC)
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 1))
  variables = model.init(jax.random.PRNGKey(1), x)
  logits, state = model.apply(variables, x, mutable=["intermediates"])
  chex.assert_shape(logits, (3, 10))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  params = nn.unbox(variables)["params"]
  block_names = [f"stage{s}_block{b}" for s, n in enumerate(BLOCKS) for b in range(n)]
  assert sorted(k for k in params if k.startswith("stage")) == sorted(block_names)
  module_params = 0
  for name in block_names:
    if module is None:
      assert "attention" not in params[name]
      continue
    own = params[name]["attention"]
    assert jax.tree.leaves(own)
    module_params += sum(x.size for x in jax.tree.leaves(own))
    # Each block's module ran on that block's feature map: its gate has the block's channels.
    (gate,) = state["intermediates"][name]["attention"][modules.GATE]
    width = params[name]["conv2"]["kernel"].shape[-1]
    assert gate.shape == (3, width) and ((gate > 0) & (gate < 1)).all()
  assert models.param_count(params) == _hand_count(WIDTHS, BLOCKS) + module_params


def test_module_changes_the_output_before_the_residual_add():
  """SE's gate scales the second conv's output: a zero gate (b2 → -inf) leaves the shortcut."""
  model = models.build_model(_config(attention_module="squeeze_excitation"), SPEC)
  plain = models.build_model(_config(), SPEC)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1))
  variables = nn.unbox(model.init(jax.random.PRNGKey(1), x))
  closed = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.full_like(v, -1e4) if "b2" in jax.tree_util.keystr(path) else v,
      variables)
  out = model.apply(closed, x)
  # The plain model with conv2 zeroed gives the same: the module sits before the residual add.
  plain_vars = {"params": {k: dict(v) for k, v in variables["params"].items()}}
  for name, block in plain_vars["params"].items():
    if name.startswith("stage"):
      block.pop("attention")
      block["conv2"] = {"kernel": jnp.zeros_like(block["conv2"]["kernel"])}
  np.testing.assert_allclose(out, plain.apply(plain_vars, x), **tolerances.output(jnp.float32))
  assert tolerances.rel_rms(out, model.apply(variables, x)) > tolerances.CHANGED_REL_RMS


def test_budget_widths_and_param_budget():
  budget = cnn.cnn_param_count((8, 8, 1), 10, (16, 32), (1, 1))
  assert budget == _hand_count((16, 32), (1, 1))
  widths, count = cnn.budget_widths(budget, (8, 8, 1), 10, (16, 32), (1, 1),
                                    "squeeze_excitation", {"reduction": 2})
  assert all(w % 4 == 0 for w in widths)
  assert abs(count - budget) <= 0.1 * budget
  assert count == cnn.cnn_param_count((8, 8, 1), 10, widths, (1, 1), "squeeze_excitation",
                                      {"reduction": 2})
  # The budget found is the closest of its neighbours (one multiple up or down on every stage).
  for step in (-4, 4):
    other = tuple(w + step for w in widths)
    assert abs(cnn.cnn_param_count((8, 8, 1), 10, other, (1, 1), "squeeze_excitation",
                                   {"reduction": 2}) - budget) >= abs(count - budget)
  # Half the budget: smaller widths.
  half, _ = cnn.budget_widths(budget // 2, (8, 8, 1), 10, (16, 32), (1, 1))
  assert sum(half) < 48
  model = models.build_model(_config(widths=[16, 32], blocks=[1, 1], param_budget=budget // 2),
                             SPEC)
  assert tuple(model.widths) == half
  with pytest.raises(ValueError, match="budget"):
    cnn.budget_widths(0, (8, 8, 1), 10, (16, 32), (1, 1))


@pytest.mark.parametrize("overrides,match", [
    (dict(attention_module="squeeze_excitaton"), "model.attention_module.*squeeze_excitation"),
    (dict(attention_module="squeeze_excitation", attention_kwargs={"ratio": 2}),
     "model.attention_kwargs.*ratio"),
    (dict(attention_kwargs={"reduction": 2}), "model.attention_kwargs"),
    (dict(blocks=[1]), "model.blocks"),
    (dict(widths=[8, 0]), "model.widths"),
    (dict(param_budget=-5), "model.param_budget"),
    (dict(arch="vit", patch_size=2, widths=[8]), "model.widths.*cnn"),
])
def test_config_errors_name_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    models.build_model(_config(**overrides), SPEC)


def test_unknown_module_lists_registered_ones():
  with pytest.raises(ValueError, match="eca_channel_attention"):
    models.check_config(_config(attention_module="nope"))


def test_trains_on_digits_loss_falls():
  model = models.build_model(_config(attention_module="eca_channel_attention"), SPEC)
  task = shipped.Digits()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  _, losses = training_loop.train(lambda p, x: model.apply({"params": p}, x), params,
                                  lambda s: task.batch(s, 64), 50)
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("name", ["cnn_digits", "cnn_textures"])
@pytest.mark.parametrize("arg", ["size=tiny", "size=small,module=squeeze_excitation,budget=70000"])
def test_configs_build_a_valid_run(name, arg, tmp_path):
  from attnjax.data import textures  # pylint: disable=import-outside-toplevel
  from attnjax.train import trainer, validate  # pylint: disable=import-outside-toplevel
  from experiments import sweep  # pylint: disable=import-outside-toplevel
  config = sweep.load_config(f"configs/{name}.py:{arg}")
  validate.validate_config(config, str(tmp_path))
  task_config = config.task.to_dict()
  # The textures task is built directly (its `data.TASKS` entry is the lead's to add).
  task = (shipped.Digits(**{k: v for k, v in task_config.items() if k != "name"})
          if name == "cnn_digits" else
          textures.Textures(**{k: v for k, v in task_config.items() if k != "name"}))
  model = models.build_model(trainer.model_config_for_run(config), task.spec)
  params = models.param_count(models.abstract_variables(model, task.spec)["params"])
  if "budget" in arg:
    assert abs(params - 70000) < 0.1 * 70000 and model.attention_module == "squeeze_excitation"
  else:
    assert model.attention_module is None and tuple(model.widths) == (8, 16, 32)


def test_sweep_config_budgets_are_the_no_attention_counts():
  from configs.sweeps import cnn_modules  # pylint: disable=import-outside-toplevel
  assert cnn_modules.BUDGETS == {
      "textures": cnn.cnn_param_count((18, 18, 3), 9, (16, 32, 64), (1, 1, 1)),
      "digits": cnn.cnn_param_count((8, 8, 1), 10, (16, 32, 64), (1, 1, 1))}
  for task in ("textures", "digits"):
    runs = cnn_modules.get_config(f"task={task}").runs
    assert runs[0]["name"] == "none" and len({r["name"] for r in runs}) == 9
    assert all(f"configs/cnn_{task}.py:" in r["config"] for r in runs)
  with pytest.raises(ValueError, match="task="):
    cnn_modules.get_config("task=cifar")


def test_bfloat16_compute_keeps_float32_logits_close():
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1))
  fp32 = models.build_model(_config(attention_module="squeeze_excitation"), SPEC)
  bf16 = models.build_model(_config(attention_module="squeeze_excitation", dtype="bfloat16"), SPEC)
  variables = fp32.init(jax.random.PRNGKey(1), x)
  want, got = fp32.apply(variables, x), bf16.apply(variables, x)
  assert got.dtype == jnp.float32
  err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  assert err < tolerances.BF16_VS_FP32_REL_RMS, err
