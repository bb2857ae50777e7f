"""Compressive-memory linear mechanisms: the claims of their papers.

Infini-attention (#75): the output is the gated mix of causal local softmax attention and a read of
the compressive memory, equal to a float64 transcription of eqs. (1)-(6) in both fast paths and the
reference; the memory (M, z) has one size after any number of segments and is all the last segment
reads of the prefix; the delta rule differs from the linear rule and leaves M unchanged when a value
is already retrieved exactly; the gate interpolates between the two reads.
LAVO (#151): orthonormal bases; the linear-time form equals the definition with the per-step
orthogonal memory materialized; no `[T, T]` intermediate.
CHELA (#218): the FFT long convolution equals the direct one; short-long convolutions plus the tiled
linear attention equal an explicit float64 rewrite and the scanned recurrence; q is not read; no
`[T, T]` intermediate.
Each defining property runs in the default suite at small sizes (compiled once per case); `slow`
holds only the same checks at extra sizes, gradients and packing.
"""

import functools

import chex
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops import memory_linear as ml
from tests import tolerances

TOL = tolerances.output(jnp.float32)
GTOL = tolerances.grad(jnp.float32)


def _qkv(seed, B=2, T=13, N=4, K=2, H=8, h=6):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, T, K, H)),
          jax.random.normal(kv, (B, T, K, h)))


def _jit(fn, **static):
  """`fn` with the keywords `static` fixed, compiled as one program (eager dispatch compiles every
  primitive separately, several times slower); array arguments stay traced."""
  return jax.jit(functools.partial(fn, **static))


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


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


# ----------------------------------------------------------------------------------------------------
# Infini-attention


def _ratio(num, den):
  den = den[..., None]
  return np.where(den == 0, 0.0, num / np.where(den == 0, 1.0, den))


