"""flex_attention(implementation="cpu_flash") (the fused C++ kernel behind `jax.ffi`,
`attnjax/kernels/cpu`) against the dense reference: outputs, lse and gradients (q, k, v, with an lse
cotangent) for non-power-of-two lengths, GQA, H != h, causal, sliding-window, per-head and
document masks (traced segment ids), rows with no visible key, NaN values of hidden cache slots,
fp32 and bf16; inside a jitted,
vmapped model-like function; and the NotImplementedError fallbacks. Skipped only when the library
cannot be built on this machine (no compiler)."""

import dataclasses
import functools
from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import block_mask as bm
from attnjax.core import flex
from attnjax.core import implementations
from attnjax.core import masks
from attnjax.kernels import cpu
from attnjax.kernels.cpu import build
from attnjax.kernels.cpu import flash
from tests import tolerances

B, N, K, H, h = 2, 4, 2, 24, 40      # GQA, H != h (neither a multiple of the vector width)
IMPL = "cpu_flash"


@pytest.fixture(scope="module", autouse=True)
def _library():
  if build.build(quiet=True) is None or not cpu.available():
    pytest.skip(f"cpu_flash library could not be built here: {cpu.unavailable_reason()}")


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
  """`cpu_flash` in flex's table (first, as registered for CPUs) while the lead adds the row."""
  if IMPL not in [name for name, _, _ in flex._IMPLEMENTATIONS]:
    monkeypatch.setattr(flex, "_IMPLEMENTATIONS",
                        ((IMPL, cpu.cpu_flash_attention, ("cpu",)),) + tuple(flex._IMPLEMENTATIONS))


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  mask: Callable = lambda c: None            # consts -> mask_mod
  consts: Callable = lambda rng, T, S: {}    # integer arrays the mask captures (traced under jit)
  T: int = 45
  S: int = 71
  block: Optional[tuple] = None              # a BlockMask's tiles (built inside the traced function)
  dtype: type = jnp.float32


def _segments(rng, L):
  return np.sort(rng.integers(0, 3, (B, L)), axis=1).astype(np.int32)


def _per_head_window(b, n, qi, ki):
  """A window whose width grows with the head (the mask varies over heads)."""
  return (ki <= qi) & (ki > qi - 3 - 4 * n)


CASES = [
    Case("no_mask_default_tiles"),
    Case("causal_small_tiles", mask=lambda c: masks.causal(), block=(16, 32)),
    # Tiles larger than the kernel's inner blocks (48 query rows, 64 keys), both lengths ragged.
    Case("causal_large_tiles", mask=lambda c: masks.causal(), T=100, S=150, block=(64, 96)),
    Case("sliding_window", mask=lambda c: masks.sliding_window(9, 2, offset=4), block=(16, 32)),
    Case("per_head_window", mask=lambda c: _per_head_window, block=(8, 16)),
    Case("documents_traced", mask=lambda c: masks.document(c["q_seg"], c["kv_seg"]),
         consts=lambda rng, T, S: {"q_seg": _segments(rng, T), "kv_seg": _segments(rng, S)},
         block=(16, 32)),
    Case("documents_traced_default_tiles", mask=lambda c: masks.document(c["q_seg"], c["kv_seg"]),
         consts=lambda rng, T, S: {"q_seg": _segments(rng, T), "kv_seg": _segments(rng, S)}),
    # Per-row lengths leave query rows with no visible key; batch row 1 sees no key at all.
    Case("empty_rows", mask=lambda c: masks.padding(kv_lengths=c["kv_len"], q_lengths=c["q_len"]),
         consts=lambda rng, T, S: {"kv_len": np.array([15, 0], np.int32),
                                   "q_len": np.array([11, T], np.int32)}, block=(16, 16)),
    Case("bf16_causal", mask=lambda c: masks.causal(), block=(16, 32), dtype=jnp.bfloat16),
]


def _inputs(case, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(B, case.T, N, H), (B, case.S, K, H), (B, case.S, K, h), (B, case.T, N, h)]
  q, k, v, dout = (jnp.asarray(rng.normal(size=s), case.dtype) for s in shapes)
  dlse = jnp.asarray(rng.normal(size=(B, case.T, N)), jnp.float32)
  consts = jax.tree.map(jnp.asarray, case.consts(rng, case.T, case.S))
  return q, k, v, consts, dout, dlse


