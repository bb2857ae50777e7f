"""TidalDecode (arXiv:2410.05076): token-selection layers run full attention for the decode query and
keep each head's top-k key positions; every later layer attends only to the positions of the last
selection, with one re-selection mid-stack.

Checked on a 4-layer toy decoder (select, sparse, re-select, sparse; GQA; a cached prefill) against
a float64 numpy rewrite of the authors' rule (`torch.topk` of each head's scores in the selection
layers, softmax over the stored positions elsewhere); that top_k covering the cache is the full
stack; that a sparse layer reads no key or value outside the selected positions; the layer roles;
and a padded cache (no selection past the length, unfillable slots invalid, no NaN).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import flex
from attnjax.ops.sparse import tidal_decode as tidal
from tests import inputs
from tests import numpy_math
from tests import tolerances

B, L, D, N, K, H = 2, 19, 16, 4, 2, 4          # batch, prefill length, width, heads, kv heads, head dim
ROLES = tidal.tidal_layer_roles(4, selection_layer=0, reselection_layer=2)


def _weights(seed=0, layers=4):
  rng = np.random.default_rng(seed)
  shapes = dict(wq=(D, N * H), wk=(D, K * H), wv=(D, K * H), wo=(N * H, D))
  return [{name: rng.standard_normal(shape) * 1.5 / np.sqrt(shape[0]) for name, shape in shapes.items()}
          for _ in range(layers)]


def _project(x, w):
  """float64 q [B, T, N, H], k, v [B, T, K, H] of hidden states x [B, T, D]."""
  b_, t_ = x.shape[:2]
  return ((x @ w["wq"]).reshape(b_, t_, N, H), (x @ w["wk"]).reshape(b_, t_, K, H),
          (x @ w["wv"]).reshape(b_, t_, K, H))


def _attend(q, k, v, keep):
  """float64 per-head softmax attention, `keep [B, N, T, S]`."""
  kk, vv = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
  w = numpy_math.softmax(H ** -0.5 * np.einsum("btnh,bsnh->bnts", q, kk), where=keep)
  return np.einsum("bnts,bsnh->btnh", w, vv)


def _prefill(weights, x):
  """Per-layer KV caches of a causal prefill (float64) and the decode token's first hidden state."""
  caches = []
  keep = np.tril(np.ones((L, L), bool))[None, None]
  for w in weights:
    q, k, v = _project(x, w)
    caches.append((k, v))
    x = x + _attend(q, k, v, keep).reshape(B, L, N * H) @ w["wo"]
  return caches


