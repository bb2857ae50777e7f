"""RNoPE hybrid (Yang et al., "Rope to Nope and Back Again: A New Hybrid Attention Strategy",
arXiv:2501.18795, catalog row 174) through the model config: `layer_rope="every k: nope"` with
sliding-window attention and `layer_mechanisms="every k: softmax"`.

The defining layout: layers i % k == k - 1 are NoPE + full attention, the others RoPE + a sliding
window. Checked on the built model, one block at a time (the block's MLP is position-wise, so the
block output at the last token follows its attention there): changing a token far outside the
window moves the last token's output only in the full-attention layers; swapping two tokens inside
the window moves it only in the RoPE layers (a NoPE causal layer is a weighted sum over the visible
tokens, blind to their order). The model trains: one SGD step lowers the loss. The schedule parses
to the per-layer flags and bad values raise naming the field.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attnjax import catalog
from attnjax import models
from attnjax.data.base import TaskSpec
from attnjax.nn import blocks
from tests import tolerances

T, V, D, DEPTH, EVERY, WINDOW = 12, 32, 32, 4, 2, 3
SPEC = TaskSpec(name="toy_lm", kind="lm", input_shape=(T,), input_dtype="int32", vocab_size=V,
                num_classes=V, seq_len=T)


def _config(**overrides):
  config = dict(arch="decoder_lm", width=D, depth=DEPTH, num_heads=4, mlp_dim=64,
                mechanism="sliding_window", mechanism_kwargs={"window": WINDOW},
                layer_mechanisms=f"every {EVERY}: softmax", layer_rope=f"every {EVERY}: nope",
                rope_base=10000.0)
  return ml_collections.ConfigDict({**config, **overrides})


def test_schedule_gives_per_layer_rope_and_mechanism():
  cfg = models.ModelConfig.from_config(_config())
  transformer = cfg.transformer()
  nope = [i % EVERY == EVERY - 1 for i in range(DEPTH)]
  assert transformer.layer_rope == tuple(not n for n in nope)
  assert transformer.mechanisms == tuple("softmax" if n else "sliding_window" for n in nope)
  assert models.ModelConfig.from_config(_config(layer_rope="every 2: rope")).transformer(
      ).layer_rope == tuple(nope)
  listed = models.ModelConfig.from_config(_config(layer_rope=[True, False, False, True]))
  assert listed.transformer().layer_rope == (True, False, False, True)
  assert "attnjax.models.ModelConfig.layer_rope" in catalog.coverage()[174]


def test_nope_layers_see_far_tokens_and_no_order_rope_layers_the_reverse():
  model = models.build_model(_config(), SPEC)
  tokens = jnp.zeros((1, T), jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]
  cfg = models.ModelConfig.from_config(_config()).transformer()
  x = jax.random.normal(jax.random.PRNGKey(1), (1, T, D))
  far = x.at[:, 0].set(jax.random.normal(jax.random.PRNGKey(2), (D,)))    # outside the window
  swapped = x.at[:, T - 3].set(x[:, T - 2]).at[:, T - 2].set(x[:, T - 3])  # inside the window

  @jax.jit
  def last_token_changes(layer_params):
    outs = [blocks.TransformerBlock(cfg, i).apply({"params": layer_params[i]}, y)[:, -1]
            for i in range(DEPTH) for y in (x, far, swapped)]
    outs = jnp.stack(outs).reshape(DEPTH, 3, D)
    return jnp.max(jnp.abs(outs[:, 1:] - outs[:, :1]), axis=-1)          # [DEPTH, (far, swap)]

  changes = np.asarray(last_token_changes([params["decoder"][f"layer_{i}"] for i in range(DEPTH)]))
  for i in range(DEPTH):
    nope = i % EVERY == EVERY - 1
    far_change, swap_change = changes[i]
    # Full attention reads the far token; the window does not.
    assert (far_change > tolerances.CHANGED_MAX_ABS) == nope, (i, changes[i])
    assert nope or far_change < tolerances.REACHED_ABS, (i, changes[i])
    # RoPE sees the order of the tokens it reads; NoPE does not.
    assert (swap_change > tolerances.CHANGED_MAX_ABS) != nope, (i, changes[i])
    assert not nope or swap_change < tolerances.REACHED_ABS, (i, changes[i])


def test_rnope_model_trains_one_step():
  model = models.build_model(_config(), SPEC)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, T + 1), 0, V, jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), inputs))

  def loss(p):
    logits = model.apply(p, inputs)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  @jax.jit
  def step(p):
    value, grads = jax.value_and_grad(loss)(p)
    return value, grads, jax.tree.map(lambda a, g: a - 0.05 * g, p, grads), loss(
        jax.tree.map(lambda a, g: a - 0.05 * g, p, grads))

  before, grads, _, after = step(params)
  assert np.isfinite(float(before)) and float(after) < float(before)
  for i in range(DEPTH):
    kernel = grads["params"]["decoder"][f"layer_{i}"]["attention"]["query"]["kernel"]
    assert float(jnp.max(jnp.abs(kernel))) > 0, i


@pytest.mark.parametrize("overrides,match", [
    (dict(layer_rope="every 2: yes"), "model.layer_rope"),
    (dict(layer_rope=[True, False]), "model.layer_rope"),
    (dict(layer_rope="every 2: nope", rope_base=None), "model.layer_rope"),
    (dict(rope_scaling={"rope_type": "linear"}), "model.rope_scaling"),
    (dict(fope={"train_length": 4}), "model.fope"),
    (dict(fope={"train_length": 64}, rope_scaling={"rope_type": "linear", "factor": 2.0}),
     "model.fope"),
])
def test_bad_rope_options_raise_naming_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    models.build_model(_config(**overrides), SPEC)


def test_fope_reaches_the_rope_layers_only():
  """`model.fope` builds FoPE buffers in the RoPE layers; the NoPE layers have none."""
  model = models.build_model(_config(fope={"train_length": 8}), SPEC)
  variables = models.abstract_variables(model, SPEC)
  for i in range(DEPTH):
    attention = variables.get("buffers", {}).get("decoder", {}).get(f"layer_{i}", {})
    assert ("attention" in attention) == (i % EVERY != EVERY - 1), i
