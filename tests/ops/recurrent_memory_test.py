"""Recurrent-memory mechanisms: the claims of their papers.

Mega (#168): its full gated attention (EMA, shared Z, Q/K, rotary bias, reset/update gates,
candidate with X'W_h) equals a float64 rewrite of the paper's equations; it reads k and v, never q;
the EMA recurrence equals its convolution form; the chunked variant has no `[T, T]` intermediate and
with a chunk >= T equals the unchunked one. SHA-RNN (#56): its attention equals a float64 rewrite of
the author's equations (LayerNorm'd query, vector gates, over-parametrized value gate); with open
gates it is plain single-head causal attention; its gates act per channel.
"""

import chex
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops import recurrent_memory as rm
from attnjax.ops.dot_product import dot_product_attention
from tests import tolerances

TOL = tolerances.output(jnp.float32)


def _qkv(seed, B=2, T=13, S=None, N=4, K=2, H=8, h=6):
  S = T if S is None else S
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, S, K, H)),
          jax.random.normal(kv, (B, S, K, h)))


def _largest_intermediate(fn, *args) -> int:
  """Element count of the largest array in `fn`'s jaxpr, sub-jaxprs (scan, pjit, custom VJP) included."""
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


# ----------------------------------------------------------------------------------------------------
# Mega


def _ema_params(seed, K=2, H=3, ndim=4):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  return tuple(jax.random.normal(key, (K, H, ndim)) for key in keys)


def _numpy_ema_loop(x, alpha, delta, beta, eta):
  """The paper's recurrence, float64, one step at a time."""
  sig = lambda z: 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
  a, d, beta, eta = sig(alpha), sig(delta), np.asarray(beta, np.float64), np.asarray(eta, np.float64)
  x = np.asarray(x, np.float64)
  state = np.zeros(x.shape[:1] + x.shape[2:] + a.shape[-1:])
  ys = []
  for t in range(x.shape[1]):
    state = a * beta * x[:, t, ..., None] + (1 - a * d) * state
    ys.append(np.sum(eta * state, -1))
  return np.stack(ys, 1)


@pytest.mark.parametrize("T", [1, 7, 40])
def test_mega_ema_recurrence_equals_convolution(T):
  params = _ema_params(0)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, T, 2, 3))
  scan = rm.ema_recurrence(x, *params)
  fft = rm.ema_convolution(x, *params)
  # Direct convolution with the closed-form kernel K_l = Σ_j η_j α_j β_j φ_j^l.
  kern = np.asarray(rm.ema_kernel(*params, T), np.float64)
  direct = np.stack([sum(kern[l] * np.asarray(x, np.float64)[:, t - l] for l in range(t + 1))
                     for t in range(T)], 1)
  chex.assert_trees_all_close(scan, _numpy_ema_loop(x, *params), **TOL)
  chex.assert_trees_all_close(scan, direct, **TOL)
  chex.assert_trees_all_close(fft, scan, **TOL)
  rev = rm.ema_recurrence(x, *params, reverse=True)
  chex.assert_trees_all_close(rm.ema_convolution(x, *params, reverse=True), rev, **TOL)
  chex.assert_trees_all_close(rev, jnp.flip(rm.ema_recurrence(jnp.flip(x, 1), *params), 1), **TOL)


def test_mega_ema_gradients_of_both_forms_agree():
  params = _ema_params(2)
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 25, 2, 3))
  loss = lambda f: lambda x, *p: jnp.sum(jnp.sin(f(x, *p)))
  g_scan = jax.grad(loss(rm.ema_recurrence), argnums=(0, 1, 2, 3, 4))(x, *params)
  g_fft = jax.grad(loss(rm.ema_convolution), argnums=(0, 1, 2, 3, 4))(x, *params)
  chex.assert_trees_all_close(g_fft, g_scan, **tolerances.grad(jnp.float32))


def test_mega_ema_restarts_at_document_boundaries():
  params = tuple(jnp.stack([p, p + 0.5]) for p in _ema_params(4))
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 12, 2, 3))
  seg = jnp.array([[0] * 5 + [1] * 7])
  for causal in (True, False):
    packed = rm.multidim_ema(x, *params, causal=causal, segment_ids=seg)
    alone = [rm.multidim_ema(part, *params, causal=causal) for part in (x[:, :5], x[:, 5:])]
    chex.assert_trees_all_close(packed, jnp.concatenate(alone, 1), **TOL)
  # The bidirectional EMA is the forward EMA plus a backward EMA with its own parameters.
  both = rm.multidim_ema(x, *params, causal=False, implementation="reference")
  fwd = rm.ema_recurrence(x, *(p[0] for p in params))
  bwd = rm.ema_recurrence(x, *(p[1] for p in params), reverse=True)
  chex.assert_trees_all_close(both, fwd + bwd, **TOL)


