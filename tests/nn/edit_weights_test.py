"""`edit_weights`: an edit of the post-softmax maps replaces what the layer multiplies V by, only
inside its context, for softmax layers only; the captured maps are the edited ones."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.nn import MultiHeadAttention
from attnjax.nn.maps import CAPTURE, edit_weights
from tests import tolerances

B, T, D, N, K = 2, 7, 16, 4, 2
TOL = tolerances.output(jnp.float32)


def _layer(**kw):
  return MultiHeadAttention(num_heads=N, num_kv_heads=K, qkv_features=N * 4, causal=True,
                            bias_init=nn.initializers.normal(0.1), **kw)


def _setup(**kw):
  layer = _layer(**kw)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D), jnp.float32)
  return layer, layer.init(jax.random.PRNGKey(1), x), x


def _previous_token(w):
  one_hot = jnp.eye(T, k=-1).at[0, 0].set(1.0)
  return jnp.broadcast_to(one_hot, w.shape)


def test_identity_edit_is_the_plain_forward_and_nothing_leaks_out_of_the_context():
  layer, variables, x = _setup()
  plain = layer.apply(variables, x)
  paths = []
  with edit_weights(lambda w, path: (paths.append(path), w)[1]):
    same = layer.apply(variables, x)
  np.testing.assert_allclose(same, plain, **TOL)
  assert len(paths) == 1
  with edit_weights(_previous_token):
    pass
  np.testing.assert_allclose(layer.apply(variables, x), plain, **TOL)


def test_edited_maps_multiply_the_values_and_are_captured():
  layer, variables, x = _setup()
  with edit_weights(lambda w, path: _previous_token(w)):
    y, state = layer.apply(variables, x, mutable=[CAPTURE])
  (captured,) = state[CAPTURE]["weights"]
  np.testing.assert_allclose(captured, _previous_token(captured), **TOL)
  # Explicitly: head n reads key head n // (N/K) of the previous position, then the out projection.
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  v = np.einsum("btd,dkh->btkh", np.asarray(x, np.float64), p["value"]["kernel"]) + p["value"]["bias"]
  prev = np.concatenate([v[:, :1], v[:, :-1]], axis=1)            # [B, T, K, h]
  o = np.repeat(prev, N // K, axis=2)                                # [B, T, N, h]
  want = np.einsum("btnh,nhf->btf", o, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(y, want, **TOL)


def test_edits_need_softmax_and_keep_the_shape():
  layer, variables, x = _setup(mechanism="alibi")
  with edit_weights(lambda w, path: w), pytest.raises(ValueError, match="softmax"):
    layer.apply(variables, x)
  layer, variables, x = _setup()
  with edit_weights(lambda w, path: w[..., :-1]), pytest.raises(ValueError, match=r"\[B, N, T, S\]"):
    layer.apply(variables, x)