@functools.cache
def _compiled(case, impl):
  """(out, lse), grads wrt (q, k, v) of Σ out·dout + Σ_finite lse·dlse, traced as a whole."""

  def loss(q, k, v, consts, dout, dlse):
    mask_mod = case.mask(consts)
    block_mask = None
    if case.block is not None:
      block_mask = bm.create_block_mask(mask_mod, B, N, case.T, case.S, block_q=case.block[0],
                                        block_kv=case.block[1])
    out, lse = flex.flex_attention(q, k, v, mask_mod=mask_mod, block_mask=block_mask,
                                   return_residuals=True, implementation=impl)
    finite_lse = jnp.sum(jnp.where(jnp.isfinite(lse), lse * dlse, 0.0))
    return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)) + finite_lse, (out, lse)

  grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  return jax.jit(lambda *a: grad(*a)[::-1])


def _assert_matches(got, want, dtype):
  (out, lse), grads = got
  (want_out, want_lse), want_grads = want
  f32 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32), t)
  chex.assert_trees_all_close(f32(out), f32(want_out), **tolerances.output(dtype))
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  finite = np.isfinite(np.asarray(want_lse))
  chex.assert_trees_all_close(np.asarray(lse)[finite], np.asarray(want_lse)[finite],
                              **tolerances.output(dtype))
  chex.assert_trees_all_close(f32(grads), f32(want_grads), **tolerances.grad(dtype))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case):
  args = _inputs(case)
  (out, lse), grads = got = _compiled(case, IMPL)(*args)
  assert out.dtype == case.dtype and lse.dtype == jnp.float32
  chex.assert_shape(out, (B, case.T, N, h))
  assert [g.dtype for g in grads] == [case.dtype] * 3
  _assert_matches(got, _compiled(case, "reference")(*args), case.dtype)
  assert all(float(jnp.max(jnp.abs(g.astype(jnp.float32)))) > 0 for g in grads)


def test_rows_with_no_visible_key_are_zero_not_nan():
  case = next(c for c in CASES if c.name == "empty_rows")
  (out, lse), grads = _compiled(case, IMPL)(*_inputs(case))
  empty = np.zeros((B, case.T), bool)
  empty[0, 11:] = True
  empty[1] = True
  np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)
  assert np.all(np.isneginf(np.asarray(lse)[empty])) and np.all(np.isfinite(np.asarray(lse)[~empty]))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  np.testing.assert_array_equal(np.asarray(grads[0])[empty], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[1])[1], 0.0)      # batch row 1 sees no key
  np.testing.assert_array_equal(np.asarray(grads[2])[0, 15:], 0.0)  # keys past the length


def test_values_of_keys_hidden_from_a_whole_tile_may_be_nan():
  """A cache's unused slots (past each row's length, inside a partial tile) may hold NaN: their zero
  weights must not multiply it into the output."""
  rng = np.random.default_rng(3)
  T, S = 5, 37
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
             for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, h)))
  lengths = jnp.asarray([29, 6], jnp.int32)
  hidden = (jnp.arange(S)[None, :] >= lengths[:, None])[:, :, None, None]
  run = jax.jit(lambda k, v, implementation: flex.flex_attention(
      q, k, v, mask_mod=masks.padding(kv_lengths=lengths), implementation=implementation),
      static_argnames="implementation")
  out = run(jnp.where(hidden, jnp.nan, k), jnp.where(hidden, jnp.nan, v), IMPL)
  assert np.isfinite(np.asarray(out)).all()
  chex.assert_trees_all_close(out, run(k, v, "reference"), **tolerances.output(jnp.float32))


