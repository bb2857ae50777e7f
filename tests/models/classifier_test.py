"""EncoderClassifier: output shapes for mean and CLS pooling, bidirectional attention, padding kept
out of attention and pooling, and the pooling function."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from attnjax import models
from attnjax.data.base import TaskSpec
from attnjax.models import classifier
from tests import tolerances

B, T, V, C = 2, 10, 30, 5
TOL = tolerances.output(jnp.float32)


def _spec(seq_len=T):
  return TaskSpec(name="toy_cls", kind="classify", input_shape=(seq_len,), input_dtype="int32",
                  vocab_size=V, num_classes=C, seq_len=seq_len)


def _model(spec=None, **overrides):
  config = dict(arch="encoder_classifier", width=32, depth=2, num_heads=4, mlp_dim=64,
                mechanism="softmax", pooling="mean")
  return models.build_model(ml_collections.ConfigDict({**config, **overrides}), spec or _spec())


def _tokens(seed=0, shape=(B, T), low=0):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, low, V, jnp.int32)


def _init_apply(model, tokens):
  return jax.jit(lambda t: (lambda v: (v, model.apply(v, t)))(
      model.init(jax.random.PRNGKey(0), t)))(tokens)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_shapes_and_bidirectional_attention(pooling):
  model = _model(pooling=pooling)
  tokens = _tokens()
  variables, logits = _init_apply(model, tokens)
  chex.assert_shape(logits, (B, C))
  assert logits.dtype == jnp.float32
  params = nn.unbox(variables)["params"]
  chex.assert_shape(params["pos_embed"], (T + (pooling == "cls"), 32))
  assert ("cls" in params) == (pooling == "cls")
  # The last token reaches the pooled summary whichever token the head reads (no causal mask).
  changed = jax.jit(model.apply)(variables, tokens.at[:, -1].set((tokens[:, -1] + 1) % V))
  assert float(jnp.max(jnp.abs(changed - logits))) > tolerances.CHANGED_POOLED_MAX_ABS


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_is_ignored(pooling):
  """With pad_id, a padded sequence classifies as the unpadded one (RoPE: no length-sized table)."""
  pad = 0
  real = _tokens(shape=(B, 6), low=1)
  padded = jnp.concatenate([real, jnp.full((B, 4), pad, jnp.int32)], axis=1)
  kw = dict(pad_id=pad, rope_base=10000.0, position_embedding="none", pooling=pooling)
  short = _model(_spec(6), **kw)
  variables, want = _init_apply(short, real)
  got = jax.jit(_model(_spec(T), **kw).apply)(variables, padded)
  chex.assert_trees_all_close(got, want, **TOL)


def test_pool():
  x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  chex.assert_trees_all_close(classifier.pool(x, "cls"), x[:, 0])
  chex.assert_trees_all_close(classifier.pool(x, "mean"), x.mean(axis=1))
  mask = jnp.array([[1, 1, 0], [1, 0, 0]], bool)
  chex.assert_trees_all_close(classifier.pool(x, "mean", mask),
                              jnp.stack([x[0, :2].mean(axis=0), x[1, 0]]))
  with pytest.raises(ValueError, match="pooling"):
    classifier.pool(x, "max")
