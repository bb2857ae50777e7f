"""Mega (#168): its full gated attention (EMA, shared Z, Q/K, rotary bias, reset/update gates,
candidate with X'W_h) equals a float64 rewrite of the paper's equations; it reads k and v, never q;
the chunked variant has no `[T, T]` intermediate and with a chunk >= T equals the unchunked one (the
EMA's two forms are tested in tests/core/ema_test.py); causal chunked Mega decodes from a fixed-size
state (the EMA's h and the current chunk) to the same rows.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops.memory.mega import mega_attention, mega_param_specs
from attnjax.registry import example_params
from tests import numpy_math
from tests import tolerances
from tests.inputs import largest_intermediate, qkv
from tests.core.ema_test import numpy_ema_loop

TOL = tolerances.output(jnp.float32)


def _mega_params(seed=0, h=6):
  return example_params(mega_param_specs(h=h), seed=seed, perturb=0.3)


def _np(x):
  return np.asarray(x, np.float64)


def _np_silu(x):
  return x / (1.0 + np.exp(-x))


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
  ema = numpy_ema_loop(k, *(p[f"ema_{n}"][0] for n in ("alpha", "delta", "beta", "eta")))
  if not causal:   # the backward EMA: the same recurrence run from the end, with its own parameters
    ema = ema + numpy_ema_loop(k[:, ::-1], *(p[f"ema_{n}"][1] for n in
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
    o = np.einsum("bij,bjd->bid", numpy_math.softmax(logits, where=mask), _np_silu(v[:, :, g]))
    x = xp[:, :, g]
    gamma = _np_silu(x @ p["reset_kernel"][n] + p["reset_bias"][n])
    phi = numpy_math.sigmoid(x @ p["update_kernel"][n] + p["update_bias"][n])
    cand = _np_silu(x @ p["candidate_kernel"][n] + (gamma * o) @ p["candidate_attn_kernel"][n]
                    + p["candidate_bias"][n])
    out[:, :, n] = phi * cand + (1.0 - phi) * v[:, :, g]
  return out


@pytest.mark.parametrize("causal,chunk_size,impl", [(False, None, "xla"), (True, 5, "xla"),
                                                     (False, 4, "reference")])
def test_mega_gated_attention_matches_float64_paper_equations(causal, chunk_size, impl):
  q, k, v = qkv(seed=13, T=11)
  p = _mega_params(3)
  out = mega_attention(q, k, v, causal=causal, chunk_size=chunk_size, implementation=impl, **p)
  key_mu = np.random.default_rng(0).standard_normal(p["key_kappa"].shape)
  expected = _numpy_mega(k, v, p, key_mu, causal=causal, chunk_size=chunk_size)
  chex.assert_trees_all_close(out, expected, **TOL)


def test_mega_reads_k_and_v_never_q():
  """Q and K both derive from the EMA of the input (the key stream): q is declared unread and
  changing it changes nothing; k and v each change the output."""
  assert aj.get_mechanism("mega_attention").reads == frozenset({"k", "v"})
  q, k, v = qkv(seed=14)
  q2, k2, v2 = qkv(seed=15)
  p = _mega_params(4)
  mega = jax.jit(lambda q, k, v: mega_attention(q, k, v, causal=True, **p))
  base = mega(q, k, v)
  chex.assert_trees_all_equal(mega(q2, k, v), base)
  for out in (mega(q, k2, v), mega(q, k, v2)):
    assert tolerances.rel_rms(out, base) > tolerances.STRONG_CHANGE_REL_RMS


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_mega_chunk_at_least_length_equals_unchunked(causal, impl):
  q, k, v = qkv(seed=0)
  params = _mega_params()
  full = mega_attention(q, k, v, causal=causal, implementation=impl, **params)
  for chunk in (13, 20):
    out = mega_attention(q, k, v, causal=causal, chunk_size=chunk, implementation=impl, **params)
    chex.assert_trees_all_close(out, full, **TOL)


@pytest.mark.slow
def test_mega_chunks_are_independent_blocks():
  """Chunked output of chunk i equals Mega attention run on chunk i's own keys, once the EMA (which
  crosses chunks) is fixed: change keys of another chunk only through the attention."""
  q, k, v = qkv(seed=1, T=16)
  params = _mega_params(1)
  params["ema_eta"] = jnp.zeros_like(params["ema_eta"])   # EMA output 0: no mixing across chunks
  out = mega_attention(q, k, v, causal=False, chunk_size=8, **params)
  v2 = v.at[:, 8:].set(0.0)
  out2 = mega_attention(q, k, v2, causal=False, chunk_size=8, **params)
  chex.assert_trees_all_close(out2[:, :8], out[:, :8], **TOL)
  assert not np.allclose(out2[:, 8:], out[:, 8:])


@pytest.mark.parametrize("causal", [False, True])
def test_mega_chunked_cost_is_linear(causal):
  # T large enough that the linear-size EMA intermediates ([T, H, ndim] = T·64) stay below T²/4.
  T, c = 512, 16
  q, k, v = qkv(seed=2, B=1, T=T, N=1, K=1, H=4, h=4)
  params = example_params(mega_param_specs(), N=1, K=1, H=4)

  def loss(q, k, v, chunk, impl):
    return jnp.sum(mega_attention(q, k, v, causal=causal, chunk_size=chunk, implementation=impl,
                                  **params))

  chunked = largest_intermediate(jax.value_and_grad(lambda *a: loss(*a, c, "xla"),
                                                    argnums=(0, 1, 2)), q, k, v)
  dense = largest_intermediate(lambda *a: loss(*a, None, "reference"), q, k, v)
  assert dense >= T * T            # the check can see a [T, T] score matrix ...
  assert chunked < T * T // 4      # ... and the chunked form has none


@pytest.mark.slow
def test_mega_packed_chunks_start_at_each_document():
  q, k, v = qkv(seed=3, T=19)
  params = _mega_params(2)
  seg = jnp.broadcast_to(jnp.repeat(jnp.arange(2), jnp.array([8, 11]), total_repeat_length=19),
                         (2, 19))
  for causal in (False, True):
    packed = mega_attention(q, k, v, causal=causal, chunk_size=3, segment_ids=seg, **params)
    for part in (slice(0, 8), slice(8, 19)):
      alone = mega_attention(q[:, part], k[:, part], v[:, part], causal=causal, chunk_size=3,
                             **params)
      chex.assert_trees_all_close(packed[:, part], alone, **TOL)


# --------------------------------------------------------------------------------------------------
# Recurrent decoding: the EMA state and the current chunk


# T = 19 with chunks of 4: the prefill crosses position 4, the 7-token chunk crosses 8 and 12, the
# last piece 16.
PIECES = (6, 1, 7, 1, 4)


def _decode_in_pieces(p, k, v, *, chunk_size, pieces=PIECES):
  """The recurrent form over consecutive pieces of the sequence (the first from no state at a Python
  int offset, the others from the carried state at a traced offset): the outputs concatenated, and
  the state after each piece. q is not read (zeros of its shape)."""
  run = lambda k, v, **kw: mega_attention(jnp.zeros(k.shape[:2] + (4, 8)), k, v, causal=True,
                                          chunk_size=chunk_size, return_final_state=True, **kw,
                                          **p)
  first = jax.jit(lambda k, v: run(k, v, q_offset=0, initial_state=None))
  step = jax.jit(lambda k, v, state, n: run(k, v, q_offset=n, initial_state=state))
  outs, states, n = [], [], 0
  for T in pieces:
    part = slice(n, n + T)
    if not states:
      out, state = first(k[:, part], v[:, part])
    else:
      out, state = step(k[:, part], v[:, part], states[-1], jnp.int32(n))
    outs.append(out)
    states.append(state)
    n += T
  return jnp.concatenate(outs, axis=1), states


def test_mega_recurrent_decode_matches_float64_paper_equations_across_chunks():
  """Prefill, single steps and a piece crossing two chunk boundaries, from the fixed-size state
  (the forward EMA's h and the current chunk's c - 1 slots), give the paper's causal chunked
  outputs (GQA: N = 4 query heads over K = 2)."""
  q, k, v = qkv(seed=16, T=19)
  p = _mega_params(5)
  out, states = _decode_in_pieces(p, k, v, chunk_size=4)
  key_mu = np.zeros(p["key_kappa"].shape)
  chex.assert_trees_all_close(out, _numpy_mega(k, v, p, key_mu, causal=True, chunk_size=4), **TOL)
  full = jax.jit(lambda q, k, v: mega_attention(q, k, v, causal=True, chunk_size=4, **p))
  chex.assert_trees_all_close(out, full(q, k, v), **TOL)
  B, K, H, h, ndim = 2, 2, 8, 6, p["ema_alpha"].shape[-1]
  chex.assert_shape([states[0]["ema"], states[0]["keys"], states[0]["values"]],
                    [(B, K, H, ndim), (B, 3, K, H), (B, 3, K, h)])
  for state in states[1:]:                # fixed size: it does not grow with the tokens
    chex.assert_trees_all_equal_shapes(state, states[0])
  floats = sum(x.size for x in jax.tree.leaves(states[0])) // B
  mech = aj.get_mechanism("mega_attention")
  assert floats == mech.decode_state_floats(19, 4, K, H, h, {"chunk_size": 4, **p})


def test_mega_recurrent_state_carries_the_ema_across_chunks():
  """The EMA crosses chunk boundaries: the carried h, not the chunk's keys, brings the earlier
  chunks in. After a prefill of 8 (two whole chunks) the new chunk's output still depends on the
  first chunk, and a state with h zeroed gives the output of a sequence whose EMA starts anew."""
  q, k, v = qkv(seed=17, T=12)
  p = _mega_params(6)
  out, states = _decode_in_pieces(p, k, v, chunk_size=4, pieces=(8, 4))
  step = jax.jit(lambda k, v, state: mega_attention(
      q[:, 8:], k, v, causal=True, chunk_size=4, q_offset=jnp.int32(8), initial_state=state,
      return_final_state=True, **p)[0])
  no_ema = {**states[0], "ema": jnp.zeros_like(states[0]["ema"])}
  restarted = step(k[:, 8:], v[:, 8:], no_ema)
  assert tolerances.rel_rms(restarted, out[:, 8:]) > tolerances.STRONG_CHANGE_REL_RMS
  # A sequence whose EMA restarts at position 8: documents [0, 8) and [8, 12) packed.
  seg = jnp.broadcast_to(jnp.repeat(jnp.arange(2), jnp.array([8, 4]), total_repeat_length=12),
                         (2, 12))
  packed = jax.jit(lambda q, k, v: mega_attention(q, k, v, causal=True, chunk_size=4,
                                                  segment_ids=seg, **p))(q, k, v)
  chex.assert_trees_all_close(restarted, packed[:, 8:], **TOL)


def test_mega_rejects_cross_attention_and_bad_params():
  q, k, v = qkv(seed=4, T=5, S=7)
  with pytest.raises(ValueError, match="self-attention only"):
    mega_attention(q, k, v, **_mega_params())
  q, k, v = qkv(seed=4)
  params = _mega_params()
  params["key_kappa"] = params["key_kappa"][:1]
  with pytest.raises(ValueError, match="key_kappa"):
    mega_attention(q, k, v, **params)
  with pytest.raises(ValueError, match=r"reset_kernel.*\[N, H, h\]"):
    mega_attention(q, k, v[..., :5], **_mega_params())   # arrays sized for h = 6, v has h = 5
  params = _mega_params()
  with pytest.raises(ValueError, match="chunk_size"):   # unchunked: no bounded state
    mega_attention(q, k, v, causal=True, return_final_state=True, **params)
  with pytest.raises(ValueError, match="causal"):
    mega_attention(q, k, v, chunk_size=4, return_final_state=True, **params)
  with pytest.raises(ValueError, match=r"initial_state\['ema'\].*\[B, K, H, ndim\]"):
    mega_attention(q, k, v, causal=True, chunk_size=4, return_final_state=True, **params,
                   initial_state={"ema": jnp.zeros((2, 2, 8, 3)), "keys": jnp.zeros((2, 3, 2, 8)),
                                  "values": jnp.zeros((2, 3, 2, 6))})