def _infini_numpy(q, k, v, gate, L, rule, scale=None):
  """Infini-attention eqs. (1)-(6), float64, one segment at a time; also returns the final
  memory (M, z)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  K, h = k.shape[2], v.shape[3]
  G = N // K
  scale = H ** -0.5 if scale is None else scale
  g = _sigmoid(gate)
  M, z = np.zeros((B, K, H, h)), np.zeros((B, K, H))
  out = np.zeros((B, T, N, h))
  for s0 in range(0, T, L):
    sl = slice(s0, min(s0 + L, T))
    qs, ks, vs = q[:, sl], k[:, sl], v[:, sl]
    n = ks.shape[1]
    for head in range(N):
      kvh = head // G
      logits = np.einsum("btd,bsd->bts", qs[:, :, head], ks[:, :, kvh]) * scale
      logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
      local = np.einsum("bts,bsd->btd", _softmax(logits), vs[:, :, kvh])             # eq. (1)
      sq = _elu1(qs[:, :, head])
      mem = _ratio(np.einsum("btf,bfd->btd", sq, M[:, kvh]),                         # eq. (3)
                   np.einsum("btf,bf->bt", sq, z[:, kvh]))
      out[:, sl, head] = g[head] * mem + (1 - g[head]) * local                      # eq. (6)
    sk = _elu1(ks)
    dv = vs
    if rule == "delta":                                                             # eq. (5)
      dv = vs - _ratio(np.einsum("blkf,bkfd->blkd", sk, M), np.einsum("blkf,bkf->blk", sk, z))
    M = M + np.einsum("blkf,blkd->bkfd", sk, dv)                                    # eq. (4)
    z = z + sk.sum(1)
  return out, M, z


def _check_infini(rule, scale, *, L, seed, **sizes):
  q, k, v = _qkv(seed, **sizes)
  gate = jnp.linspace(-1.5, 2.0, q.shape[2])
  expected, M, z = _infini_numpy(q, k, v, gate, L, rule, scale)
  for impl in ("xla", "reference"):
    out = _jit(ml.infini_attention, segment_length=L, update_rule=rule, scale=scale,
               implementation=impl)(q, k, v, gate=gate)
    chex.assert_trees_all_close(out, expected, **TOL)
  memory = _jit(ml.infini_memory, segment_length=L, update_rule=rule)(k, v)
  chex.assert_trees_all_close(memory, (M, z), **TOL)


@pytest.mark.parametrize("rule,scale", [("linear", None), ("delta", 0.6)])
def test_infini_is_the_gated_mix_of_local_attention_and_memory_retrieval(rule, scale):
  """Both paths equal the float64 transcription: 4 segments (the last partial), 2 query heads per
  kv head, 2 examples; a non-default `scale` scales the local softmax logits."""
  _check_infini(rule, scale, L=4, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_infini_equals_the_paper_equations_at_more_sizes(rule):
  _check_infini(rule, None, L=6, seed=11, B=1, T=37, N=4, K=1, h=5)


def test_infini_memory_stays_constant_in_size_and_is_all_the_prefix_leaves():
  """(M, z) has one size after any number of segments (and the registered decode state does not
  grow with T); the last segment's output is the gated mix of its own causal softmax attention and
  a read of the (M, z) of everything before it."""
  L, N, K, H, h = 4, 4, 2, 8, 6
  gate = np.array([-1.0, 0.3, 0.0, 2.0])
  memory = _jit(ml.infini_memory, segment_length=L)
  shapes = set()
  for segments in (1, 3, 6):
    q, k, v = _qkv(3, T=segments * L)
    M, z = memory(k, v)
    shapes.add((M.shape, z.shape))
    _, M64, z64 = _infini_numpy(q, k, v, gate, L, "linear")
    chex.assert_trees_all_close((M, z), (M64, z64), **TOL)
  assert shapes == {((2, K, H, h), (2, K, H))}
  mech = aj.get_mechanism("infini_attention")
  sizes = {mech.decode_state_floats(T, N, K, H, h, {"segment_length": L})
           for T in (L, 10 * L, 10**6)}
  assert len(sizes) == 1, sizes
  # The last of 6 segments reads the memory of the first 5 (the last M, z above) and nothing else.
  T = 6 * L
  q, k, v = _qkv(3, T=T)
  _, M64, z64 = _infini_numpy(q[:, :T - L], k[:, :T - L], v[:, :T - L], gate, L, "linear")
  out = _jit(ml.infini_attention, segment_length=L)(q, k, v, gate=jnp.asarray(gate))
  qs, ks, vs = (np.asarray(x[:, T - L:], np.float64) for x in (q, k, v))
  sq = _elu1(qs).reshape(2, L, K, N // K, H)
  read = _ratio(np.einsum("btkgf,bkfh->btkgh", sq, M64), np.einsum("btkgf,bkf->btkg", sq, z64))
  logits = np.einsum("btnd,bsnd->bnts", qs, np.repeat(ks, N // K, axis=2)) * H ** -0.5
  logits = np.where(np.tril(np.ones((L, L), bool)), logits, -np.inf)
  local = np.einsum("bnts,bsnd->btnd", _softmax(logits), np.repeat(vs, N // K, axis=2))
  g = _sigmoid(gate)[:, None]
  chex.assert_trees_all_close(out[:, T - L:], g * read.reshape(2, L, N, h) + (1 - g) * local,
                              **TOL)


def test_infini_delta_rule_differs_and_keeps_memory_when_value_is_retrieved():
  L = 4
  q, k, v = _qkv(4, T=2 * L)
  M1, z1 = _jit(ml.infini_memory, segment_length=L)(k[:, :L], v[:, :L])
  # Second segment: values equal to what the memory already retrieves for their keys.
  sk = ml._elu1(k[:, L:])
  retrieved = (jnp.einsum("blkf,bkfh->blkh", sk, M1)
               / jnp.einsum("blkf,bkf->blk", sk, z1)[..., None])
  v2 = v.at[:, L:].set(retrieved)
  M_delta, _ = _jit(ml.infini_memory, segment_length=L, update_rule="delta")(k, v2)
  M_linear, _ = _jit(ml.infini_memory, segment_length=L, update_rule="linear")(k, v2)
  chex.assert_trees_all_close(M_delta, M1, **TOL)
  assert not np.allclose(M_linear, M1, atol=1e-2)
  # On ordinary inputs the two rules give different outputs from the third segment on.
  q, k, v = _qkv(5, T=3 * L)
  gate = jnp.zeros((4,))
  lin = _jit(ml.infini_attention, segment_length=L, update_rule="linear")(q, k, v, gate=gate)
  dlt = _jit(ml.infini_attention, segment_length=L, update_rule="delta")(q, k, v, gate=gate)
  chex.assert_trees_all_close(dlt[:, :2 * L], lin[:, :2 * L], **TOL)
  assert not np.allclose(dlt[:, 2 * L:], lin[:, 2 * L:], atol=1e-3)


def test_infini_gate_interpolates_between_local_and_memory():
  L = 4
  q, k, v = _qkv(6, T=3 * L)
  run = _jit(ml.infini_attention, segment_length=L)
  local_only = run(q, k, v, gate=jnp.full((4,), -1e4))
  memory_only = run(q, k, v, gate=jnp.full((4,), 1e4))
  expected, _, _ = _infini_numpy(q, k, v, np.full((4,), -np.inf), L, "linear")
  chex.assert_trees_all_close(local_only, expected, **TOL)
  # The first segment reads an empty memory: zeros.
  chex.assert_trees_all_close(memory_only[:, :L], jnp.zeros_like(memory_only[:, :L]))
  gate = jnp.array([-2.0, -0.5, 0.5, 3.0])
  g = jax.nn.sigmoid(gate)[:, None]
  chex.assert_trees_all_close(run(q, k, v, gate=gate), g * memory_only + (1 - g) * local_only,
                              **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_infini_fast_path_gradients_equal_reference(rule):
  q, k, v = _qkv(1, B=1, T=11)
  gate = jnp.array([0.5, -0.5, 1.0, 0.0])

  def grads(impl):
    loss = lambda q, k, v, g: jnp.sum(jnp.sin(ml.infini_attention(
        q, k, v, gate=g, segment_length=3, update_rule=rule, implementation=impl)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, gate)

  chex.assert_trees_all_close(grads("xla"), grads("reference"), **GTOL)


@pytest.mark.slow
def test_infini_delta_rule_packed_equals_separate():
  q, k, v = _qkv(2, B=1, T=12)
  gate = jnp.array([0.5, -0.5, 1.0, 0.0])
  seg = jnp.array([[0] * 5 + [1] * 7])
  for impl in ("xla", "reference"):
    fn = _jit(ml.infini_attention, segment_length=3, update_rule="delta", implementation=impl)
    packed = fn(q, k, v, gate=gate, segment_ids=seg)
    for part in (slice(0, 5), slice(5, 12)):
      alone = fn(q[:, part], k[:, part], v[:, part], gate=gate)
      chex.assert_trees_all_close(packed[:, part], alone, **TOL)


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


def _lavo_numpy(q, k, v, slope_logits, r, window, causal, scale=None):
  """LAVO by its definition, float64: the per-step orthogonal memory K̃_t, Ṽ_t materialized (the
  context decomposed on r orthonormal DCT bases, averaged over the c_t tokens seen), one softmax
  over the r slots and the local window with the relative-distance penalty."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  G = N // k.shape[2]
  scale = H ** -0.5 if scale is None else scale
  j = np.arange(r)[:, None]
  norm = np.sqrt(np.where(j > 0, 2.0, 1.0) / H)
  basis = np.cos(np.pi * (np.arange(H)[None] + 0.5) * j / H) * norm         # orthonormal DCT-II
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
        logits = np.concatenate([K_mem @ q[b, t, n], kh[near] @ q[b, t, n]]) * scale
        logits[r:] -= slopes[n] * np.abs(idx[near] - t)
        p = _softmax(logits)
        out[b, t, n] = p[:r] @ V_mem + p[r:] @ vh[near]
  return out


