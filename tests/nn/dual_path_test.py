"""SepFormer's dual-path chunked attention (#239) as Flax layers.

The defining structure: the sequence is cut into chunks of C with 50% overlap (zero padding as
speechbrain's `_padding` / `_Segmentation`), an intra path attends within each chunk, an inter path
across chunks at each within-chunk position, and overlap-add (`_over_add`) returns to the sequence.
Checked: segmentation and overlap-add against float64 numpy rewrites of the authors' tensor code
(channels-first, `view`s and all) for lengths that are not multiples of C/2; the round trip of
unchanged chunks is exactly 2x (every position lies in two chunks, summed); the intra path only mixes
within a chunk and the inter path only across chunks at equal within-chunk position (Jacobian
sparsity, with every allowed block nonzero); a whole dual-path block against a float64 rewrite of
`Dual_Computation_Block` (sinusoidal encodings, pre-norm transformer with final norm, GroupNorm with
one group, both residuals); the layer's output shape for several lengths; batch independence; bad
input errors.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.nn import ChunkPath, DualPathBlock, DualPathChunkedAttention, TransformerConfig
from attnjax.nn.dual_path import overlap_add, segment
from tests import tolerances

B, D, C, HEADS, MLP_DIM = 2, 4, 4, 2, 8
F32 = tolerances.output(jnp.float32)
CONFIG = TransformerConfig(width=D, num_heads=HEADS, mechanisms=("softmax",),
                           mechanism_kwargs=({},), mlp_dim=MLP_DIM, norm="layernorm", causal=False)


def _x(L, seed=0, batch=B):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, L, D), jnp.float32)


def _init(module, x, seed=1, std=0.3):
  """Unboxed variables with every parameter moved by std·N(0, 1) (biases and norm offsets too)."""
  variables = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), x))
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [a + std * jax.random.normal(k, a.shape, a.dtype)
                                   for a, k in zip(leaves, keys, strict=True)])


# ---- float64 rewrites of speechbrain's dual_path.py (layout [B, N, L] / [B, N, K, S]) ----

def _segmentation_authors(x, K):
  """`_padding` then `_Segmentation` on `x [B, N, L]` → (`[B, N, K, S]`, gap)."""
  Bx, Nx, L = x.shape
  P = K // 2
  gap = K - (P + L % K) % K
  x = np.concatenate([x, np.zeros((Bx, Nx, gap))], axis=2)
  x = np.concatenate([np.zeros((Bx, Nx, P)), x, np.zeros((Bx, Nx, P))], axis=2)
  input1 = x[:, :, :-P].reshape(Bx, Nx, -1, K)
  input2 = x[:, :, P:].reshape(Bx, Nx, -1, K)
  return np.concatenate([input1, input2], axis=3).reshape(Bx, Nx, -1, K).transpose(0, 1, 3, 2), gap


def _over_add_authors(x, gap):
  Bx, Nx, K, _ = x.shape
  P = K // 2
  x = x.transpose(0, 1, 3, 2).reshape(Bx, Nx, -1, K * 2)
  input1 = x[:, :, :, :K].reshape(Bx, Nx, -1)[:, :, P:]
  input2 = x[:, :, :, K:].reshape(Bx, Nx, -1)[:, :, :-P]
  out = input1 + input2
  return out[:, :, :-gap] if gap > 0 else out


def _f(a):
  return np.asarray(a, np.float64)


def _layernorm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * _f(p["scale"]) \
      + _f(p["bias"])


def _transformer_float64(x, p):
  """One pre-norm layer (softmax MHA with biases, tanh-GELU MLP) and the final LayerNorm (ε 1e-6,
  flax's) on `x [batch, L, D]`."""
  lp, a = p["layer_0"], p["layer_0"]["attention"]
  h = _layernorm(x, lp["attention_norm"], 1e-6)
  q, k, v = (np.einsum("bld,dnh->blnh", h, _f(a[n]["kernel"])) + _f(a[n]["bias"])
             for n in ("query", "key", "value"))
  s = np.einsum("blnh,bmnh->bnlm", q, k) / math.sqrt(q.shape[-1])
  w = np.exp(s - s.max(-1, keepdims=True))
  o = np.einsum("bnlm,bmnh->blnh", w / w.sum(-1, keepdims=True), v)
  x = x + np.einsum("blnh,nhd->bld", o, _f(a["out"]["kernel"])) + _f(a["out"]["bias"])
  h = _layernorm(x, lp["mlp_norm"], 1e-6)
  m = h @ _f(lp["mlp"]["wi"]["kernel"]) + _f(lp["mlp"]["wi"]["bias"])
  m = 0.5 * m * (1 + np.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m ** 3)))
  x = x + m @ _f(lp["mlp"]["wo"]["kernel"]) + _f(lp["mlp"]["wo"]["bias"])
  return _layernorm(x, p["final_norm"], 1e-6)


def _pos_enc(length, d):
  """speechbrain's `PositionalEncoding` table `[length, d]`."""
  pe = np.zeros((length, d))
  pos = np.arange(length)[:, None]
  den = np.exp(np.arange(0, d, 2) * -(math.log(10000.0) / d))
  pe[:, 0::2], pe[:, 1::2] = np.sin(pos * den), np.cos(pos * den)
  return pe


