"""Recurrent-memory mechanisms: the claims of their papers.

Mega (#168): the EMA recurrence equals its convolution form; the chunked variant has no `[T, T]`
intermediate and with a chunk >= T equals the unchunked one. SHA-RNN (#56): at init with an identity
query projection it is plain single-head causal attention (up to the ½ gates); the gates scale q/k/v.
RAN (#65): a window >= T is one attention over [GPC; tokens]; the scan over windows equals a Python
loop; its intermediates are bounded by the window.
"""

import chex
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

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


def _mega_params(seed=0):
  return rm.example_params(rm._MEGA_SPECS, seed=seed, perturb=0.3)


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
  params["key_mu"] = params["key_mu"][:1]
  with pytest.raises(ValueError, match="key_mu"):
    rm.mega_attention(q, k, v, **params)


# ----------------------------------------------------------------------------------------------------
# SHA-RNN


def _sha_params(seed=None):
  params = rm.example_params(rm._SHA_SPECS)
  if seed is not None:
    params = rm.example_params(rm._SHA_SPECS, seed=seed, perturb=1.0)
  return params


def test_sha_rnn_at_init_is_single_head_causal_attention():
  q, k, v = _qkv(5)
  params = _sha_params()            # zero gate logits (σ = ½), identity query kernel
  out = rm.sha_rnn_attention(q, k, v, **params)
  ln_q = rm._layer_norm(q, 1e-12)
  scale = 8 ** -0.5
  # σ(0) = ½ on q and k scales the logits by ¼; on v it halves the output.
  expected = 0.5 * dot_product_attention(ln_q, k, v, causal=True, scale=scale / 4)
  chex.assert_trees_all_close(out, expected, **TOL)
  # Gates fully open: exactly plain causal softmax attention over the layer-normalized queries.
  open_gates = {**params, **{g: jnp.full_like(params[g], 40.0) for g in ("q_gate", "k_gate",
                                                                         "v_gate")}}
  chex.assert_trees_all_close(rm.sha_rnn_attention(q, k, v, **open_gates),
                              dot_product_attention(ln_q, k, v, causal=True), **TOL)


def test_sha_rnn_gates_scale_q_k_v_per_channel():
  q, k, v = _qkv(6)
  p = _sha_params(seed=1)
  sig = jax.nn.sigmoid
  qp = jnp.einsum("btnh,nhd->btnd", q, p["query_kernel"]) + p["query_bias"]
  qp = rm._layer_norm(qp, 1e-12) * p["query_ln_scale"] + p["query_ln_bias"]
  expected = dot_product_attention(sig(p["q_gate"]) * qp, sig(p["k_gate"]) * k,
                                   sig(p["v_gate"])[:, None] * v, causal=True)
  chex.assert_trees_all_close(rm.sha_rnn_attention(q, k, v, **p), expected, **TOL)
  # One key channel's gate changes the result (the gate is per channel, not per head).
  p2 = {**p, "k_gate": jnp.asarray(p["k_gate"]).at[0, 3].add(3.0)}
  assert not np.allclose(rm.sha_rnn_attention(q, k, v, **p2), rm.sha_rnn_attention(q, k, v, **p))


def test_sha_rnn_reads_a_memory_of_earlier_states():
  """Queries for the last T positions over a memory of S states (q_offset = S - T) equal the last
  rows of attention over the whole sequence."""
  q, k, v = _qkv(7, T=15)
  p = _sha_params(seed=2)
  full = rm.sha_rnn_attention(q, k, v, **p)
  tail = rm.sha_rnn_attention(q[:, 9:], k, v, q_offset=9, **p)
  chex.assert_trees_all_close(tail, full[:, 9:], **TOL)
  with pytest.raises(ValueError, match="causal"):
    rm.sha_rnn_attention(q, k, v, causal=False, **p)


def test_boom_sums_the_expanded_chunks():
  kx, kw, kb = jax.random.split(jax.random.PRNGKey(8), 3)
  x = jax.random.normal(kx, (3, 5, 6))
  w = jax.random.normal(kw, (6, 24)) * 0.3
  b = jax.random.normal(kb, (24,))
  u = jax.nn.gelu(x @ w + b, approximate=False)
  expected = u[..., :6] + u[..., 6:12] + u[..., 12:18] + u[..., 18:]
  chex.assert_trees_all_close(rm.boom_feedforward(x, w, b), expected, **TOL)
  with pytest.raises(ValueError, match="kernel"):
    rm.boom_feedforward(x, w[:, :20], b)


# ----------------------------------------------------------------------------------------------------
# Recurrent Attention Network


def _ran_params(seed=0, K=2, H=8):
  return rm.example_params(rm._RAN_SPECS, K=K, H=H, seed=seed)