def _mega_params(seed=0, h=6):
  return rm._table_example(rm._MEGA_TABLE, h=h, seed=seed, perturb=0.3)


def _np(x):
  return np.asarray(x, np.float64)


def _np_silu(x):
  return x / (1.0 + np.exp(-x))


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_softmax_rows(logits, mask):
  logits = np.where(mask, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return w / w.sum(-1, keepdims=True)


def _np_rotary_bias(a, b, length):
  """Mega's rotary relative-position bias rot_i(a)·rot_j(b), written with complex numbers: the
  channel pair (c, c + H/2) is the complex a_c, rotated by θ_c·i, so the bias is
  Re Σ_c a_c b̄_c e^{iθ_c(i-j)}, a function of i - j only, [length, length]."""
  half = a.shape[-1] // 2
  theta = 10000.0 ** (-np.arange(half) / half)
  ac, bc = a[:half] + 1j * a[half:], b[:half] + 1j * b[half:]
  rel = np.arange(length)[:, None] - np.arange(length)[None, :]
  return np.real(np.einsum("c,ijc->ij", ac * np.conj(bc), np.exp(1j * theta * rel[..., None])))


def _numpy_mega(k, v, p, key_mu, *, causal, chunk_size):
  """Mega's gated attention, paper eqs. (6)-(16) with the authors' EMA output (ω residual, SiLU) and
  rotary bias, in float64 with explicit per-head loops, for a full self-attention forward. `key_mu`
  `[K, H]` is the paper's key offset μ_k, which the operator leaves out (the softmax cancels it)."""
  k, v, p = _np(k), _np(v), {name: _np(x) for name, x in p.items()}
  B, S, K, H = k.shape
  N = p["query_kappa"].shape[0]
  ema = _numpy_ema_loop(k, *(p[f"ema_{n}"][0] for n in ("alpha", "delta", "beta", "eta")))
  if not causal:   # the backward EMA: the same recurrence run from the end, with its own parameters
    ema = ema + _numpy_ema_loop(k[:, ::-1], *(p[f"ema_{n}"][1] for n in
                                              ("alpha", "delta", "beta", "eta")))[:, ::-1]
  xp = _np_silu(ema + p["ema_omega"] * k)                                         # X'
  z = _np_silu(np.einsum("bskh,khd->bskd", xp, p["z_kernel"]) + p["z_bias"])      # Z
  i, j = np.arange(S)[:, None], np.arange(S)[None, :]
  mask = (j <= i) if causal else np.ones((S, S), bool)
  if chunk_size is not None:
    mask = mask & (i // chunk_size == j // chunk_size)
  out = np.zeros(v.shape[:2] + (N, v.shape[-1]))
  for n in range(N):
    g = n // (N // K)
    queries = p["query_kappa"][n] * z[:, :, g] + p["query_mu"][n]
    keys = p["key_kappa"][g] * z[:, :, g] + key_mu[g]
    logits = (H ** -0.5 * np.einsum("bih,bjh->bij", queries, keys)
              + _np_rotary_bias(p["rel_alpha"][n], p["rel_beta"][g], S))
    o = np.einsum("bij,bjd->bid", _np_softmax_rows(logits, mask), _np_silu(v[:, :, g]))
    x = xp[:, :, g]
    gamma = _np_silu(x @ p["reset_kernel"][n] + p["reset_bias"][n])
    phi = _np_sigmoid(x @ p["update_kernel"][n] + p["update_bias"][n])
    cand = _np_silu(x @ p["candidate_kernel"][n] + (gamma * o) @ p["candidate_attn_kernel"][n]
                    + p["candidate_bias"][n])
    out[:, :, n] = phi * cand + (1.0 - phi) * v[:, :, g]
  return out


@pytest.mark.parametrize("causal,chunk_size,impl", [(False, None, "xla"), (True, 5, "xla"),
                                                     (False, 4, "reference")])
def test_mega_gated_attention_matches_float64_paper_equations(causal, chunk_size, impl):
  q, k, v = _qkv(13, T=11)
  p = _mega_params(3)
  out = rm.mega_attention(q, k, v, causal=causal, chunk_size=chunk_size, implementation=impl, **p)
  key_mu = np.random.default_rng(0).standard_normal(p["key_kappa"].shape)
  expected = _numpy_mega(k, v, p, key_mu, causal=causal, chunk_size=chunk_size)
  chex.assert_trees_all_close(out, expected, **TOL)


def test_mega_reads_k_and_v_never_q():
  """Q and K both derive from the EMA of the input (the key stream): q is declared unread and
  changing it changes nothing; k and v each change the output."""
  assert aj.get_mechanism("mega_attention").reads == frozenset({"k", "v"})
  q, k, v = _qkv(14)
  q2, k2, v2 = _qkv(15)
  p = _mega_params(4)
  mega = jax.jit(lambda q, k, v: rm.mega_attention(q, k, v, causal=True, **p))
  base = mega(q, k, v)
  chex.assert_trees_all_equal(mega(q2, k, v), base)
  for out in (mega(q, k2, v), mega(q, k, v2)):
    assert tolerances.rel_rms(out, base) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_mega_chunk_at_least_length_equals_unchunked(causal, impl):
  q, k, v = _qkv(0)
  params = _mega_params()
  full = rm.mega_attention(q, k, v, causal=causal, implementation=impl, **params)
  for chunk in (13, 20):
    out = rm.mega_attention(q, k, v, causal=causal, chunk_size=chunk, implementation=impl, **params)
    chex.assert_trees_all_close(out, full, **TOL)


@pytest.mark.slow
def test_mega_chunks_are_independent_blocks():
  """Chunked output of chunk i equals Mega attention run on chunk i's own keys, once the EMA (which
  crosses chunks) is fixed: change keys of another chunk only through the attention."""
  q, k, v = _qkv(1, T=16)
  params = _mega_params(1)
  params["ema_eta"] = jnp.zeros_like(params["ema_eta"])   # EMA output 0: no mixing across chunks
  out = rm.mega_attention(q, k, v, causal=False, chunk_size=8, **params)
  v2 = v.at[:, 8:].set(0.0)
  out2 = rm.mega_attention(q, k, v2, causal=False, chunk_size=8, **params)
  chex.assert_trees_all_close(out2[:, :8], out[:, :8], **TOL)
  assert not np.allclose(out2[:, 8:], out[:, 8:])


@pytest.mark.parametrize("causal", [False, True])
def test_mega_chunked_cost_is_linear(causal):
  # T large enough that the linear-size EMA intermediates ([T, H, ndim] = T·64) stay below T²/4.
  T, c = 512, 16
  q, k, v = _qkv(2, B=1, T=T, N=1, K=1, H=4, h=4)
  params = rm.example_params(rm._MEGA_SPECS, N=1, K=1, H=4)

  def loss(q, k, v, chunk, impl):
    return jnp.sum(rm.mega_attention(q, k, v, causal=causal, chunk_size=chunk, implementation=impl,
                                     **params))

  chunked = _largest_intermediate(jax.value_and_grad(lambda *a: loss(*a, c, "xla"),
                                                     argnums=(0, 1, 2)), q, k, v)
  dense = _largest_intermediate(lambda *a: loss(*a, None, "reference"), q, k, v)
  assert dense >= T * T            # the check can see a [T, T] score matrix ...
  assert chunked < T * T // 4      # ... and the chunked form has none


@pytest.mark.slow
def test_mega_packed_chunks_start_at_each_document():
  q, k, v = _qkv(3, T=19)
  params = _mega_params(2)
  seg = jnp.broadcast_to(jnp.repeat(jnp.arange(2), jnp.array([8, 11]), total_repeat_length=19),
                         (2, 19))
  for causal in (False, True):
    packed = rm.mega_attention(q, k, v, causal=causal, chunk_size=3, segment_ids=seg, **params)
    for part in (slice(0, 8), slice(8, 19)):
      alone = rm.mega_attention(q[:, part], k[:, part], v[:, part], causal=causal, chunk_size=3,
                                **params)
      chex.assert_trees_all_close(packed[:, part], alone, **TOL)


def test_mega_rejects_cross_attention_and_bad_params():
  q, k, v = _qkv(4, T=5, S=7)
  with pytest.raises(ValueError, match="self-attention only"):
    rm.mega_attention(q, k, v, **_mega_params())
  q, k, v = _qkv(4)
  params = _mega_params()
  params["key_kappa"] = params["key_kappa"][:1]
  with pytest.raises(ValueError, match="key_kappa"):
    rm.mega_attention(q, k, v, **params)
  with pytest.raises(ValueError, match=r"reset_kernel.*\[N, H, h\]"):
    rm.mega_attention(q, k, v[..., :5], **_mega_params())   # arrays sized for h = 6, v has h = 5


# ----------------------------------------------------------------------------------------------------
# SHA-RNN


def _sha_params(seed=0, h=6, perturb=1.0):
  return rm._table_example(rm._SHA_TABLE, h=h, seed=seed, perturb=perturb)


def _numpy_sha(q, k, v, p, *, q_offset=0, eps=1e-12):
  """The SHA attention in float64 (the author's `Attention`, only the query projected), per head."""
  q, k, v, p = _np(q), _np(k), _np(v), {name: _np(x) for name, x in p.items()}
  N, K, H, h = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
  mean = q.mean(-1, keepdims=True)
  ln = (q - mean) / np.sqrt(((q - mean) ** 2).mean(-1, keepdims=True) + eps)
  queries = _np_sigmoid(p["q_gate"]) * (ln * p["query_ln_scale"] + p["query_ln_bias"])
  keys = _np_sigmoid(p["k_gate"]) * k
  out = np.zeros(q.shape[:3] + (h,))
  for g in range(K):
    # The over-parametrized value gate: one linear map of σ(s_v) to [c ‖ f], gate σ(f)·tanh(c).
    cf = _np_sigmoid(p["v_gate"][g]) @ p["v_gate_kernel"][g] + p["v_gate_bias"][g]
    values = _np_sigmoid(cf[h:]) * np.tanh(cf[:h]) * v[:, :, g]
    for n in range(g * (N // K), (g + 1) * (N // K)):
      logits = H ** -0.5 * np.einsum("bth,bsh->bts", queries[:, :, n], keys[:, :, g])
      t, s = np.arange(q.shape[1])[:, None] + q_offset, np.arange(k.shape[1])[None, :]
      out[:, :, n] = np.einsum("bts,bsd->btd", _np_softmax_rows(logits, s <= t), values)
  return out


def test_sha_rnn_attention_matches_float64_paper_equations():
  q, k, v = _qkv(5, T=15)
  p = _sha_params(1)
  chex.assert_trees_all_close(rm.sha_rnn_attention(q, k, v, **p), _numpy_sha(q, k, v, p), **TOL)
  # Queries for the last 6 positions over a memory of all 15 states.
  chex.assert_trees_all_close(rm.sha_rnn_attention(q[:, 9:], k, v, q_offset=9, **p),
                              _numpy_sha(q[:, 9:], k, v, p, q_offset=9), **TOL)


def test_sha_rnn_with_open_gates_is_single_head_causal_attention_over_normalized_queries():
  q, k, v = _qkv(6)
  p = _sha_params(perturb=0.0)       # the layer's init: λ = 1, β = 0
  h = v.shape[-1]
  p.update(q_gate=np.full_like(p["q_gate"], 40.0), k_gate=np.full_like(p["k_gate"], 40.0),
           v_gate_kernel=np.zeros_like(p["v_gate_kernel"]),
           v_gate_bias=np.full_like(p["v_gate_bias"], 40.0))   # σ(40)·tanh(40) = 1 on every channel
  assert p["v_gate_bias"].shape[-1] == 2 * h
  chex.assert_trees_all_close(rm.sha_rnn_attention(q, k, v, **p),
                              dot_product_attention(rm._layer_norm(q, 1e-12), k, v, causal=True),
                              **TOL)


def test_sha_rnn_gates_are_per_channel_vectors():
  q, k, v = _qkv(7)
  p = _sha_params(2)
  sha = jax.jit(lambda q, k, v, p: rm.sha_rnn_attention(q, k, v, **p))
  base = sha(q, k, v, p)
  # Key gate of head 0, channel 3: the same as scaling that one channel of that head's keys.
  bumped = np.array(p["k_gate"])
  bumped[0, 3] += 2.0
  sig = jax.nn.sigmoid
  ratio = sig(bumped[0, 3]) / sig(p["k_gate"][0, 3])
  chex.assert_trees_all_close(sha(q, k, v, {**p, "k_gate": bumped}),
                              sha(q, k.at[:, :, 0, 3].multiply(ratio), v, p), **TOL)
  assert tolerances.rel_rms(sha(q, k, v, {**p, "k_gate": bumped}), base) > 1e-3
  # Value gate of head 0, channel 2 (its f logit): only channel 2 of the query heads reading head 0
  # changes.
  h = v.shape[-1]
  bias = np.array(p["v_gate_bias"])
  bias[0, h + 2] += 2.0
  out = sha(q, k, v, {**p, "v_gate_bias": bias})
  changed = np.abs(np.asarray(out - base)).max(axis=(0, 1)) > 1e-6         # [N, h]
  expected = np.zeros_like(changed)
  expected[:2, 2] = True                                                    # heads 0, 1 read head 0
  np.testing.assert_array_equal(changed, expected)


def test_sha_rnn_is_causal_only():
  q, k, v = _qkv(8)
  with pytest.raises(ValueError, match="causal"):
    rm.sha_rnn_attention(q, k, v, causal=False, **_sha_params())
  with pytest.raises(ValueError, match=r"v_gate.*\[K, h\]"):
    rm.sha_rnn_attention(q, k, v[..., :5], **_sha_params())   # arrays sized for h = 6