def _check_lavo(causal, scale, *, r, window, chunk, seed, **sizes):
  q, k, v = _qkv(seed, **sizes)
  slope = jnp.linspace(-1.0, 1.5, q.shape[2])
  expected = _lavo_numpy(q, k, v, slope, r, window, causal, scale)
  for impl in ("xla", "reference"):
    out = _jit(ml.orthogonal_memory_attention, num_bases=r, window=window, causal=causal,
               scale=scale, chunk_size=chunk, implementation=impl)(q, k, v, relative_slope=slope)
    chex.assert_trees_all_close(out, expected, **TOL)


@pytest.mark.parametrize("causal,scale", [(True, None), (False, 0.7)])
def test_lavo_orthogonal_memory_compression_equals_its_definition(causal, scale):
  """The linear-time form (no per-step memory) equals the explicit rewrite: r = 5 bases of H = 8,
  window 3, chunks of 4 over T = 11, 2 query heads per kv head, 2 examples; a non-default `scale`
  scales the slot and local logits alike."""
  _check_lavo(causal, scale, r=5, window=3, chunk=4, seed=8)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_lavo_equals_its_definition_at_more_sizes(causal):
  _check_lavo(causal, None, r=8, window=5, chunk=8, seed=13, B=1, T=29, N=4, K=1)


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


