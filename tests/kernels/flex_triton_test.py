"""flex_attention(implementation="pallas_triton") on a CPU (Pallas interpret mode: the kernel's own
arithmetic) against the dense reference: outputs, lse and gradients (q, k, v and captured float
arrays); each configuration also lowered for CUDA, which is where a kernel Triton cannot compile
fails on a CPU-only machine. Tiny shapes: interpret mode is slow."""

import dataclasses
import functools
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import block_mask as bm
from attnjax.core import flex
from attnjax.core import masks
from attnjax.kernels import platform
from tests import tolerances

B, T, S, N, K, H, h = 2, 19, 23, 4, 2, 8, 16     # non-power-of-two lengths, GQA, H != h
TRITON_CALL = "xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  mods: Callable                 # (params, consts) -> (score_mod, mask_mod)
  params: Callable = lambda rng: {}      # float arrays captured by score_mod (differentiated)
  consts: Callable = lambda rng: {}      # integer arrays captured by mask_mod (traced under jit)
  normalizer: str = "softmax"
  dtype: type = jnp.float32
  block: tuple = None            # a precomputed BlockMask's tiles, else the tile table's


def _segments(rng, L):
  return np.sort(rng.integers(0, 3, (B, L)), axis=1).astype(np.int32)


# Learned arrays read by indexing (ALiBi slopes [N], a bias [1,N,T,S]) and as a value (a temperature).
CAUSAL_BIAS = Case(
    "gqa_causal_learnable_bias",
    mods=lambda p, c: (masks.compose_score_mods(
        masks.alibi(p["slopes"]), masks.additive_bias(p["bias"]),
        lambda s, b, n, qi, ki: s * p["temperature"]), masks.causal()),
    params=lambda rng: {"slopes": jnp.asarray(masks.alibi_slopes(N)),
                        "bias": jnp.asarray(rng.normal(size=(1, N, T, S)), jnp.float32),
                        "temperature": jnp.asarray(1.3, jnp.float32)})
WINDOW_DOCUMENTS = Case(
    "window_documents_traced_block_mask",
    mods=lambda p, c: (None, masks.and_masks(masks.sliding_window(9, 2, offset=4),
                                             masks.document(c["q_seg"], c["kv_seg"]))),
    consts=lambda rng: {"q_seg": _segments(rng, T), "kv_seg": _segments(rng, S)}, block=(16, 32))
# Per-row lengths leave query rows with no visible key, and batch row 1 sees nothing at all.
EMPTY_ROWS_SOFTPICK = Case(
    "empty_rows_softpick",
    mods=lambda p, c: (None, masks.padding(kv_lengths=c["kv_len"], q_lengths=c["q_len"])),
    consts=lambda rng: {"kv_len": np.array([15, 0], np.int32), "q_len": np.array([11, 19], np.int32)},
    normalizer="softpick")
# A bf16 learned bias with bf16 arithmetic inside score_mod (a mixed-precision model's mod): the
# kernel's captured-array gradient must keep the mod's dtypes.
BF16_PARAMS = Case(
    "bf16_params_in_bf16_arithmetic",
    mods=lambda p, c: (lambda s, b, n, qi, ki: s + (p["bias"][0, n, qi, ki] * 2).astype(jnp.float32),
                       masks.causal()),
    params=lambda rng: {"bias": jnp.asarray(rng.normal(size=(1, N, T, S)), jnp.bfloat16)},
    dtype=jnp.bfloat16)
CASES = [CAUSAL_BIAS, WINDOW_DOCUMENTS, EMPTY_ROWS_SOFTPICK, BF16_PARAMS,
         dataclasses.replace(WINDOW_DOCUMENTS, name="sigmoid_window_documents", normalizer="sigmoid"),
         dataclasses.replace(CAUSAL_BIAS, name="bf16_causal_bias", dtype=jnp.bfloat16)]


def _inputs(case, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(B, T, N, H), (B, S, K, H), (B, S, K, h), (B, T, N, h)]
  q, k, v, dout = (jnp.asarray(rng.normal(size=s), case.dtype) for s in shapes)
  return (q, k, v), case.params(rng), jax.tree.map(jnp.asarray, case.consts(rng)), dout


def _run(case, impl):
  """(out, lse), grads wrt (q, k, v, params) of Σ out·dout + Σ finite lse, traced as a whole."""

  def loss(q, k, v, params, consts, dout):
    score_mod, mask_mod = case.mods(params, consts)
    block_mask = None
    if case.block is not None:
      block_mask = bm.create_block_mask(mask_mod, B, N, T, S, block_q=case.block[0],
                                        block_kv=case.block[1])
    out, lse = flex.flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod,
                                   block_mask=block_mask, normalizer=case.normalizer,
                                   return_residuals=True, implementation=impl)
    finite_lse = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
    return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)) + finite_lse, (out, lse)

  grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
  return lambda *a: grad(*a)[::-1]


