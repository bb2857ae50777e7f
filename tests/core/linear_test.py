"""gated_linear_attention: every form against the plain recurrence, in outputs, final state and gradients
(q, k, v, gates, initial state); decode steps, packing, padding, GQA, bf16 and bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.core import linear
from attnjax.core import linear_forms
from tests import tolerances

IMPLS = ("xla", "parallel")
# Compiled, with its flags static: eager dispatch would compile every primitive separately (the file
# is compile-bound).
gla = jax.jit(aj.gated_linear_attention, static_argnames=(
    "normalize", "causal", "scale", "return_final_state", "chunk_size", "implementation"))


def _inputs(B=2, T=37, N=4, K=2, F=8, h=6, seed=0, positive=True):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (B, T, N, F))
  k = jax.random.normal(ks[1], (B, T, K, F))
  if positive:   # normalized attention needs positive features (a normalizer far from zero)
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
  v = jax.random.normal(ks[2], (B, T, K, h))
  scalar = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, N)))
  per_dim = -jax.nn.softplus(jax.random.normal(ks[4], (B, T, N, F)))
  return q, k, v, {"none": None, "scalar": scalar, "per_dim": per_dim}


def _seg(B, T):
  a = np.zeros((B, T), np.int32)
  a[0, T // 4:] = 1
  a[0, 2 * T // 3:] = 2
  a[1, T // 2:] = 7
  return jnp.asarray(a)


def _assert_rel(a, b, tol):
  assert tolerances.rel_rms(a, b) < tol, tolerances.rel_rms(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("decay", ["none", "scalar", "per_dim"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_forms_agree_with_recurrence(impl, decay, normalize, packed):
  q, k, v, decays = _inputs()
  B, T, N, F = q.shape
  h = v.shape[-1]
  seg = _seg(B, T) if packed else None
  s0 = jnp.abs(jax.random.normal(jax.random.PRNGKey(3), (B, N, F, h + normalize)))
  kw = dict(log_decay=decays[decay], normalize=normalize, segment_ids=seg, initial_state=s0,
            return_final_state=True, chunk_size=8)
  out, state = gla(q, k, v, implementation=impl, **kw)
  ref_out, ref_state = gla(q, k, v, implementation="reference", **kw)
  _assert_rel(out, ref_out, tolerances.REL_RMS[jnp.float32])
  _assert_rel(state, ref_state, tolerances.REL_RMS[jnp.float32])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("decay", ["none", "scalar", "per_dim"])
def test_gradients_agree_with_recurrence(impl, decay):
  q, k, v, decays = _inputs(T=29)
  B, T, N, F = q.shape
  s0 = jax.random.normal(jax.random.PRNGKey(4), (B, N, F, v.shape[-1]))
  g0 = decays[decay]

  def loss(impl, q, k, v, g, s0):
    out, state = gla(q, k, v, log_decay=g, initial_state=s0,
                                           return_final_state=True, chunk_size=8,
                                           segment_ids=_seg(B, T), implementation=impl)
    return jnp.sum(out * jnp.sin(out)) + jnp.sum(state ** 2)

  argnums = (1, 2, 3, 4, 5) if g0 is not None else (1, 2, 3, 5)
  grads = jax.grad(loss, argnums=argnums)(impl, q, k, v, g0, s0)
  ref = jax.grad(loss, argnums=argnums)("reference", q, k, v, g0, s0)
  for a, b in zip(grads, ref, strict=True):
    _assert_rel(a, b, tolerances.GRAD_REL_RMS[jnp.float32])


@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
def test_chunked_equals_recurrent_long_and_ragged(T):
  q, k, v, decays = _inputs(B=1, T=T, N=2, K=1, F=16, h=16)
  for g in (None, decays["scalar"] * 0.05):
    out = gla(q, k, v, log_decay=g, normalize=True, implementation="xla")
    ref = gla(q, k, v, log_decay=g, normalize=True,
                                    implementation="reference")
    _assert_rel(out, ref, tolerances.REL_RMS[jnp.float32])


@pytest.mark.parametrize("packed", [False, True])
def test_strong_per_channel_decay_over_long_chunks(packed):
  # Log decays of -5 ... -20 per step (e^{±Λ} over a 64-step chunk is far outside float32) on some
  # channels, none on others: the chunked form must neither overflow nor lose the slow channels.
  q, k, v, _ = _inputs(B=2, T=200, N=2, K=2, F=8, h=4, seed=5)
  B, T, N, F = q.shape
  strong = -jax.random.uniform(jax.random.PRNGKey(6), (B, T, N, F), minval=5.0, maxval=20.0)
  g = jnp.where(jnp.arange(F) < F // 2, strong, -0.01)
  seg = _seg(B, T) if packed else None
  s0 = jax.random.normal(jax.random.PRNGKey(7), (B, N, F, v.shape[-1]))

  def loss(impl, q, k, v, g, s0):
    out, state = gla(q, k, v, log_decay=g, initial_state=s0, segment_ids=seg,
                     return_final_state=True, chunk_size=64, implementation=impl)
    return jnp.sum(out * jnp.sin(out)) + jnp.sum(state ** 2), (out, state)

  grad = jax.grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True)
  grads, (out, state) = grad("xla", q, k, v, g, s0)
  ref_grads, (ref_out, ref_state) = grad("reference", q, k, v, g, s0)
  chex.assert_tree_all_finite((grads, out, state))
  _assert_rel(out, ref_out, tolerances.REL_RMS[jnp.float32])
  _assert_rel(state, ref_state, tolerances.REL_RMS[jnp.float32])
  for a, b in zip(grads, ref_grads, strict=True):
    _assert_rel(a, b, tolerances.GRAD_REL_RMS[jnp.float32])


@pytest.mark.parametrize("packed", [False, True])
def test_per_channel_factored_and_halving_forms_agree(packed, monkeypatch):
  # Per-channel gates within FACTORED_RANGE take the factored intra-chunk form (its hand-written
  # backward); a range of -1 sends the same inputs through block halving. Both equal the recurrence in
  # outputs, final state and gradients to q, k, v, the gates and the initial state.
  q, k, v, decays = _inputs(B=2, T=45, N=2, K=2, F=8, h=4, seed=8)
  B, T, N, F = q.shape
  seg = _seg(B, T) if packed else None
  s0 = jax.random.normal(jax.random.PRNGKey(9), (B, N, F, v.shape[-1]))

  def grads(impl):
    def loss(q, k, v, g, s0):
      out, state = aj.gated_linear_attention(q, k, v, log_decay=g, initial_state=s0, segment_ids=seg,
                                             return_final_state=True, chunk_size=16,
                                             implementation=impl)
      return jnp.sum(out * jnp.sin(out)) + jnp.sum(state ** 2), (out, state)
    # A fresh function per call: jit caches by function, and the range is read while tracing.
    return jax.jit(lambda *a: jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(*a))(
        q, k, v, decays["per_dim"], s0)

  ref = grads("reference")
  factored = grads("xla")
  monkeypatch.setattr(linear_forms, "FACTORED_RANGE", -1.0)
  halving = grads("xla")
  for got in (factored, halving):
    (g, (out, state)), (g_ref, (out_ref, state_ref)) = got, ref
    _assert_rel(out, out_ref, tolerances.REL_RMS[jnp.float32])
    _assert_rel(state, state_ref, tolerances.REL_RMS[jnp.float32])
    for a, b in zip(g, g_ref, strict=True):
      _assert_rel(a, b, tolerances.GRAD_REL_RMS[jnp.float32])


def test_per_channel_forward_mode_autodiff():
  # jax.jvp cannot enter the factored form's custom VJP: the chunked form then takes block halving.
  q, k, v, decays = _inputs(B=1, T=21, N=2, K=2, F=8, h=4, seed=10)
  g = decays["per_dim"]
  tangents = tuple(jax.random.normal(jax.random.PRNGKey(11 + i), x.shape) for i, x in
                   enumerate((q, k, v, g)))
  f = lambda impl: (lambda q, k, v, g: aj.gated_linear_attention(q, k, v, log_decay=g, chunk_size=8,
                                                                 implementation=impl))
  _, tangent = jax.jvp(f("xla"), (q, k, v, g), tangents)
  _, ref = jax.jvp(f("reference"), (q, k, v, g), tangents)
  _assert_rel(tangent, ref, tolerances.GRAD_REL_RMS[jnp.float32])


@pytest.mark.parametrize("impl", ("xla", "parallel", "pallas_triton"))
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
def test_one_strong_or_infinite_decay_step_stays_accurate(impl, per_channel):
  # A single huge (or -inf: a hard reset) log decay among weak ones: the chunked forms' exponents are
  # differences of cumulative sums, accurate only because the front end floors the log decay at
  # LOG_DECAY_FLOOR (unfloored, a -1e4 step cost later pairs of its chunk ~1e-2; -inf gave NaN).
  q, k, v, _ = _inputs(B=1, T=20, N=2, K=2, F=4, h=3, seed=12)
  shape = q.shape if per_channel else q.shape[:3]
  for strong in (-1e4, -jnp.inf):
    g = jnp.full(shape, -0.01).at[:, 2].set(strong)
    out = gla(q, k, v, log_decay=g, chunk_size=16, implementation=impl)
    ref = gla(q, k, v, log_decay=g, chunk_size=16, implementation="reference")
    chex.assert_tree_all_finite(out)
    _assert_rel(out, ref, tolerances.REL_RMS[jnp.float32])


def test_prefill_then_steps_equal_full():
  q, k, v, decays = _inputs()
  g = decays["per_dim"]
  B, T, N, F = q.shape
  full = gla(q, k, v, log_decay=g, normalize=True)
  prefill = 20
  out, state = gla(q[:, :prefill], k[:, :prefill], v[:, :prefill],
                                         log_decay=g[:, :prefill], normalize=True,
                                         return_final_state=True)
  chex.assert_trees_all_close(out, full[:, :prefill], **tolerances.output(jnp.float32))
  for t in range(prefill, T):
    o, state = linear.gated_linear_attention_step(q[:, t], k[:, t], v[:, t], state,
                                                  log_decay=g[:, t], normalize=True)
    chex.assert_trees_all_close(o, full[:, t], **tolerances.output(jnp.float32))


def test_packed_equals_separate():
  q, k, v, decays = _inputs(B=1, T=30)
  g = decays["scalar"]
  seg = jnp.asarray([[0] * 12 + [1] * 18])
  packed = gla(q, k, v, log_decay=g, segment_ids=seg, chunk_size=8)
  for part in (slice(0, 12), slice(12, 30)):
    alone = gla(q[:, part], k[:, part], v[:, part], log_decay=g[:, part],
                                      chunk_size=8)
    chex.assert_trees_all_close(packed[:, part], alone, **tolerances.output(jnp.float32))


@pytest.mark.parametrize("impl", ("xla", "parallel", "reference"))
def test_padding_leaves_state_unchanged(impl):
  q, k, v, decays = _inputs(T=24)
  g = decays["per_dim"]
  lengths = jnp.array([17, 24])
  # Garbage (inf) in the padded slots must not reach the state or the outputs.
  k_bad = k.at[0, 17:].set(jnp.inf)
  g_bad = g.at[0, 17:].set(-50.0)
  _, state = gla(q, k_bad, v, log_decay=g_bad, kv_lengths=lengths,
                                       return_final_state=True, implementation=impl)
  _, state_short = gla(q[:1, :17], k[:1, :17], v[:1, :17],
                                             log_decay=g[:1, :17], return_final_state=True)
  chex.assert_trees_all_close(state[0], state_short[0], **tolerances.output(jnp.float32))


@pytest.mark.parametrize("impl", ("xla", "parallel", "reference"))
@pytest.mark.parametrize("packed", [False, True])
def test_noncausal_is_q_times_kv_per_document(impl, packed):
  q, k, v, _ = _inputs(T=21)
  B, T = q.shape[:2]
  seg = _seg(B, T) if packed else None
  out = gla(q, k, v, causal=False, normalize=True, segment_ids=seg,
                                  implementation=impl, chunk_size=4)
  # Explicit: weights q_t·k_s over the document, normalized by their sum.
  kr, vr = (jnp.repeat(x, 2, axis=2) for x in (k, v))
  w = jnp.einsum("btnf,bsnf->bnts", q * q.shape[-1] ** -0.5, kr)
  if packed:
    w = w * (seg[:, None, :, None] == seg[:, None, None, :])
  want = jnp.einsum("bnts,bsnh->btnh", w, vr) / jnp.sum(w, -1).transpose(0, 2, 1)[..., None]
  chex.assert_trees_all_close(out, want, **tolerances.output(jnp.float32))


def test_cross_attention_noncausal():
  q, _, _, _ = _inputs(T=5)
  _, k, v, _ = _inputs(T=9, seed=1)
  out = gla(q, k, v, causal=False)
  chex.assert_shape(out, (2, 5, 4, 6))


def test_fully_padded_row_gives_zeros_not_nan():
  q, k, v, _ = _inputs(T=8)
  f = lambda q, k, v: gla(q, k, v, normalize=True,
                                                kv_lengths=jnp.array([0, 8]))
  out = f(q, k, v)
  assert bool(jnp.all(out[0] == 0))
  chex.assert_tree_all_finite(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2))(q, k, v))


def test_bf16_close_to_fp32():
  q, k, v, decays = _inputs(T=50)
  out32 = gla(q, k, v, log_decay=decays["scalar"], normalize=True)
  out16 = gla(*(x.astype(jnp.bfloat16) for x in (q, k, v)),
                                    log_decay=decays["scalar"], normalize=True)
  assert out16.dtype == jnp.bfloat16
  assert tolerances.rel_rms(out16, out32) < tolerances.BF16_VS_FP32_REL_RMS


def test_gqa_equals_repeated_heads():
  q, k, v, _ = _inputs()
  out = gla(q, k, v)
  rep = gla(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2))
  chex.assert_trees_all_close(out, rep, **tolerances.output(jnp.float32))


def test_memory_of_chunked_backward_is_linear_in_length():
  def temp_bytes(T):
    q = jnp.zeros((1, T, 2, 16))
    v = jnp.zeros((1, T, 2, 16))
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(gla(
        q, k, v, implementation="xla", chunk_size=32)), argnums=(0, 1, 2)))
    return f.lower(q, q, v).compile().memory_analysis().temp_size_in_bytes
  small, large = temp_bytes(1024), temp_bytes(8192)
  assert large <= 8 * small * tolerances.MEMORY_LINEAR_SLACK, (small, large)


@pytest.mark.parametrize("bad, match", [
    (dict(log_decay=jnp.zeros((2, 5, 3))), "log_decay"),
    (dict(initial_state=jnp.zeros((2, 4, 8, 5))), "initial_state"),
    (dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), "segment_ids"),
    (dict(kv_lengths=jnp.zeros((3,), jnp.int32)), "kv_lengths"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_input_names_the_argument(bad, match):
  q, k, v, _ = _inputs(T=5)
  with pytest.raises(ValueError, match=match):
    gla(q, k, v, **bad)


def test_bad_shapes():
  q, k, v, _ = _inputs(T=5)
  with pytest.raises(ValueError, match="k must have shape"):
    gla(q, k[..., :3], v)
  with pytest.raises(ValueError, match="causal attention needs T == S"):
    gla(q, k[:, :3], v[:, :3])
