"""Compressive-memory linear mechanisms: the claims of their papers.

Infini-attention (#75): the memory (M, z) has the same size after any number of segments and summarizes
the whole prefix; the delta rule differs from the linear rule and leaves M unchanged when a value is
already retrieved exactly; the gate interpolates between the local and the memory read; each fast path
equals a float64 transcription of eqs. (1)-(6) and the reference, in outputs and gradients.
LAVO (#151): orthonormal bases; the linear-time form equals the definition with the per-step memory
materialized; no `[T, T]` intermediate. CHELA (#218): the FFT long convolution equals the direct one;
the tiled linear attention equals the definition and the scanned recurrence; no `[T, T]` intermediate.
"""

import chex
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import memory_linear as ml
from attnjax.ops.dot_product import dot_product_attention
from tests import tolerances

TOL = tolerances.output(jnp.float32)
GTOL = tolerances.grad(jnp.float32)


def _qkv(seed, B=2, T=13, N=4, K=2, H=8, h=6):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, T, K, H)),
          jax.random.normal(kv, (B, T, K, h)))


def _largest_intermediate(fn, *args) -> int:
  """Element count of the largest array in `fn`'s jaxpr, sub-jaxprs included."""
  def walk(jaxpr):
    best = 0
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        best = max(best, int(np.prod(getattr(var.aval, "shape", ()))))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, jax_core.ClosedJaxpr):
            best = max(best, walk(sub.jaxpr))
          elif isinstance(sub, jax_core.Jaxpr):
            best = max(best, walk(sub))
    return best
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _elu1(x):
  return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


# ----------------------------------------------------------------------------------------------------
# Infini-attention