@functools.cache
def _compiled(case, impl):
  return jax.jit(_run(case, impl))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference_and_lowers_for_cuda(case):
  inputs, params, consts, dout = _inputs(case)
  (out, lse), grads = _compiled(case, "pallas_triton")(*inputs, params, consts, dout)
  (want_out, want_lse), want_grads = _compiled(case, "reference")(*inputs, params, consts, dout)
  assert out.dtype == case.dtype and lse.dtype == jnp.float32
  chex.assert_shape(out, (B, T, N, h))
  f32 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32), t)
  chex.assert_trees_all_close(f32(out), f32(want_out), **tolerances.output(case.dtype))
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  finite = np.isfinite(np.asarray(want_lse))
  chex.assert_trees_all_close(np.asarray(lse)[finite], np.asarray(want_lse)[finite],
                              **tolerances.output(case.dtype))
  chex.assert_trees_all_close(f32(grads), f32(want_grads), **tolerances.grad(case.dtype))
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads[3]))

  # Lowered for CUDA (forward and gradient): the Triton kernels compile to MLIR on this machine.
  fwd = lambda *a: _run(case, "pallas_triton")(*a)[0]
  for fn in (fwd, _run(case, "pallas_triton")):
    text = platform.lower_for_cuda(fn, *inputs, params, consts, dout)
    assert TRITON_CALL in text


def test_fully_masked_rows_are_zero_not_nan():
  case = EMPTY_ROWS_SOFTPICK
  inputs, params, consts, dout = _inputs(case)
  (out, lse), grads = _compiled(case, "pallas_triton")(*inputs, params, consts, dout)
  empty = np.zeros((B, T), bool)
  empty[0, 11:] = True
  empty[1] = True
  np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)
  assert np.all(np.isneginf(np.asarray(lse)[empty])) and np.all(np.isfinite(np.asarray(lse)[~empty]))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  np.testing.assert_array_equal(np.asarray(grads[0])[empty], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[1])[1], 0.0)      # batch row 1 sees no key


def test_automatic_dispatch_on_cpu_never_picks_pallas_triton():
  (q, k, v), _, _, _ = _inputs(CAUSAL_BIAS)
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: flex.flex_attention(q, k, v, mask_mod=masks.causal()))(
      q, k, v))
  assert "pallas_call" not in jaxpr


def test_what_it_cannot_compile_raises_not_implemented():
  (q, k, v), _, _, _ = _inputs(CAUSAL_BIAS)
  table = jnp.arange(S, dtype=jnp.float32)
  unsupported = [   # out-of-bounds fill gather; tiles Triton cannot use
      dict(score_mod=lambda s, b, n, qi, ki: s + jnp.take(table, ki, mode="fill")),
      dict(block_mask=bm.create_block_mask(masks.causal(), None, None, T, S, block_q=8, block_kv=16)),
  ]
  for kwargs in unsupported:
    with pytest.raises(NotImplementedError, match="pallas_triton"):
      jax.eval_shape(lambda q, k, v, kwargs=kwargs: flex.flex_attention(
          q, k, v, implementation="pallas_triton", **kwargs), q, k, v)


def test_user_built_block_mask_with_full_tail_tile():
  # Every tile FULL while S = 23 is not a multiple of 16: the last key block holds padding keys, so
  # from_classes must make its tiles PARTIAL (the implementations hide padding there only).
  (q, k, v), _, _, _ = _inputs(CAUSAL_BIAS)
  block_mask = bm.BlockMask.from_classes(np.full((1, 1, 2, 2), bm.FULL, np.int32),
                                         seq_lengths=(T, S), block_size=(16, 16))
  want = flex.flex_attention(q, k, v, implementation="reference")
  for impl in ("pallas_triton", "xla"):
    got = flex.flex_attention(q, k, v, block_mask=block_mask, implementation=impl)
    chex.assert_trees_all_close(got, want, **tolerances.output(jnp.float32))


def test_mixed_dtypes_raise_not_implemented():
  # Triton's dot takes one element type: interpret mode would run it, CUDA lowering would not.
  (q, k, v), _, _, _ = _inputs(CAUSAL_BIAS)
  with pytest.raises(NotImplementedError, match="dtypes differ"):
    jax.eval_shape(lambda q, k, v: flex.flex_attention(q, k, v, implementation="pallas_triton"),
                   q.astype(jnp.bfloat16), k, v)


def test_softpick_keeps_the_mass_of_keys_scored_minus_inf_in_an_early_tile():
  # score_mod gives -inf to the visible keys of the first key tile: softpick still counts them in its
  # denominator (|e^-inf - 1| = 1 each), which must survive the rescale when a later tile sets the
  # shift (it was dropped: lse 2.35 for 3.28).
  # S = 32: two FULL key tiles, visited in order (a partial tail tile would be visited first).
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(B, L, n, H)), jnp.float32)
             for L, n in ((T, N), (32, K), (32, K)))
  score_mod = lambda s, b, n, qi, ki: jnp.where(ki < 16, -jnp.inf, s)
  block_mask = bm.create_block_mask(None, B, N, T, 32, block_q=16, block_kv=16)
  run = lambda impl, bmask: flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=bmask,
                                                normalizer="softpick", return_residuals=True,
                                                implementation=impl)
  want = run("reference", None)
  for impl in ("pallas_triton", "xla"):
    chex.assert_trees_all_close(run(impl, block_mask), want, **tolerances.output(jnp.float32))
