"""AFiLM (#107, arXiv:2108.11637): the block max-pooling, the post-norm transformer encoder across
blocks and the per-block scaling against a float64 rewrite with explicit loops (a trailing partial
block included), and the claim's mechanism: each block's scale depends on the other blocks through
attention."""

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.vision import channel
from tests import tolerances


def _ln(v, g, b, eps=1e-6):
  return (v - v.mean()) / np.sqrt(v.var() + eps) * g + b


def _reference(x, w, block, heads):
  B, L, C = x.shape
  n = -(-L // block)
  d = C // heads
  out = np.zeros_like(x)
  scales = []
  for bi in range(B):
    e = np.stack([x[bi, j * block:(j + 1) * block].max(axis=0) for j in range(n)]) * np.sqrt(C)
    for p in range(n):
      for i in range(C):
        angle = p / 10000 ** (2 * (i // 2) / C)
        e[p, i] += np.sin(angle) if i % 2 == 0 else np.cos(angle)
    for l in range(w["wq"].shape[0]):
      q, k, v = e @ w["wq"][l] + w["bq"][l], e @ w["wk"][l], e @ w["wv"][l] + w["bv"][l]
      att = np.zeros((n, C))
      for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        for r in range(n):
          s = np.array([q[r, sl] @ k[m, sl] for m in range(n)]) / np.sqrt(d)
          p = np.exp(s - s.max())
          p /= p.sum()
          att[r, sl] = sum(p[m] * v[m, sl] for m in range(n))
      att = att @ w["wo"][l] + w["bo"][l]
      a = np.stack([_ln(e[r] + att[r], w["ln1_scale"][l], w["ln1_bias"][l]) for r in range(n)])
      f = np.maximum(a @ w["ff1"][l] + w["ff1_bias"][l], 0) @ w["ff2"][l] + w["ff2_bias"][l]
      e = np.stack([_ln(a[r] + f[r], w["ln2_scale"][l], w["ln2_bias"][l]) for r in range(n)])
    for t in range(L):
      out[bi, t] = x[bi, t] * e[t // block]
    scales.append(e)
  return out, np.stack(scales)


def _weights(rng, layers, C, F):
  shapes = dict(wq=(C, C), bq=(C,), wk=(C, C), wv=(C, C), bv=(C,), wo=(C, C), bo=(C,), ln1_scale=(C,),
                ln1_bias=(C,), ff1=(C, F), ff1_bias=(F,), ff2=(F, C), ff2_bias=(C,), ln2_scale=(C,),
                ln2_bias=(C,))
  return {n: 0.5 * rng.standard_normal((layers, *s)) for n, s in shapes.items()}


def test_block_attention_film_against_float64_loops():
  rng = np.random.default_rng(0)
  B, L, C, block, heads = 2, 10, 4, 3, 2                # blocks of 3, 3, 3 and a partial one of 1
  x = rng.standard_normal((B, L, C))
  w = _weights(rng, 2, C, 5)
  y, scale = channel.attention_film(jnp.asarray(x, jnp.float32), block_size=block, num_heads=heads,
                                    return_scale=True,
                                    **{n: jnp.asarray(a, jnp.float32) for n, a in w.items()})
  want, want_scale = _reference(x, w, block, heads)
  assert scale.shape == (B, 4, C)
  np.testing.assert_allclose(scale, want_scale, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(y, want, **tolerances.output(jnp.float32))


def test_a_blocks_scale_depends_on_the_other_blocks():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 12, 8))
  layer = channel.AttentionFiLM(block_size=4, num_layers=1, ff_dim=16)
  variables = layer.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32))
  fn = jax.jit(lambda x: channel.attention_film(x, **variables["params"], block_size=4,
                                                return_scale=True)[1])
  base = fn(jnp.asarray(x, jnp.float32))
  x2 = x.copy()
  x2[0, 8:] += 2.0                                      # change the last block only
  moved = fn(jnp.asarray(x2, jnp.float32))
  assert tolerances.rel_rms(moved[:, 0], base[:, 0]) > tolerances.CHANGED_REL_RMS
