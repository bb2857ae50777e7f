"""flex_attention: `xla` and `reference` against a float64 dense reference (outputs, lse, gradients to
q, k, v and to arrays captured by score mods), bf16 against fp32, empty rows, normalizers, block masks,
retracing."""

import dataclasses
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import block_mask as bm
from attnjax.core import flex
from attnjax.core import masks
from attnjax.core import normalizers
from tests import tolerances

IMPLS = ("xla", "reference")
SOFTPICK_EPS = normalizers.SOFTPICK.eps


def dense_reference(q, k, v, *, score_mod=None, mask_mod=None, normalizer="softmax", scale=None):
  """Plain dense attention in the dtype of its inputs (float64 under `jax.enable_x64`), written from the
  closed forms: softmax, softpick f=relu(e^s-1), h=|e^s-1|, ε; sigmoid and relu unnormalized."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  scale = H ** -0.5 if scale is None else scale
  kr, vr = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)   # query head n reads n // G
  s = jnp.einsum("btnh,bsnh->bnts", q, kr) * scale
  idx = masks.index_grid((B, N, T, S))
  if score_mod is not None:
    s = score_mod(s, *idx)
  vis = masks.evaluate_mask(mask_mod, B, N, T, S)
  empty = ~jnp.any(vis, axis=-1)
  if normalizer == "softmax":
    m = jax.lax.stop_gradient(jnp.max(jnp.where(vis, s, -jnp.inf), axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(vis, jnp.exp(s - m), 0.0)
    den = jnp.sum(e, -1)
    w = e / jnp.where(empty, 1.0, den)[..., None]
    lse = jnp.where(empty, -jnp.inf, m[..., 0] + jnp.log(jnp.where(empty, 1.0, den)))
  elif normalizer == "softpick":
    e = jnp.exp(s) - 1.0
    den = jnp.sum(jnp.where(vis, jnp.abs(e), 0.0), -1) + SOFTPICK_EPS
    w = jnp.where(vis, jax.nn.relu(e), 0.0) / den[..., None]
    lse = jnp.where(empty, -jnp.inf, jnp.log(den))
  else:
    f = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu}[normalizer]
    w = jnp.where(vis, f(s), 0.0)
    lse = jnp.zeros(s.shape[:-1], s.dtype)
  out = jnp.einsum("bnts,bsnh->btnh", w, vr)
  return out, jnp.moveaxis(lse, 1, 2)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  B: int
  T: int
  S: int
  N: int
  K: int
  H: int
  h: int
  block: tuple = None                     # (block_q, block_kv) of a precomputed BlockMask, or None
  mods: Callable = lambda params, consts: (None, None)
  params: Callable = lambda rng, c: {}    # float arrays captured by score_mod (differentiated)
  consts: Callable = lambda rng, c: {}    # integer arrays captured by mask_mod (traced under jit)


def _segments(rng, B, T, docs=4):
  return np.sort(rng.integers(0, docs, (B, T)), axis=1).astype(np.int32)


CASES = [
    Case("mha_causal_63", 2, 63, 63, 4, 4, 16, 16, block=(16, 16),
         mods=lambda p, c: (None, masks.causal())),
    Case("gqa_cross_window_dqk_ne_dv", 1, 37, 50, 6, 2, 8, 12, block=(8, 16),
         mods=lambda p, c: (None, masks.sliding_window(10, 3, offset=13))),
    Case("mqa_causal_alibi", 2, 40, 40, 4, 1, 8, 8, block=(16, 8),
         mods=lambda p, c: (masks.alibi(p["slopes"]), masks.causal()),
         params=lambda rng, c: {"slopes": masks.alibi_slopes(c.N)}),
    Case("documents_per_row_bias", 3, 45, 45, 2, 2, 8, 8, block=(8, 8),
         mods=lambda p, c: (masks.additive_bias(p["bias"]),
                            masks.and_masks(masks.causal(), masks.document(c["seg"]))),
         params=lambda rng, c: {"bias": rng.normal(size=(c.B, c.N, c.T, c.S)).astype(np.float32)},
         consts=lambda rng, c: {"seg": _segments(rng, c.B, c.T)}),
    Case("t5_bias_softcap_default_blocks", 2, 30, 21, 2, 1, 8, 8,
         mods=lambda p, c: (masks.compose_score_mods(
             masks.relative_position_bias(p["table"], max_distance=20), masks.softcap(2.0)), None),
         params=lambda rng, c: {"table": rng.normal(size=(16, c.N)).astype(np.float32)}),
    Case("prefix_per_row_no_mask_tail", 2, 33, 33, 2, 2, 8, 8, block=(16, 8),
         mods=lambda p, c: (None, masks.prefix_lm(c["prefix"])),
         consts=lambda rng, c: {"prefix": np.array([5, 20], np.int32)}),
]


def _inputs(case, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(case.B, case.T, case.N, case.H)).astype(np.float32)
  k = rng.normal(size=(case.B, case.S, case.K, case.H)).astype(np.float32)
  v = rng.normal(size=(case.B, case.S, case.K, case.h)).astype(np.float32)
  dout = rng.normal(size=(case.B, case.T, case.N, case.h)).astype(np.float32)
  params, consts = case.params(rng, case), case.consts(rng, case)
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(k), cast(v)), jax.tree.map(jnp.asarray, params), consts, jnp.asarray(dout)


def _flex_loss(case, impl, normalizer="softmax"):
  """jitted (out, lse, grads wrt (q, k, v, params)) for a case; masks built from traced consts."""

  def run(q, k, v, params, consts, dout):
    score_mod, mask_mod = case.mods(params, consts)
    block_mask = None
    if case.block is not None and impl != "dense":
      block_mask = bm.create_block_mask(mask_mod, case.B, case.N, case.T, case.S,
                                        block_q=case.block[0], block_kv=case.block[1])
    if impl == "dense":
      out, lse = dense_reference(q, k, v, score_mod=score_mod, mask_mod=mask_mod,
                                 normalizer=normalizer)
    else:
      out, lse = flex.flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod,
                                     block_mask=block_mask, normalizer=normalizer,
                                     return_residuals=True, implementation=impl)
    return jnp.sum(out.astype(jnp.float32 if impl != "dense" else out.dtype) * dout), (out, lse)

  grad = jax.grad(run, argnums=(0, 1, 2, 3), has_aux=True)
  return jax.jit(lambda *a: grad(*a)[::-1])


def _float64_reference(case, inputs, params, consts, dout, normalizer="softmax"):
  with jax.enable_x64(True):
    to64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    (out, lse), grads = _flex_loss(case, "dense", normalizer)(
        *map(to64, inputs), jax.tree.map(to64, params), consts, to64(dout))
    return jax.tree.map(lambda x: np.asarray(x, np.float32), (out, lse, grads))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_float64_reference(case):
  inputs, params, consts, dout = _inputs(case)
  want_out, want_lse, want_grads = _float64_reference(case, inputs, params, consts, dout)
  for impl in IMPLS:
    (out, lse), grads = _flex_loss(case, impl)(*inputs, params, consts, dout)
    chex.assert_shape(out, (case.B, case.T, case.N, case.h))
    chex.assert_shape(lse, (case.B, case.T, case.N))
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    chex.assert_trees_all_close(out, want_out, **tolerances.output(jnp.float32))
    chex.assert_trees_all_close(lse, want_lse, **tolerances.output(jnp.float32))
    chex.assert_trees_all_close(grads, want_grads, **tolerances.grad(jnp.float32))
    if params:
      assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads[3]))


def test_long_non_power_of_two_sequence():
  case = Case("causal_1000", 1, 1000, 1000, 2, 1, 16, 16, mods=lambda p, c: (None, masks.causal()))
  inputs, params, consts, dout = _inputs(case, seed=1)
  want_out, want_lse, want_grads = _float64_reference(case, inputs, params, consts, dout)
  (out, lse), grads = _flex_loss(case, "xla")(*inputs, params, consts, dout)
  chex.assert_trees_all_close(out, want_out, **tolerances.output(jnp.float32))
  chex.assert_trees_all_close(lse, want_lse, **tolerances.output(jnp.float32))
  for g, w in zip(grads[:3], want_grads[:3], strict=True):
    assert tolerances.rel_rms(g, w) < tolerances.GRAD_REL_RMS[jnp.float32]


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=lambda c: c.name)
def test_bf16_close_to_fp32(case):
  inputs, params, consts, dout = _inputs(case)
  bf_inputs, _, _, _ = _inputs(case, jnp.bfloat16)
  for impl in IMPLS:
    (out32, _), grads32 = _flex_loss(case, impl)(*inputs, params, consts, dout)
    (out16, lse16), grads16 = _flex_loss(case, impl)(*bf_inputs, params, consts, dout)
    assert out16.dtype == jnp.bfloat16 and lse16.dtype == jnp.float32
    assert tolerances.rel_rms(out16, out32) < tolerances.BF16_VS_FP32_REL_RMS
    for g16, g32 in zip(grads16[:3], grads32[:3], strict=True):
      assert g16.dtype == jnp.bfloat16
      assert tolerances.rel_rms(g16, g32) < tolerances.BF16_VS_FP32_REL_RMS
  (xla, _), xla_g = _flex_loss(case, "xla")(*bf_inputs, params, consts, dout)
  (ref, _), ref_g = _flex_loss(case, "reference")(*bf_inputs, params, consts, dout)
  chex.assert_trees_all_close(xla, ref, **tolerances.output(jnp.bfloat16))
  chex.assert_trees_all_close(xla_g, ref_g, **tolerances.grad(jnp.bfloat16))


def test_fully_masked_rows_zero_output_finite_grads():
  # Per-row query lengths leave rows with no visible key; one batch row is entirely empty.
  B, T, S, N, H = 3, 19, 23, 2, 8
  q_len = jnp.asarray([19, 7, 0])
  mod = masks.and_masks(masks.padding(kv_lengths=jnp.asarray([23, 11, 5]), q_lengths=q_len),
                        masks.causal(offset=2))
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in [(B, T, N, H), (B, S, N, H), (B, S, N, H)])
  empty = np.arange(T)[None, :] >= np.asarray(q_len)[:, None]     # [B, T]
  for normalizer in ("softmax", "softpick"):
    results = {}
    for impl in IMPLS:
      def loss(q, k, v):
        out, lse = flex.flex_attention(q, k, v, mask_mod=mod, normalizer=normalizer,
                                       return_residuals=True, implementation=impl)
        return jnp.sum(out ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)
      (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
          q, k, v)
      np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)
      assert np.all(np.isneginf(np.asarray(lse)[empty])), (impl, normalizer)
      assert np.all(np.isfinite(np.asarray(lse)[~empty]))
      assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
      np.testing.assert_array_equal(np.asarray(grads[0])[empty], 0.0)
      np.testing.assert_array_equal(np.asarray(grads[1])[2], 0.0)   # batch row 2 sees nothing
      results[impl] = (out, grads)
    chex.assert_trees_all_close(results["xla"], results["reference"], **tolerances.grad(jnp.float32))


def test_all_masked_gives_zeros():
  q = jnp.ones((1, 8, 2, 4))
  nothing = lambda b, n, q_idx, kv_idx: jnp.zeros(jnp.broadcast_shapes(q_idx.shape, kv_idx.shape), bool)
  for impl in IMPLS:
    f = lambda q: jnp.sum(flex.flex_attention(q, q, q, mask_mod=nothing, implementation=impl))
    out, lse = jax.jit(lambda q: flex.flex_attention(q, q, q, mask_mod=nothing, implementation=impl,
                                                     return_residuals=True))(q)
    np.testing.assert_array_equal(out, 0.0)
    assert bool(jnp.all(jnp.isneginf(lse)))
    np.testing.assert_array_equal(jax.jit(jax.grad(f))(q), 0.0)


@pytest.mark.parametrize("normalizer", ["softpick", "sigmoid", "relu"])
def test_normalizers_match_closed_forms(normalizer):
  case = CASES[1]    # GQA cross-attention with a window, Dqk != Dv
  inputs, params, consts, dout = _inputs(case, seed=5)
  want_out, want_lse, want_grads = _float64_reference(case, inputs, params, consts, dout, normalizer)
  for impl in IMPLS:
    (out, lse), grads = _flex_loss(case, impl, normalizer)(*inputs, params, consts, dout)
    chex.assert_trees_all_close(out, want_out, **tolerances.output(jnp.float32))
    chex.assert_trees_all_close(lse, want_lse, **tolerances.output(jnp.float32))
    chex.assert_trees_all_close(grads, want_grads, **tolerances.grad(jnp.float32))


def test_softpick_closed_form_single_row():
  # One query, keys with scores s = [2, 0, -1] (scale 1, q = 1, k = s): softpick weights
  # relu(e^s - 1) / (Σ|e^s - 1| + ε).
  s = np.array([2.0, 0.0, -1.0])
  q = jnp.ones((1, 1, 1, 1))
  k = jnp.asarray(s, jnp.float32).reshape(1, 3, 1, 1)
  v = jnp.eye(3, dtype=jnp.float32).reshape(1, 3, 1, 3)
  e = np.exp(s) - 1
  want = np.maximum(e, 0) / (np.abs(e).sum() + SOFTPICK_EPS)
  for impl in IMPLS:
    out = flex.flex_attention(q, k, v, normalizer="softpick", scale=1.0, implementation=impl)
    chex.assert_trees_all_close(out[0, 0, 0], want, **tolerances.output(jnp.float32))


def test_unknown_normalizer():
  q = jnp.ones((1, 4, 1, 4))
  with pytest.raises(ValueError, match="normalizer"):
    flex.flex_attention(q, q, q, normalizer="nope")


def test_block_mask_equals_mask_mod():
  case = CASES[3]
  (q, k, v), params, consts, _ = _inputs(case)
  mod = masks.and_masks(masks.causal(), masks.document(jnp.asarray(consts["seg"])))
  block = bm.create_block_mask(mod, case.B, case.N, case.T, case.S, block_q=16, block_kv=8)
  for impl in IMPLS:
    want = jax.jit(lambda q, k, v: flex.flex_attention(q, k, v, mask_mod=mod, implementation=impl))(
        q, k, v)
    for kwargs in (dict(block_mask=block), dict(block_mask=block, mask_mod=mod)):
      got = jax.jit(lambda q, k, v, kwargs=kwargs: flex.flex_attention(
          q, k, v, implementation=impl, **kwargs))(q, k, v)
      chex.assert_trees_all_close(got, want, **tolerances.output(jnp.float32))
  with pytest.raises(ValueError, match="block_mask"):
    flex.flex_attention(q[:, :20], k, v, block_mask=block)


def test_block_mask_and_a_different_mask_mod_intersect():
  """With both, the visible set is block_mask's AND mask_mod, in every implementation: outputs, lse
  and gradients equal float64 dense attention with the intersected mask, under jit with traced
  segment ids, for block masks that vary over fewer rows / heads than the mask_mod."""
  B, T, S, N, K, H = 2, 37, 37, 4, 2, 8
  rng = np.random.default_rng(11)
  q, k, v, dout = (jnp.asarray(rng.normal(size=s), jnp.float32)
                   for s in [(B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H)])
  seg = _segments(rng, B, T, docs=3)
  heads = jnp.asarray(rng.random((1, N, T, S)) > 0.3)
  # Exact tiles (no mask_mod): a block-diagonal band of 8x8 tiles, FULL on the diagonal.
  nq = -(-T // 8)
  band = np.where(np.abs(np.arange(nq)[:, None] - np.arange(nq)[None]) == 0, bm.FULL,
                  np.where(np.abs(np.arange(nq)[:, None] - np.arange(nq)[None]) == 1, bm.PARTIAL,
                           bm.EMPTY))[None, None].astype(np.int32)
  exact = bm.BlockMask.from_classes(band, seq_lengths=(T, S), block_size=(8, 8))
  band_mod = lambda b, n, qi, ki: jnp.abs(qi // 8 - ki // 8) <= 1
  cases = [   # (block_mask's own mask_mod, its block mask, the extra mask_mod(seg))
      (masks.causal(), bm.create_block_mask(masks.causal(), None, None, T, S, block_q=8,
                                            block_kv=8), lambda seg: masks.document(seg)),
      (masks.sliding_window(5, 2),
       bm.create_block_mask(masks.sliding_window(5, 2), None, None, T, S, block_q=16, block_kv=8),
       lambda seg: masks.and_masks(masks.from_array(heads), masks.document(seg))),
      (band_mod, exact, lambda seg: masks.causal()),
  ]
  for own, block, extra in cases:
    with jax.enable_x64(True):
      to64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
      both = lambda seg: masks.and_masks(own, extra(seg))
      def dense_loss(q, k, v):
        out, lse = dense_reference(q, k, v, mask_mod=both(jnp.asarray(seg)))
        return jnp.sum(out * to64(dout)), (out, lse)
      (want_out, want_lse), want_g = jax.tree.map(
          lambda x: np.asarray(x, np.float32),
          jax.grad(dense_loss, argnums=(0, 1, 2), has_aux=True)(to64(q), to64(k), to64(v))[::-1])
    for impl in IMPLS:
      def loss(q, k, v, seg):
        out, lse = flex.flex_attention(q, k, v, block_mask=block, mask_mod=extra(seg),
                                       return_residuals=True, implementation=impl)
        return jnp.sum(out * dout), (out, lse)
      grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
      (out, lse), grads = jax.jit(lambda *a: grad(*a)[::-1])(q, k, v, jnp.asarray(seg))
      chex.assert_trees_all_close(out, want_out, **tolerances.output(jnp.float32))
      chex.assert_trees_all_close(lse, want_lse, **tolerances.output(jnp.float32))
      chex.assert_trees_all_close(grads, want_g, **tolerances.grad(jnp.float32))


def test_jit_does_not_retrace_when_values_change():
  B, T, N, H = 2, 24, 2, 8

  def f(q, k, v, seg, slopes):
    mod = masks.and_masks(masks.causal(), masks.document(seg))
    return flex.flex_attention(q, k, v, mask_mod=mod, score_mod=masks.alibi(slopes),
                               implementation="xla")

  jitted = jax.jit(chex.assert_max_traces(f, n=1))
  loss = chex.assert_max_traces(lambda *a: jnp.sum(f(*a) ** 2), n=1)
  grad = jax.jit(jax.grad(loss, argnums=(0, 4)))
  try:
    for seed in range(3):
      rng = np.random.default_rng(seed)
      q, k, v = (jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32) for _ in range(3))
      seg = jnp.asarray(_segments(rng, B, T))
      slopes = jnp.asarray(rng.random(N), jnp.float32)
      jax.block_until_ready(jitted(q, k, v, seg, slopes))
      jax.block_until_ready(grad(q, k, v, seg, slopes))
  finally:
    chex.clear_trace_counter()


def test_attention_weights_rows_sum_to_one():
  case = CASES[3]
  (q, k, v), params, consts, _ = _inputs(case)
  mod = masks.and_masks(masks.causal(offset=-3), masks.document(jnp.asarray(consts["seg"])))
  weights, logits = flex.attention_weights(q, k, mask_mod=mod, score_mod=masks.additive_bias(
      params["bias"]))
  chex.assert_shape((weights, logits), (case.B, case.N, case.T, case.S))
  vis = np.asarray(masks.evaluate_mask(mod, case.B, case.N, case.T, case.S))
  rows = vis.any(-1)
  chex.assert_trees_all_close(jnp.sum(weights, -1), np.where(rows, 1.0, 0.0),
                              **tolerances.output(jnp.float32))
  assert np.all(np.isneginf(np.asarray(logits)[~vis]))
  np.testing.assert_array_equal(np.asarray(weights)[~vis], 0.0)
  out = flex.flex_attention(q, k, v, mask_mod=mod, score_mod=masks.additive_bias(params["bias"]),
                            implementation="reference")
  chex.assert_trees_all_close(jnp.einsum("bnts,bsnh->btnh", weights, v), out,
                              **tolerances.output(jnp.float32))


def test_traced_scale_gradient():
  rng = np.random.default_rng(8)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 12, 2, 4)), jnp.float32) for _ in range(3))
  grads = {impl: jax.grad(lambda s: jnp.sum(flex.flex_attention(
      q, k, v, scale=s, mask_mod=masks.causal(), implementation=impl) ** 2))(0.7) for impl in IMPLS}
  chex.assert_trees_all_close(grads["xla"], grads["reference"], **tolerances.grad(jnp.float32))


@pytest.mark.parametrize("bad,match", [
    (dict(q=(2, 8, 4)), "`q`"),
    (dict(k=(2, 8, 3, 8), v=(2, 8, 3, 8)), "heads"),
    (dict(k=(2, 8, 2, 6)), "`k`"),
    (dict(v=(2, 9, 2, 8)), "`v`"),
    (dict(k=(1, 8, 2, 8)), "`k`"),
])
def test_bad_shapes_raise(bad, match):
  shapes = dict(q=(2, 8, 4, 8), k=(2, 8, 2, 8), v=(2, 8, 2, 8))
  shapes.update(bad)
  args = [jnp.ones(shapes[n]) for n in ("q", "k", "v")]
  with pytest.raises(ValueError, match=match):
    flex.flex_attention(*args)


def test_forward_mode_autodiff_takes_the_reference_or_names_it():
  """jax.jvp / jacfwd: automatic dispatch takes the dense reference (the tiled paths have a custom
  VJP, reverse mode only) and gives its tangents; a named tiled implementation says what to use."""
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 9, 2, 4)) for i in range(3))
  tangent = jax.random.normal(jax.random.PRNGKey(7), q.shape)
  run = lambda impl: (lambda q: flex.flex_attention(q, k, v, mask_mod=masks.causal(),
                                                    implementation=impl))
  auto = jax.jit(lambda q, t: jax.jvp(run(None), (q,), (t,)))(q, tangent)
  # Central differences of the reference: the tangent is the directional derivative.
  eps = 1e-3
  numeric = (run("reference")(q + eps * tangent) - run("reference")(q - eps * tangent)) / (2 * eps)
  np.testing.assert_allclose(auto[1], numeric, **tolerances.CENTRAL_DIFFERENCE_FP32)
  with pytest.raises(ValueError, match="implementation='reference'"):
    jax.jvp(run("xla"), (q,), (tangent,))


@pytest.mark.parametrize("implementation", [None, "xla", "reference"])
def test_traced_float32_scale_keeps_the_input_dtype(implementation):
  # A learned temperature (a float32 array) with bf16 inputs: the output stays bf16 and equals the
  # float32 computation with that scale (None: flex's CPU default, cpu_flash where it is built).
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 13, 2, 8)), jnp.bfloat16) for _ in range(3))
  scale = jnp.float32(0.2)
  out = jax.jit(lambda q, k, v, s: flex.flex_attention(
      q, k, v, mask_mod=masks.causal(), scale=s, implementation=implementation))(q, k, v, scale)
  want = flex.flex_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask_mod=masks.causal(),
                             scale=0.2, implementation="reference")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want),
                             **tolerances.output(jnp.bfloat16))
