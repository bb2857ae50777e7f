"""MoBA (arXiv:2502.13189): each query attends to its own block (causally) and the blocks with the
highest gate q · mean(k_block) among those wholly in its past, `top_k` blocks in all.

Checked against a float64 numpy rewrite of the authors' `moba_naive.py` (gate, -inf on blocks not
wholly past, +inf on the own block, top-k, then one causal softmax over the selected keys), per head
with GQA, with and without padding; the catalog's claim (top_k covering every block is full
attention); a hand-built case whose chosen blocks are known; and the fast path's gradients against
the reference's.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import flex
from attnjax.ops.sparse import moba
from tests import inputs
from tests import numpy_math
from tests import tolerances

B, T, N, K, H, HV = 2, 19, 4, 2, 8, 6
BLOCK = 4
NB = -(-T // BLOCK)


def _moba_numpy(q, k, v, *, block_size, top_k, causal, kv_lengths=None, scale=None):
  """float64 rewrite of moba_naive.py (per batch row and head; GQA by head groups)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t_, n_, h_ = q.shape
  s_, kh = k.shape[1], k.shape[2]
  scale = h_ ** -0.5 if scale is None else scale
  nb = -(-s_ // block_size)
  lengths = np.full(b_, s_) if kv_lengths is None else np.asarray(kv_lengths)
  out = np.zeros((b_, t_, n_, v.shape[-1]))
  for b in range(b_):
    for n in range(n_):
      kk, vv = k[b, :, n // (n_ // kh)], v[b, :, n // (n_ // kh)]
      means = np.stack([kk[j * block_size:min((j + 1) * block_size, lengths[b])].mean(0)
                        if j * block_size < lengths[b] else np.zeros(h_) for j in range(nb)])
      for t in range(t_):
        gate = means @ q[b, t, n]
        own = t // block_size
        for j in range(nb):
          if j * block_size >= lengths[b] or (causal and j > own):
            gate[j] = -np.inf
        gate[own] = np.inf
        ranked = np.argsort(-gate, kind="stable")[:top_k]
        chosen = [j for j in ranked if gate[j] > -np.inf]
        keys = np.zeros(s_, bool)
        for j in chosen:
          keys[j * block_size:(j + 1) * block_size] = True
        keys &= np.arange(s_) < lengths[b]
        if causal:
          keys &= np.arange(s_) <= t
        w = numpy_math.softmax(scale * kk @ q[b, t, n], where=keys)
        out[b, t, n] = w @ vv
  return out


@pytest.mark.parametrize("causal", [True, False])
def test_matches_numpy_rewrite_of_the_authors_code(causal):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=1)
  lengths = jnp.array([T, 14])
  want = _moba_numpy(q, k, v, block_size=BLOCK, top_k=2, causal=causal, kv_lengths=lengths)
  for impl in ("xla", "reference"):
    fn = inputs.jit_with(moba.moba_attention, causal=causal, block_size=BLOCK, top_k=2,
                         implementation=impl)
    got = np.asarray(fn(q, k, v, kv_lengths=lengths))
    # Queries at or past a row's length are padding (no own block among the real keys): not compared.
    for b, length in enumerate(np.asarray(lengths)):
      np.testing.assert_allclose(got[b, :length], want[b, :length], err_msg=impl,
                                 **tolerances.output(jnp.float32))


@pytest.mark.parametrize("causal", [True, False])
def test_top_k_covering_every_block_is_full_attention(causal):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=2)
  got = inputs.jit_with(moba.moba_attention, causal=causal, block_size=BLOCK, top_k=NB)(q, k, v)
  mask = (lambda b, n, i, j: i >= j) if causal else None
  want = inputs.jit_with(flex.flex_attention, mask_mod=mask, implementation="reference")(q, k, v)
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))
  sparse_out = inputs.jit_with(moba.moba_attention, causal=causal, block_size=BLOCK, top_k=2)(q, k, v)
  assert tolerances.rel_rms(sparse_out, want) > tolerances.CHANGED_REL_RMS  # top_k < nb is sparse


def test_hand_built_example_selects_the_known_blocks():
  """Keys of block 1 point along e0, all others along e1; a query along e0 in block 3 must pick
  blocks {1, 3} with top_k = 2, and a query along e1 the best e1 block before its own."""
  t, h = 16, 2
  k = np.zeros((1, t, 1, h), np.float32)
  k[0, :, 0, 1] = np.linspace(0.1, 1.0, t)     # e1 grows with the position: block 2 wins among past
  k[0, 4:8, 0] = [3.0, 0.0]                    # block 1 along e0
  v = np.random.default_rng(0).standard_normal((1, t, 1, 3)).astype(np.float32)
  q = np.zeros((1, t, 1, h), np.float32)
  q[0, 15, 0] = [1.0, 0.0]
  q[0, 14, 0] = [0.0, 1.0]
  selected = np.asarray(inputs.jit_with(moba.moba_selection, block_size=4, top_k=2, causal=True)(
      jnp.asarray(q), jnp.asarray(k)))
  np.testing.assert_array_equal(selected[0, 0, 15], [False, True, False, True])
  np.testing.assert_array_equal(selected[0, 0, 14], [False, False, True, True])
  np.testing.assert_array_equal(selected[0, 0, 2], [True, False, False, False])  # own block only
  out = inputs.jit_with(moba.moba_attention, causal=True, block_size=4, top_k=2)(q, k, v)
  keys = np.r_[4:8, 12:16]
  w = numpy_math.softmax(k[0, keys, 0].astype(np.float64) @ q[0, 15, 0] * h ** -0.5)
  np.testing.assert_allclose(out[0, 15, 0], w @ v[0, keys, 0], **tolerances.output(jnp.float32))


def test_fast_path_gradients_match_the_reference():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=3)
  dout = np.random.default_rng(4).standard_normal((B, T, N, HV)).astype(np.float32)
  kw = dict(causal=True, block_size=BLOCK, top_k=2)
  inputs.assert_same_gradients(
      lambda *a: moba.moba_attention(*a, **kw, implementation="xla"),
      lambda *a: moba.moba_attention(*a, **kw, implementation="reference"),
      (q, k, v), dout, ("dq", "dk", "dv"), tol=tolerances.grad(jnp.float32))


def test_rejects_packed_sequences():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV)
  with pytest.raises(ValueError, match="moba_attention.*segment_ids"):
    moba.moba_attention(q, k, v, segment_ids=jnp.zeros((B, T), jnp.int32), block_size=BLOCK)