def test_gradients_are_deterministic():
  case = CASES[2]
  args = _inputs(case, seed=1)
  first = _compiled(case, IMPL)(*args)
  again = _compiled(case, IMPL)(*args)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_jitted_vmapped_model_matches_reference():
  """A small attention layer (projections, causal flex attention with a traced scale, output
  projection) written for one example, vmapped over the batch and differentiated under jit."""
  T, D = 37, 32
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(3, T, D)), jnp.float32)
  params = {name: jnp.asarray(rng.normal(size=shape) / np.sqrt(D), jnp.float32)
            for name, shape in (("wq", (D, N, H)), ("wk", (D, K, H)), ("wv", (D, K, h)),
                                ("wo", (N, h, D)))}
  params["temperature"] = jnp.asarray(1.3, jnp.float32)

  def layer(params, x, impl):
    q = jnp.einsum("td,dnh->tnh", x, params["wq"])[None]
    k = jnp.einsum("td,dkh->tkh", x, params["wk"])[None]
    v = jnp.einsum("td,dkh->tkh", x, params["wv"])[None]
    out = flex.flex_attention(q, k, v, mask_mod=masks.causal(), implementation=impl,
                              scale=params["temperature"] * H ** -0.5)
    return jnp.einsum("tnh,nhd->td", out[0], params["wo"])

  def loss(params, x, impl):
    y = jax.vmap(layer, in_axes=(None, 0, None))(params, x, impl)
    return jnp.sum(jnp.sin(y)), y

  run = jax.jit(jax.grad(loss, has_aux=True), static_argnums=2)
  (grads, y), (want_grads, want_y) = run(params, x, IMPL)[::-1], run(params, x, "reference")[::-1]
  chex.assert_trees_all_close(y, want_y, **tolerances.output(jnp.float32))
  chex.assert_trees_all_close(grads, want_grads, **tolerances.grad(jnp.float32))


def test_unsupported_inputs_raise_not_implemented_and_dispatch_falls_back():
  case = CASES[1]
  q, k, v = _inputs(case)[:3]
  unsupported = [dict(score_mod=lambda s, b, n, qi, ki: s * 2.0), dict(normalizer="softpick")]
  for kwargs in unsupported:
    with pytest.raises(NotImplementedError, match="cpu_flash"):
      flex.flex_attention(q, k, v, implementation=IMPL, **kwargs)
    got = flex.flex_attention(q, k, v, mask_mod=masks.causal(), **kwargs)   # automatic: not cpu_flash
    want = flex.flex_attention(q, k, v, mask_mod=masks.causal(), implementation="reference",
                               **kwargs)
    chex.assert_trees_all_close(got, want, **tolerances.output(jnp.float32))


def test_oversized_partial_tile_mask_falls_back(monkeypatch):
  case = CASES[1]
  q, k, v = _inputs(case)[:3]
  monkeypatch.setattr(flash, "MAX_MASK_BYTES", 16)
  with pytest.raises(NotImplementedError, match="partial-tile mask"):
    flex.flex_attention(q, k, v, mask_mod=masks.causal(), implementation=IMPL)
  got = flex.flex_attention(q, k, v, mask_mod=masks.causal())
  want = flex.flex_attention(q, k, v, mask_mod=masks.causal(), implementation="reference")
  chex.assert_trees_all_close(got, want, **tolerances.output(jnp.float32))


def test_automatic_dispatch_takes_cpu_flash_and_falls_back_when_not_built(monkeypatch):
  case = CASES[1]
  q, k, v = _inputs(case)[:3]
  fn = lambda q, k, v: flex.flex_attention(q, k, v, mask_mod=masks.causal())
  if implementations.current_platform() == "cpu":
    assert flash._FWD in str(jax.jit(fn).lower(q, k, v).as_text())
  monkeypatch.setitem(flash._state, "reason", "libattnjax_flash.so is not built")
  with pytest.raises(NotImplementedError, match="not built"):
    flex.flex_attention(q, k, v, implementation=IMPL)
  fn = lambda q, k, v: flex.flex_attention(q, k, v, mask_mod=masks.causal())   # a fresh trace
  assert flash._FWD not in jax.jit(fn).lower(q, k, v).as_text()
  want = flex.flex_attention(q, k, v, mask_mod=masks.causal(), implementation="reference")
  chex.assert_trees_all_close(fn(q, k, v), want, **tolerances.output(jnp.float32))


def test_library_is_current():
  assert build.stale_reason() is None
  assert build.LIBRARY.exists()