def _group_norm(x, p):
  """`GroupNorm(1, N, eps=1e-8)` on `[B, N, K, S]`: statistics over (N, K, S) per example."""
  mu = x.mean(axis=(1, 2, 3), keepdims=True)
  var = ((x - mu) ** 2).mean(axis=(1, 2, 3), keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-8) * _f(p["scale"])[:, None, None] \
      + _f(p["bias"])[:, None, None]


def _dual_block_authors(x, p):
  """`Dual_Computation_Block.forward` (norm "ln", skip around intra, no linear) on `x [B, N, K, S]`
  with `SBTransformerBlock(use_positional_encoding=True)` as both models."""
  Bx, Nx, K, S = x.shape
  intra = x.transpose(0, 3, 2, 1).reshape(Bx * S, K, Nx)
  intra = _transformer_float64(intra + _pos_enc(K, Nx), p["intra"]["transformer"])
  intra = intra.reshape(Bx, S, K, Nx).transpose(0, 3, 2, 1)
  intra = _group_norm(intra, p["intra_norm"]) + x
  inter = intra.transpose(0, 2, 3, 1).reshape(Bx * K, S, Nx)
  inter = _transformer_float64(inter + _pos_enc(S, Nx), p["inter"]["transformer"])
  inter = inter.reshape(Bx, K, S, Nx).transpose(0, 3, 1, 2)
  return _group_norm(inter, p["inter_norm"]) + intra


# ---- tests ----

@pytest.mark.parametrize("L", [6, 7, 9])
def test_segmentation_and_overlap_add_match_authors(L):
  x = _x(L)
  chunks, gap = segment(x, C)
  want, want_gap = _segmentation_authors(_f(x).transpose(0, 2, 1), C)
  assert gap == want_gap and chunks.shape == (B, C, want.shape[-1], D)
  np.testing.assert_array_equal(np.asarray(chunks).transpose(0, 3, 1, 2), want)
  y = jax.random.normal(jax.random.PRNGKey(3), chunks.shape)     # arbitrary chunk contents
  np.testing.assert_allclose(np.asarray(overlap_add(y, gap)),
                             _over_add_authors(_f(y).transpose(0, 3, 1, 2), gap).transpose(0, 2, 1),
                             **F32)
  # Unchanged chunks: every position is in exactly two chunks, summed.
  np.testing.assert_array_equal(np.asarray(overlap_add(chunks, gap)), 2 * np.asarray(x))


@pytest.mark.parametrize("kind", ["intra", "inter"])
def test_paths_mix_only_along_their_axis(kind):
  S = 5
  x = jax.random.normal(jax.random.PRNGKey(0), (1, C, S, D))
  path = ChunkPath(CONFIG, kind)
  variables = _init(path, x)
  jac = np.asarray(jax.jit(jax.jacrev(lambda a: path.apply(variables, a)))(x))[0, :, :, :, 0]
  block = np.abs(jac).sum(axis=(2, 5))                   # [c_out, s_out, c_in, s_in]
  c, s = np.meshgrid(np.arange(C), np.arange(S), indexing="ij")
  same = (s[:, :, None, None] == s[None, None]) if kind == "intra" else \
      (c[:, :, None, None] == c[None, None])
  assert np.all(block[~same] == 0.0)
  assert np.all(block[same] > 0.0)


def test_dual_block_matches_authors():
  chunks, _ = segment(_x(9), C)
  block = DualPathBlock(CONFIG)
  variables = _init(block, chunks)
  got = jax.jit(block.apply)(variables, chunks)
  want = _dual_block_authors(_f(chunks).transpose(0, 3, 1, 2), variables["params"])
  np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), **F32)


def test_layer_shapes_and_batch_independence():
  layer = DualPathChunkedAttention(C, CONFIG, num_blocks=2)
  apply = None
  for L in (7, 10):
    x = _x(L)
    if apply is None:
      variables = _init(layer, x)
      apply = jax.jit(layer.apply)
    y = apply(variables, x)
    assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
  moved = x.at[1].add(jax.random.normal(jax.random.PRNGKey(9), x.shape[1:]))
  y2 = apply(variables, moved)
  np.testing.assert_array_equal(np.asarray(y2[0]), np.asarray(y[0]))
  assert np.abs(np.asarray(y2[1] - y[1])).max() > tolerances.CHANGED_MAX_ABS


def test_bad_input():
  with pytest.raises(ValueError, match="DualPathChunkedAttention.*even"):
    DualPathChunkedAttention(5, CONFIG).init(jax.random.PRNGKey(0), _x(7))
  causal = TransformerConfig(width=D, num_heads=HEADS, mechanisms=("softmax",),
                             mechanism_kwargs=({},), mlp_dim=MLP_DIM, causal=True)
  with pytest.raises(ValueError, match="DualPathBlock.*non-causal"):
    DualPathChunkedAttention(C, causal).init(jax.random.PRNGKey(0), _x(7))
  with pytest.raises(ValueError, match="DualPathChunkedAttention.*shape"):
    DualPathChunkedAttention(C, CONFIG).init(jax.random.PRNGKey(0), jnp.zeros((7, D)))