def _decode_numpy(weights, caches, x, roles, top_k):
  """The authors' rule in float64: one decode token through the stack."""
  chosen = None
  for w, (ck, cv), role in zip(weights, caches, roles, strict=True):
    q, k, v = _project(x, w)
    k, v = np.concatenate([ck, k], 1), np.concatenate([cv, v], 1)
    s = np.einsum("bnh,bsnh->bns", q[:, 0], np.repeat(k, N // K, axis=2))
    keep = np.ones((B, N, 1, L + 1), bool)
    if role == "select":
      top = np.argsort(-s, axis=-1, kind="stable")[..., :top_k]                  # [B, N, top_k]
      chosen = np.zeros((B, N, L + 1), bool)
      np.put_along_axis(chosen, top, True, axis=-1)
    elif role == "sparse":
      keep = chosen[:, :, None]
    x = x + _attend(q, k, v, keep).reshape(B, 1, N * H) @ w["wo"]
  return x


def _decode_jax(weights, caches, x, roles, top_k):
  """The stack with the library's functions (float32), returning the output and each layer's
  selection."""
  x = jnp.asarray(x, jnp.float32)
  selection, trace = None, []
  for w, (ck, cv), role in zip(weights, caches, roles, strict=True):
    w = {name: jnp.asarray(a, jnp.float32) for name, a in w.items()}
    q = (x @ w["wq"]).reshape(B, 1, N, H)
    k = jnp.concatenate([jnp.asarray(ck, jnp.float32), (x @ w["wk"]).reshape(B, 1, K, H)], 1)
    v = jnp.concatenate([jnp.asarray(cv, jnp.float32), (x @ w["wv"]).reshape(B, 1, K, H)], 1)
    if role == "sparse":
      out = tidal.tidal_sparse_attention(q, k, v, *selection)
    else:
      out = flex.flex_attention(q, k, v)
      if role == "select":
        selection = tidal.tidal_select(q, k, top_k, q_offset=L)
    trace.append(selection)
    x = x + out.reshape(B, 1, N * H) @ w["wo"]
  return x, trace


def test_layer_roles():
  assert ROLES == ("select", "sparse", "select", "sparse")
  assert tidal.tidal_layer_roles(32, selection_layer=2, reselection_layer=13)[:4] == (
      "full", "full", "select", "sparse")
  with pytest.raises(ValueError, match="tidal_layer_roles: `reselection_layer`"):
    tidal.tidal_layer_roles(4, selection_layer=2, reselection_layer=1)


@pytest.mark.parametrize("top_k", [5, L + 1])
def test_four_layer_stack_follows_the_authors_rule(top_k):
  weights = _weights()
  rng = np.random.default_rng(1)
  caches = _prefill(weights, rng.standard_normal((B, L, D)))
  x = rng.standard_normal((B, 1, D))
  got, trace = jax.jit(lambda x: _decode_jax(weights, caches, x, ROLES, top_k))(x)
  want = _decode_numpy(weights, caches, x, ROLES, top_k)
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))
  # Position persistence: each sparse layer uses the selection of the layer before it.
  assert trace[1] is not None and trace[3] is not None
  if top_k == L + 1:
    full = _decode_numpy(weights, caches, x, ("full",) * 4, top_k)
    np.testing.assert_allclose(got, full, **tolerances.output(jnp.float32))
  else:
    # The re-selection changed the positions (the claim that one mid-stack refresh matters).
    assert not np.array_equal(np.sort(trace[0][0], -1), np.sort(trace[2][0], -1))


def test_sparse_layer_reads_only_the_selected_positions():
  q, k, v = inputs.qkv(B=B, T=1, S=L, N=N, K=K, H=H, h=H, seed=2)
  indices, valid = tidal.tidal_select(q, k, 4, q_offset=L - 1)
  attend = jax.jit(tidal.tidal_sparse_attention)
  base = attend(q, k, v, indices, valid)
  # Positions no head of the key's group selected: moving their keys and values changes nothing.
  used = np.zeros((B, L, K), bool)
  for b in range(B):
    for n in range(N):
      used[b, np.asarray(indices[b, n, 0]), n // (N // K)] = True
  unused = jnp.asarray(~used)[..., None]
  moved = attend(q, jnp.where(unused, 5.0 * k + 1.0, k), jnp.where(unused, -v + 3.0, v),
                 indices, valid)
  np.testing.assert_array_equal(moved, base)
  assert tolerances.rel_rms(attend(q, k, v + 1.0, indices, valid), base) > tolerances.CHANGED_REL_RMS


def test_padded_cache_never_selects_past_the_length():
  q, k, v = inputs.qkv(B=B, T=1, S=L, N=N, K=K, H=H, h=H, seed=3)
  lengths = jnp.asarray([L, 3])
  garbage = jnp.arange(L)[None, :, None, None] >= lengths[:, None, None, None]
  k, v = jnp.where(garbage, 1e4, k), jnp.where(garbage, 1e4, v)
  indices, valid = tidal.tidal_select(q, k, 6, q_offset=lengths - 1, kv_lengths=lengths)
  assert np.all(np.asarray(valid[0]))
  np.testing.assert_array_equal(valid[1, :, 0], np.broadcast_to(np.arange(6) < 3, (N, 6)))  # 3 keys
  assert np.all(np.where(valid, indices, 0) < lengths[:, None, None, None])
  out = tidal.tidal_sparse_attention(q, k, v, indices, valid)
  assert np.all(np.isfinite(np.asarray(out)))
  # Row 1 holds all 3 real keys: its sparse attention is full attention over them.
  full = flex.flex_attention(q[1:], k[1:, :3], v[1:, :3])
  np.testing.assert_allclose(out[1:], full, **tolerances.output(jnp.float32))