def _chela_numpy(k, v, p, causal):
  """CHELA by its definition, float64, from the key stream x = k alone: short convolution, SiLU,
  stabilized long convolution, shared-stream feature maps, quadratic normalized linear attention,
  output gate from the token's own x."""
  k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
  p = {name: np.asarray(x, np.float64) for name, x in p.items()}
  B, T, K, _ = k.shape
  G = p["query_kappa"].shape[0] // K
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
  gate = _sigmoid(np.einsum("btnh,nh->btn", np.repeat(k, G, axis=2), p["gate_weight"])
                  + p["gate_bias"])
  return gate[..., None] * o


def _check_chela(causal, *, chunk, seed, **sizes):
  q, k, v = _qkv(seed, **sizes)
  N, K, H = q.shape[2], k.shape[2], q.shape[3]
  params = ml.example_params(ml._CHELA_SPECS, N=N, K=K, H=H, seed=3, perturb=0.3)
  expected = _chela_numpy(k, v, params, causal)
  for impl in ("xla", "reference"):
    out = _jit(ml.chela_attention, causal=causal, chunk_size=chunk, implementation=impl)(
        q, k, v, **params)
    chex.assert_trees_all_close(out, expected, **TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_chela_short_long_convolutions_and_tiled_linear_attention_equal_its_definition(causal):
  """FFT + chunked and direct + scanned paths equal the explicit rewrite: T = 21 over chunks of 8,
  2 query heads per kv head, 2 examples."""
  _check_chela(causal, chunk=8, seed=12)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_chela_equals_its_definition_at_more_sizes(causal):
  _check_chela(causal, chunk=16, seed=14, B=1, T=70, N=4, K=1, h=5)


def test_chela_reads_only_the_key_stream_and_values():
  """Queries and keys come from one shared convolution stream (the paper has no query projection):
  q gives only the shape and dtype, and the registration says so; a logit scale, which the
  normalizer would cancel, is rejected."""
  q, k, v = _qkv(15, T=9)
  params = ml.example_params(ml._CHELA_SPECS, seed=4, perturb=0.3)
  fn = _jit(ml.chela_attention, causal=True, chunk_size=4)
  out = fn(q, k, v, **params)
  chex.assert_trees_all_equal(fn(jnp.zeros_like(q), k, v, **params), out)
  chex.assert_trees_all_equal(fn(7.0 * q[::-1], k, v, **params), out)
  assert aj.get_mechanism("chela_attention").reads == frozenset({"k", "v"})
  with pytest.raises(ValueError, match="chela_attention: `scale` must be None"):
    ml.chela_attention(q, k, v, scale=0.5, **params)