def _ln(x):
  return rm._layer_norm(jnp.asarray(x, jnp.float32))


def _ran_loop(q, k, v, gpc_query, gpc_key, *, window, causal):
  """RAN written as an explicit Python loop over windows (float32)."""
  B, T, N, H = q.shape
  K, h = k.shape[2], v.shape[-1]
  gk = jnp.broadcast_to(gpc_key, (B, K, H))
  gv = jnp.zeros((B, K, h))
  outs = []
  for start in range(0, T, window):
    sl = slice(start, min(start + window, T))
    keys = jnp.concatenate([gk[:, None], k[:, sl]], 1)
    values = jnp.concatenate([gv[:, None], v[:, sl]], 1)
    n = keys.shape[1] - 1
    # The GPC (slot 0) is visible to every token; tokens are causal among themselves when asked.
    mask = np.tril(np.ones((n, n + 1), bool), 1) if causal else np.ones((n, n + 1), bool)
    outs.append(dot_product_attention(q[:, sl], keys, values, mask=mask[None, None],
                                      implementation="reference"))
    read = dot_product_attention(jnp.broadcast_to(gpc_query, (B, 1, K, H)), keys,
                                 jnp.concatenate([keys, values], -1), implementation="reference")[:, 0]
    gk, gv = _ln(read[..., :H] + gk), _ln(read[..., H:] + gv)
  return jnp.concatenate(outs, 1), gv


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_ran_window_at_least_length_is_one_attention_over_gpc_and_tokens(causal, impl):
  q, k, v = _qkv(9, T=11)
  p = _ran_params()
  B, T, K, H, h = 2, 11, 2, 8, 6
  keys = jnp.concatenate([jnp.broadcast_to(p["gpc_key"], (B, 1, K, H)), k], 1)
  values = jnp.concatenate([jnp.zeros((B, 1, K, h)), v], 1)
  expected = dot_product_attention(q, keys, values, causal=causal, q_offset=1 if causal else 0)
  for window in (11, 16):
    out, doc = rm.recurrent_attention_network(q, k, v, window=window, causal=causal,
                                              implementation=impl, return_document=True, **p)
    chex.assert_trees_all_close(out, expected, **TOL)
    read = dot_product_attention(jnp.broadcast_to(p["gpc_query"], (B, 1, K, H)), keys,
                                 jnp.concatenate([keys, values], -1))[:, 0]
    chex.assert_trees_all_close(doc, _ln(read[..., H:]), **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_ran_scan_over_windows_equals_python_loop(causal, impl):
  q, k, v = _qkv(10, T=23)
  p = _ran_params(1)
  out, doc = rm.recurrent_attention_network(q, k, v, window=5, causal=causal, implementation=impl,
                                            return_document=True, **p)
  loop_out, loop_doc = _ran_loop(q, k, v, p["gpc_query"], p["gpc_key"], window=5, causal=causal)
  chex.assert_trees_all_close(out, loop_out, **TOL)
  chex.assert_trees_all_close(doc, loop_doc, **TOL)


def test_ran_memory_per_step_is_bounded_by_the_window():
  T, W = 256, 16
  q, k, v = _qkv(11, B=1, T=T, N=1, K=1, H=4, h=4)
  p = _ran_params(2, K=1, H=4)

  def loss(q, k, v, window):
    return jnp.sum(rm.recurrent_attention_network(q, k, v, window=window, causal=True, **p))

  windowed = _largest_intermediate(jax.value_and_grad(lambda *a: loss(*a, W), argnums=(0, 1, 2)),
                                   q, k, v)
  whole = _largest_intermediate(lambda *a: loss(*a, T), q, k, v)
  assert whole >= T * T
  assert windowed < T * T // 4


@pytest.mark.slow
def test_ran_padding_does_not_move_the_gpc():
  q, k, v = _qkv(12, T=17)
  p = _ran_params(3)
  garbage = lambda x: x.at[:, 12:].set(1e4)
  out, doc = rm.recurrent_attention_network(q, garbage(k), garbage(v), window=4, causal=False,
                                            kv_lengths=jnp.array([12, 12]), return_document=True,
                                            **p)
  ref, ref_doc = rm.recurrent_attention_network(q[:, :12], k[:, :12], v[:, :12], window=4,
                                                causal=False, return_document=True, **p)
  chex.assert_trees_all_close(out[:, :12], ref, **TOL)
  chex.assert_trees_all_close(doc, ref_doc, **TOL)
  with pytest.raises(ValueError, match="segment_ids"):
    rm.recurrent_attention_network(q, k, v, segment_ids=jnp.zeros((2, 17), jnp.int32), **p)
