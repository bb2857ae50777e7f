"""Yuan 2.0's Localized Filtering-based Attention (#82) as a Flax layer.

The defining computation is the authors' `LocalizedFiltering._train_forward` (two Conv2d of kernel
(2, 1) with padding (1, 0) over the sequence, truncated to the first T outputs, then
RMSNorm(conv2(conv1(x)) + x)) feeding q and k, with v projected from the raw input. Checked against a
float64 numpy rewrite of that code (the padded convolution written out as the authors run it, then
causal softmax attention), with and without GQA and RoPE; the catalog's claim (causal: the output at
t does not depend on inputs after t, while it does depend on the previous token through the filter);
step-by-step decoding (a prefill, then one token at a time) equals the full forward; a packed row
equals its documents run alone; bad input fails with the layer's name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.nn import LocalizedFiltering, LocalizedFilteringAttention
from tests import inputs
from tests import tolerances

B, T, D, N = 2, 11, 8, 2
F32 = tolerances.output(jnp.float32)


def _x(shape=(B, T, D), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)



def _conv_authors(a, kernel, bias):
  """The authors' Conv2d(C_in, C_out, (2, 1), padding=(1, 0)) over the sequence of `a [L, C_in]`,
  keeping outputs [:L]: zero-pad one step on each side, then out[i] = Σ_j pad[i + j] W_j + b."""
  pad = np.concatenate([np.zeros((1, a.shape[1])), a, np.zeros((1, a.shape[1]))])
  full = np.stack([pad[i] @ kernel[0] + pad[i + 1] @ kernel[1] + bias for i in range(len(pad) - 1)])
  return full[:len(a)]


def _lf_float64(x, p):
  """`LocalizedFiltering._train_forward` per example, float64 (YuanRMSNorm, ε = 1e-6)."""
  f = lambda a: np.asarray(a, np.float64)
  out = []
  for xb in f(x):
    h1 = _conv_authors(xb, f(p["conv1"]["kernel"]), f(p["conv1"]["bias"]))
    h2 = _conv_authors(h1, f(p["conv2"]["kernel"]), f(p["conv2"]["bias"]))
    r = h2 + xb
    out.append(r / np.sqrt((r ** 2).mean(-1, keepdims=True) + 1e-6) * f(p["output_norm"]["scale"]))
  return np.stack(out)


def _rope_float64(a, base=10000.0):
  """Rotate-half RoPE (the authors' `apply_rotary_pos_emb`) on `a [T, n, H]` at positions 0..T-1."""
  H = a.shape[-1]
  inv = base ** (-np.arange(0, H, 2) / H)
  ang = np.arange(a.shape[0])[:, None] * inv[None]
  cos, sin = (np.concatenate([f(ang), f(ang)], -1)[:, None] for f in (np.cos, np.sin))
  rot = np.concatenate([-a[..., H // 2:], a[..., :H // 2]], -1)
  return a * cos + rot * sin


def _lfa_float64(x, p, *, K, rope):
  """q, k from LF(x), v from x, causal softmax per head (query head n reads kv head n // (N/K)),
  output projection; no biases (the authors')."""
  f = lambda a: np.asarray(a, np.float64)
  lf = _lf_float64(x, p["lf_gate"])
  out = []
  for b in range(x.shape[0]):
    q = np.einsum("td,dnh->tnh", lf[b], f(p["query"]["kernel"]))
    k = np.einsum("td,dnh->tnh", lf[b], f(p["key"]["kernel"]))
    v = np.einsum("td,dnh->tnh", f(x[b]), f(p["value"]["kernel"]))
    if rope:
      q, k = _rope_float64(q), _rope_float64(k)
    H = q.shape[-1]
    heads = []
    for n in range(N):
      s = q[:, n] @ k[:, n // (N // K)].T / np.sqrt(H)
      s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      heads.append((w / w.sum(-1, keepdims=True)) @ v[:, n // (N // K)])
    out.append(np.einsum("tnh,nhf->tf", np.stack(heads, 1), f(p["out"]["kernel"])))
  return np.stack(out)


def test_filter_matches_authors_code():
  layer = LocalizedFiltering()
  x = _x()
  variables = inputs.perturbed(layer.init(jax.random.PRNGKey(0), x))
  got = jax.jit(layer.apply)(variables, x)
  np.testing.assert_allclose(np.asarray(got), _lf_float64(x, variables["params"]), **F32)


@pytest.mark.parametrize("K,rope", [(2, False), (1, True)])
def test_layer_matches_float64_rewrite(K, rope):
  layer = LocalizedFilteringAttention(num_heads=N, num_kv_heads=K,
                                      rope_base=10000.0 if rope else None)
  x = _x()
  variables = inputs.perturbed(layer.init(jax.random.PRNGKey(0), x))
  got = jax.jit(layer.apply)(variables, x)
  np.testing.assert_allclose(np.asarray(got), _lfa_float64(x, variables["params"], K=K, rope=rope),
                             **F32)


def test_causal_and_local():
  """The catalog's claim: outputs up to t ignore inputs after t (Jacobian blocks above the diagonal
  are exactly zero); and the filter is what makes t read t-1 in q, k (its Jacobian block is nonzero,
  and zero two steps back)."""
  layer = LocalizedFilteringAttention(num_heads=N)
  x = _x()
  variables = inputs.perturbed(layer.init(jax.random.PRNGKey(0), x))
  jac = np.asarray(jax.jit(jax.jacrev(lambda a: layer.apply(variables, a)))(x[:1]))[0, :, :, 0]
  block = np.abs(jac).sum(axis=(1, 3))            # [t_out, t_in]
  assert np.all(block[np.triu_indices(T, 1)] == 0.0)
  assert np.all(np.diag(block) > 0) and np.all(np.diag(block, -1) > 0)
  lf = LocalizedFiltering()
  lf_vars = inputs.perturbed(lf.init(jax.random.PRNGKey(0), x))
  lf_jac = np.asarray(jax.jit(jax.jacrev(lambda a: lf.apply(lf_vars, a)))(x[:1]))[0, :, :, 0]
  lf_block = np.abs(lf_jac).sum(axis=(1, 3))
  assert np.all(np.diag(lf_block, -1) > 0) and np.all(np.diag(lf_block, -2) > 0)
  assert np.all(lf_block[np.triu_indices(T, 1)] == 0.0)
  assert np.all(np.tril(lf_block, -3) == 0.0)     # kernel 2, twice: a receptive field of 3 tokens


def test_decode_equals_full_forward():
  """Prefill of 4 tokens then one token at a time over the KV cache and the filter's cache == the
  full forward (RoPE on, GQA)."""
  layer = LocalizedFilteringAttention(num_heads=N, num_kv_heads=1, rope_base=10000.0)
  x = _x()
  variables = inputs.perturbed(layer.init(jax.random.PRNGKey(0), x))
  full = jax.jit(layer.apply)(variables, x)
  cache = layer.init(jax.random.PRNGKey(0), x, decode=True)["cache"]
  step = jax.jit(lambda c, xs: layer.apply({"params": variables["params"], "cache": c}, xs,
                                           decode=True, mutable=["cache"]))
  outs = []
  for lo, hi in [(0, 4)] + [(t, t + 1) for t in range(4, T)]:
    y, mutated = step(cache, x[:, lo:hi])
    cache = mutated["cache"]
    outs.append(y)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), **F32)


def test_packed_equals_separate():
  """Two documents packed in one row (the filter restarts at the boundary) == each run alone."""
  layer = LocalizedFilteringAttention(num_heads=N, rope_base=10000.0)
  x = _x((1, T, D))
  variables = inputs.perturbed(layer.init(jax.random.PRNGKey(0), x))
  cut = 5
  seg = jnp.asarray([[0] * cut + [1] * (T - cut)])
  apply = jax.jit(layer.apply)
  packed = apply(variables, x, segment_ids=seg)
  alone = [apply(variables, x[:, :cut]), apply(variables, x[:, cut:])]
  np.testing.assert_allclose(np.asarray(packed), np.asarray(jnp.concatenate(alone, 1)), **F32)


def test_bad_input():
  layer = LocalizedFilteringAttention(num_heads=N)
  with pytest.raises(ValueError, match="LocalizedFilteringAttention.*shape"):
    layer.init(jax.random.PRNGKey(0), jnp.zeros((T, D)))
  with pytest.raises(ValueError, match="LocalizedFilteringAttention.*learned or per-token"):
    LocalizedFilteringAttention(num_heads=N, mechanism="forgetting_attention").init(
        jax.random.PRNGKey(0), _x())