def _infini_numpy(q, k, v, gate, L, rule):
  """Infini-attention eqs. (1)-(6), float64, one segment at a time; also returns the final (M, z)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  K, h = k.shape[2], v.shape[3]
  G = N // K
  g = 1.0 / (1.0 + np.exp(-np.asarray(gate, np.float64)))
  M, z = np.zeros((B, K, H, h)), np.zeros((B, K, H))
  out = np.zeros((B, T, N, h))
  for s0 in range(0, T, L):
    sl = slice(s0, min(s0 + L, T))
    qs, ks, vs = q[:, sl], k[:, sl], v[:, sl]
    n = ks.shape[1]
    for head in range(N):
      kvh = head // G
      logits = np.einsum("btd,bsd->bts", qs[:, :, head], ks[:, :, kvh]) * H ** -0.5
      logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
      local = np.einsum("bts,bsd->btd", _softmax(logits), vs[:, :, kvh])
      sq = _elu1(qs[:, :, head])
      num = np.einsum("btf,bfd->btd", sq, M[:, kvh])
      den = np.einsum("btf,bf->bt", sq, z[:, kvh])[..., None]
      mem = np.where(den == 0, 0.0, num / np.where(den == 0, 1.0, den))
      out[:, sl, head] = g[head] * mem + (1 - g[head]) * local
    sk = _elu1(ks)
    dv = vs
    if rule == "delta":
      den = np.einsum("blkf,bkf->blk", sk, z)[..., None]
      ret = np.einsum("blkf,bkfd->blkd", sk, M)
      dv = vs - np.where(den == 0, 0.0, ret / np.where(den == 0, 1.0, den))
    M = M + np.einsum("blkf,blkd->bkfd", sk, dv)
    z = z + sk.sum(1)
  return out, M, z


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_infini_equals_the_paper_equations(rule):
  q, k, v = _qkv(0)
  gate = jnp.array([-1.0, 0.3, 0.0, 2.0])
  expected, M, z = _infini_numpy(q, k, v, gate, 4, rule)
  for impl in ("xla", "reference"):
    out = ml.infini_attention(q, k, v, gate=gate, segment_length=4, update_rule=rule,
                              implementation=impl)
    chex.assert_trees_all_close(out, expected, **TOL)
  mem, norm = ml.infini_memory(k, v, segment_length=4, update_rule=rule)
  chex.assert_trees_all_close((mem, norm), (M, z), **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_infini_fast_path_gradients_equal_reference(rule):
  q, k, v = _qkv(1, B=1, T=11)
  gate = jnp.array([0.5, -0.5, 1.0, 0.0])

  def grads(impl):
    loss = lambda q, k, v, g: jnp.sum(jnp.sin(ml.infini_attention(
        q, k, v, gate=g, segment_length=3, update_rule=rule, implementation=impl)))
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, gate)

  chex.assert_trees_all_close(grads("xla"), grads("reference"), **GTOL)


@pytest.mark.slow
def test_infini_delta_rule_packed_equals_separate():
  q, k, v = _qkv(2, B=1, T=12)
  gate = jnp.array([0.5, -0.5, 1.0, 0.0])
  seg = jnp.array([[0] * 5 + [1] * 7])
  kw = dict(gate=gate, segment_length=3, update_rule="delta")
  for impl in ("xla", "reference"):
    packed = ml.infini_attention(q, k, v, segment_ids=seg, implementation=impl, **kw)
    for part in (slice(0, 5), slice(5, 12)):
      alone = ml.infini_attention(q[:, part], k[:, part], v[:, part], implementation=impl, **kw)
      chex.assert_trees_all_close(packed[:, part], alone, **TOL)


def test_infini_memory_is_constant_in_size_and_summarizes_the_prefix():
  """(M, z) has one size for any number of segments, and the last segment's output is the gated mix
  of its own local attention and a read of the (M, z) of everything before it."""
  L = 4
  gate = jnp.array([-1.0, 0.3, 0.0, 2.0])
  g = jax.nn.sigmoid(gate)[:, None]
  sizes = set()
  for segments in (2, 3, 6):
    T = segments * L
    q, k, v = _qkv(3, T=T)
    M, z = ml.infini_memory(k[:, :T - L], v[:, :T - L], segment_length=L)
    sizes.add((M.shape, z.shape))
    out = ml.infini_attention(q, k, v, gate=gate, segment_length=L)
    sq = ml._elu1(q[:, T - L:])
    read = jnp.einsum("btkgf,bkfh->btkgh", sq.reshape(2, L, 2, 2, 8), M) / jnp.einsum(
        "btkgf,bkf->btkg", sq.reshape(2, L, 2, 2, 8), z)[..., None]
    local = dot_product_attention(q[:, T - L:], k[:, T - L:], v[:, T - L:], causal=True)
    expected = g * read.reshape(2, L, 4, 6) + (1 - g) * local
    chex.assert_trees_all_close(out[:, T - L:], expected, **TOL)
  assert sizes == {((2, 2, 8, 6), (2, 2, 8))}


def test_infini_delta_rule_differs_and_keeps_memory_when_value_is_retrieved():
  L = 4
  q, k, v = _qkv(4, T=2 * L)
  M1, z1 = ml.infini_memory(k[:, :L], v[:, :L], segment_length=L)
  # Second segment: values equal to what the memory already retrieves for their keys.
  sk = ml._elu1(k[:, L:])
  retrieved = (jnp.einsum("blkf,bkfh->blkh", sk, M1)
               / jnp.einsum("blkf,bkf->blk", sk, z1)[..., None])
  v2 = v.at[:, L:].set(retrieved)
  M_delta, _ = ml.infini_memory(k, v2, segment_length=L, update_rule="delta")
  M_linear, _ = ml.infini_memory(k, v2, segment_length=L, update_rule="linear")
  chex.assert_trees_all_close(M_delta, M1, **TOL)
  assert not np.allclose(M_linear, M1, atol=1e-2)
  # On ordinary inputs the two rules give different outputs from the third segment on.
  q, k, v = _qkv(5, T=3 * L)
  gate = jnp.zeros((4,))
  lin = ml.infini_attention(q, k, v, gate=gate, segment_length=L, update_rule="linear")
  dlt = ml.infini_attention(q, k, v, gate=gate, segment_length=L, update_rule="delta")
  chex.assert_trees_all_close(dlt[:, :2 * L], lin[:, :2 * L], **TOL)
  assert not np.allclose(dlt[:, 2 * L:], lin[:, 2 * L:], atol=1e-3)


def test_infini_gate_interpolates_between_local_and_memory():
  L = 4
  q, k, v = _qkv(6, T=3 * L)
  run = lambda gate: ml.infini_attention(q, k, v, gate=jnp.asarray(gate), segment_length=L)
  local_only = run(jnp.full((4,), -1e4))
  memory_only = run(jnp.full((4,), 1e4))
  for s in range(3):
    sl = slice(s * L, (s + 1) * L)
    chex.assert_trees_all_close(local_only[:, sl],
                                dot_product_attention(q[:, sl], k[:, sl], v[:, sl], causal=True),
                                **TOL)
  chex.assert_trees_all_close(memory_only[:, :L], jnp.zeros_like(memory_only[:, :L]))  # empty memory
  gate = jnp.array([-2.0, -0.5, 0.5, 3.0])
  g = jax.nn.sigmoid(gate)[:, None]
  chex.assert_trees_all_close(run(gate), g * memory_only + (1 - g) * local_only, **TOL)


def test_infini_rejects_bad_arguments():
  q, k, v = _qkv(7)
  with pytest.raises(ValueError, match="gate"):
    ml.infini_attention(q, k, v, gate=jnp.zeros((3,)), segment_length=4)
  with pytest.raises(ValueError, match="update_rule"):
    ml.infini_attention(q, k, v, gate=jnp.zeros((4,)), segment_length=4, update_rule="hebb")
  with pytest.raises(ValueError, match="causal"):
    ml.infini_attention(q, k, v, gate=jnp.zeros((4,)), segment_length=4, causal=False)


# ----------------------------------------------------------------------------------------------------
# LAVO


def test_orthogonal_basis_is_orthonormal():
  for r, d in ((8, 8), (5, 16), (1, 4)):
    basis = ml.orthogonal_basis(r, d)
    np.testing.assert_allclose(basis @ basis.T, np.eye(r), atol=1e-6)


def _lavo_numpy(q, k, v, slope_logits, r, window, causal):
  """LAVO by its definition, float64: the per-step memory K̃_t, Ṽ_t materialized, one softmax over
  the r slots and the local window with the relative-distance penalty."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  K = k.shape[2]
  G = N // K
  basis = ml.orthogonal_basis(r, H).astype(np.float64)
  slopes = np.log1p(np.exp(np.asarray(slope_logits, np.float64)))
  out = np.zeros((B, T, N, v.shape[3]))
  for b in range(B):
    for n in range(N):
      kh, vh = k[b, :, n // G], v[b, :, n // G]
      w = kh @ basis.T                                            # [T, r]
      for t in range(T):
        seen = slice(0, t + 1) if causal else slice(0, T)
        c = (t + 1) if causal else T
        K_mem = w[seen].T @ kh[seen] / c                          # [r, H]
        V_mem = w[seen].T @ vh[seen] / c                          # [r, h]
        idx = np.arange(T)
        near = (idx > t - window) & (idx <= t) if causal else np.abs(idx - t) < window
        logits = np.concatenate([K_mem @ q[b, t, n], kh[near] @ q[b, t, n]]) * H ** -0.5
        logits[r:] -= slopes[n] * np.abs(idx[near] - t)
        p = _softmax(logits)
        out[b, t, n] = p[:r] @ V_mem + p[r:] @ vh[near]
  return out


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_lavo_equals_its_definition(causal):
  q, k, v = _qkv(8, B=1, T=11)
  slope = jnp.array([0.2, -1.0, 0.5, 1.5])
  expected = _lavo_numpy(q, k, v, slope, 5, 3, causal)
  for impl in ("xla", "reference"):
    out = ml.orthogonal_memory_attention(q, k, v, relative_slope=slope, num_bases=5, window=3,
                                         causal=causal, chunk_size=4, implementation=impl)
    chex.assert_trees_all_close(out, expected, **TOL)


def test_lavo_and_chela_memory_grows_linearly():
  """Doubling T at most doubles (plus tiling slack) the largest forward+backward intermediate; a
  `[T, T]` score matrix would quadruple it."""
  lavo = ml.example_params(ml._LAVO_SPECS, N=1, K=1, H=4, perturb=0.3)
  chela = ml.example_params(ml._CHELA_SPECS, N=1, K=1, H=4, perturb=0.3)
  fns = [lambda q, k, v: jnp.sum(ml.orthogonal_memory_attention(
             q, k, v, causal=True, window=16, chunk_size=16, **lavo)),
         lambda q, k, v: jnp.sum(ml.chela_attention(q, k, v, causal=True, chunk_size=16, **chela))]
  for fn in fns:
    sizes = [_largest_intermediate(jax.value_and_grad(fn, argnums=(0, 1, 2)),
                                   *_qkv(9, B=1, T=T, N=1, K=1, H=4, h=4)) for T in (1024, 2048)]
    assert sizes[1] <= 2.5 * sizes[0], sizes


# ----------------------------------------------------------------------------------------------------
# CHELA


def test_chela_fft_convolution_equals_direct():
  x = jax.random.normal(jax.random.PRNGKey(10), (2, 21, 2, 3))
  kern = ml.stabilized_long_kernel(jax.random.normal(jax.random.PRNGKey(11), (2, 3, 8)),
                                   jnp.full((2, 3), -1.0))
  # The stabilized kernel has unit L1 norm per channel: the convolution's gain is at most 1.
  np.testing.assert_allclose(np.abs(np.asarray(kern)).sum(-1), 1.0, rtol=1e-5)
  direct = ml.causal_conv(x, kern)
  xs, ks = np.asarray(x, np.float64), np.asarray(kern, np.float64)
  loop = np.stack([sum(ks[..., l] * xs[:, t - l] for l in range(min(t + 1, 8)))
                   for t in range(21)], 1)
  chex.assert_trees_all_close(direct, loop, **TOL)
  chex.assert_trees_all_close(ml.causal_conv(x, kern, method="fft"), direct, **TOL)


def _chela_numpy(q, k, v, p, causal):
  """CHELA by its definition, float64: convolutions, feature maps, quadratic normalized linear
  attention, output gate."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  p = {name: np.asarray(x, np.float64) for name, x in p.items()}
  B, T, N, H = q.shape
  G = N // k.shape[2]
  conv = lambda x, kern: np.stack([sum(kern[..., l] * x[:, t - l]
                                       for l in range(min(t + 1, kern.shape[-1])))
                                   for t in range(T)], 1)
  silu = lambda x: x / (1.0 + np.exp(-x))
  lam = np.log1p(np.exp(p["long_decay"]))[..., None]
  long = p["long_kernel"] * np.exp(-lam * np.arange(p["long_kernel"].shape[-1]))
  long = long / np.abs(long).sum(-1, keepdims=True)
  z = conv(silu(conv(k, p["short_kernel"])), long)
  keys = _elu1(p["key_kappa"] * z + p["key_mu"])
  queries = _elu1(p["query_kappa"] * np.repeat(z, G, axis=2) + p["query_mu"])
  scores = np.einsum("btnf,bsnf->bnts", queries, np.repeat(keys, G, axis=2))
  if causal:
    scores = scores * np.tril(np.ones((T, T)))
  o = np.einsum("bnts,bsnh->btnh", scores, np.repeat(v, G, axis=2)) / scores.sum(-1).transpose(
      0, 2, 1)[..., None]
  gate = 1.0 / (1.0 + np.exp(-(np.einsum("btnh,nh->btn", q, p["gate_weight"]) + p["gate_bias"])))
  return gate[..., None] * o


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_chela_tiled_linear_attention_equals_its_definition(causal):
  q, k, v = _qkv(12, B=1, T=21)
  params = ml.example_params(ml._CHELA_SPECS, seed=3, perturb=0.3)
  expected = _chela_numpy(q, k, v, params, causal)
  for impl in ("xla", "reference"):
    out = ml.chela_attention(q, k, v, causal=causal, chunk_size=8, implementation=impl, **params)
    chex.assert_trees_all_close(out, expected, **TOL)
