"""LSG attention (#45): local blocks, sparse compressed tokens and global tokens under one softmax.

The defining computation is the authors' block arithmetic (ccdv-ai/convert_checkpoint_to_lsg):
global queries attend to everything; each query block attends to [global keys, the sparse tokens
cut from the padded compressed sequence by `reshape_to_sparse_block` (windows of 6·sbs with step
bs/sf, the slices [u - sbs, u) and [size - u, size - u + sbs)), the three local blocks]. A float64
numpy rewrite that follows those steps literally (per batch row and head, with the code's norm
selection by ascending argsort) is compared to the operator for every sparsity type and both
implementations, with GQA, padding and a body length bs does not divide; the gradients against
finite differences of that rewrite. The catalog's claim (extrapolation without training) rests on
two properties tested here: at lengths up to G + 2·bs LSG is exactly full attention (the pretrained
model is unchanged), and the keys a query reaches stay bounded as the sequence grows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.local import lsg_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances

SETTINGS = dict(block_size=4, sparse_block_size=2, sparsity_factor=2, num_global_tokens=1)


def _compress64(kb, vb, real, *, stype, bs, sbs, sf, kv_head):
  """The code's get_sparse_tokens_with_<type> for one head: compressed keys, values, mask."""
  Lp = len(kb)
  M = Lp // sf
  if stype == "pooling":
    kc, vc, mc = np.zeros((M, kb.shape[1])), np.zeros((M, vb.shape[1])), np.zeros(M, bool)
    for m in range(M):
      r = real[m * sf:(m + 1) * sf]
      mc[m] = r.any()
      if mc[m]:
        kc[m], vc[m] = kb[m * sf:(m + 1) * sf][r].mean(0), vb[m * sf:(m + 1) * sf][r].mean(0)
    return kc, vc, mc
  if stype == "norm":
    chunk = min(bs, sbs)
    norm = np.linalg.norm(kb, axis=-1) * real
    idx = np.concatenate([c * chunk + np.argsort(norm[c * chunk:(c + 1) * chunk])[chunk - chunk // sf:]
                          for c in range(Lp // chunk)])
  elif stype == "stride":
    idx = np.arange(M) * sf + kv_head % sf
  else:
    w = bs // sf
    idx = np.concatenate([b * bs + (np.arange(w) + kv_head * w) % bs for b in range(Lp // bs)])
  return kb[idx], vb[idx], real[idx]


def _lsg64(q, k, v, *, stype, kv_lengths, block_size, sparse_block_size, sparsity_factor,
           num_global_tokens):
  bs, sbs, sf, G = block_size, sparse_block_size, sparsity_factor, num_global_tokens
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  group = N // k.shape[2]
  nb = -(-(T - G) // bs)
  Lp, w = nb * bs, bs // sf
  out = np.zeros((B, T, N, v.shape[-1]))
  for b in range(B):
    real = np.arange(T) < kv_lengths[b]
    for n in range(N):
      kh, vh, qh = k[b, :, n // group], v[b, :, n // group], q[b, :, n] * H ** -0.5
      out[b, :G, n] = numpy_math.softmax(qh[:G] @ kh.T, where=real) @ vh   # global queries
      pad = lambda x: np.concatenate([x[G:], np.zeros((Lp - (T - G),) + x.shape[1:], x.dtype)])
      kb, vb, rb = pad(kh), pad(vh), pad(real)
      kc, vc, mc = _compress64(kb, vb, rb, stype=stype, bs=bs, sbs=sbs, sf=sf, kv_head=n // group)
      size = 6 * sbs
      s_pad = (size - w) // 2
      padc = lambda x: np.concatenate([np.zeros((s_pad,) + x.shape[1:], x.dtype), x,
                                       np.zeros((s_pad,) + x.shape[1:], x.dtype)])
      kc, vc, mc = padc(kc), padc(vc), padc(mc)
      u = (size - 3 * w) // 2
      padl = lambda x: np.concatenate([np.zeros((bs,) + x.shape[1:], x.dtype), x,
                                       np.zeros((bs,) + x.shape[1:], x.dtype)])
      kl, vl, ml = padl(kb), padl(vb), padl(rb)
      for qb in range(nb):
        win = slice(qb * w, qb * w + size)
        sel = np.r_[u - sbs:u, size - u:size - u + sbs]
        keys = np.concatenate([kh[:G], kc[win][sel], kl[qb * bs:qb * bs + 3 * bs]])
        vals = np.concatenate([vh[:G], vc[win][sel], vl[qb * bs:qb * bs + 3 * bs]])
        mask = np.concatenate([real[:G], mc[win][sel], ml[qb * bs:qb * bs + 3 * bs]])
        rows = np.arange(G + qb * bs, min(G + (qb + 1) * bs, T))
        out[b, rows, n] = numpy_math.softmax(qh[rows] @ keys.T, where=mask) @ vals
  return out


@pytest.mark.parametrize("stype,implementation", [
    ("norm", "xla"), ("norm", "reference"), ("pooling", "xla"), ("stride", "xla"),
    ("block_stride", "xla")])
def test_equals_the_authors_block_arithmetic(stype, implementation):
  q, k, v = inputs.qkv(B=2, T=23, N=4, K=2, H=8, h=6, seed=1)
  kv_lengths = np.array([23, 17])
  fn = inputs.jit_with(lsg_attention, sparsity_type=stype, implementation=implementation,
                       **SETTINGS)
  want = _lsg64(q, k, v, stype=stype, kv_lengths=kv_lengths, **SETTINGS)
  np.testing.assert_allclose(np.asarray(fn(q, k, v, kv_lengths=jnp.asarray(kv_lengths))), want,
                             **tolerances.output(jnp.float32))


@pytest.mark.parametrize("stype", ["norm", "pooling"])
def test_gradients_match_finite_differences_of_the_rewrite(stype):
  q, k, v = inputs.qkv(B=1, T=21, N=2, K=1, H=4, h=3, seed=3)
  dout = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (1, 21, 2, 3)), np.float64)
  lengths = np.array([21])
  op = lambda *a: jnp.sum(lsg_attention(*a, sparsity_type=stype, implementation="xla", **SETTINGS)
                          * dout)
  grads = jax.jit(jax.grad(op, argnums=(0, 1, 2)))(q, k, v)
  loss64 = lambda *a: np.sum(_lsg64(*a, stype=stype, kv_lengths=lengths, **SETTINGS) * dout)
  numpy_math.check_directional_derivatives(grads, (q, k, v), loss64, ("dq", "dk", "dv"),
                                           rng=np.random.default_rng(0),
                                           tol=tolerances.grad(jnp.float32))


def test_short_sequences_get_exactly_full_attention():
  # T = G + 2·bs: every block's local window covers the whole body, and no sparse token remains.
  T = 1 + 2 * SETTINGS["block_size"]
  q, k, v = inputs.qkv(B=2, T=T, N=4, K=2, H=8, h=6, seed=5)
  out = inputs.jit_with(lsg_attention, **SETTINGS)(q, k, v)
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  k64, v64 = np.repeat(k64, 2, axis=2), np.repeat(v64, 2, axis=2)
  w = numpy_math.softmax(np.einsum("btnh,bsnh->bnts", q64, k64) * 8 ** -0.5)
  np.testing.assert_allclose(np.asarray(out), np.einsum("bnts,bsnh->btnh", w, v64),
                             **tolerances.output(jnp.float32))


def test_keys_reached_per_query_stay_bounded_as_the_sequence_grows():
  # One-hot values make the output row the weight row over positions; with norm selection each
  # compressed token is one position, so a body query sees at most G + 3·bs + 2·sbs keys.
  bound = 1 + 3 * 4 + 2 * 2
  counts = []
  for T in (33, 65):
    q, k, _ = inputs.qkv(B=1, T=T, N=1, K=1, H=8, h=1, seed=6)
    v = jnp.eye(T)[None, :, None, :]
    weights = np.asarray(inputs.jit_with(lsg_attention, **SETTINGS)(q, k, v))[0, :, 0]
    reached = (weights > 0).sum(-1)
    assert reached[0] == T                                       # the global token sees everything
    assert reached[1:].max() <= bound
    counts.append(reached[1 + 12:1 + 20])                        # interior blocks
  np.testing.assert_array_equal(counts[0], counts[1])
  assert counts[0].min() == bound                                # interior queries use every slot


def test_bad_settings_name_the_operator_and_argument():
  q, k, v = inputs.qkv(B=1, T=12, N=2, K=2, H=4, h=4)
  with pytest.raises(ValueError, match="lsg_attention: `sparsity_type`"):
    lsg_attention(q, k, v, sparsity_type="lsh")
  with pytest.raises(ValueError, match="lsg_attention: `sparsity_factor`"):
    lsg_attention(q, k, v, block_size=4, sparsity_factor=3)
  with pytest.raises(ValueError, match="lsg_attention: causal"):
    lsg_attention(q, k, v, causal=True)
