"""Attention over a paged KV cache and cascade attention (FlashInfer, arXiv:2501.01005): for ragged
lengths, shuffled page pools whose unused pages and slots hold NaN, page sizes that do not divide the
lengths, GQA / MQA, T = 1 decode and T > 1 prefill, fp32 and bf16, the paged result equals an
explicit float64 loop over the row's keys read through the page table and the contiguous `KVCache`
path on the same tokens, for each CPU implementation (`cpu_flash` reads the pages in place);
gradients equal the reference's; cascade (the prefix attended once
for all rows) equals paged attention over tables whose first pages hold the prefix.

Shapes come from a fixed set, so every jitted function compiles once per configuration.
"""

import functools

import beartype
import chex
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from attnjax import catalog
from attnjax.core import kvcache
from attnjax.core import paged_attention as pa
from attnjax.kernels import platform
from attnjax.kernels.cpu import flash
from tests import inputs
from tests import tolerances

B, N, H, HV, MAX_PAGES = 3, 4, 8, 6, 5
# Name -> (T, K, page_size, dtype, causal). Page sizes 3, 4, 5 do not divide most lengths.
CONFIGS = {
    "decode_gqa": (1, 2, 3, jnp.float32, True),
    "prefill_gqa": (3, 2, 5, jnp.float32, True),
    "decode_mqa_bf16": (1, 1, 4, jnp.bfloat16, True),
    "prefill_mha_bf16_not_causal": (2, 4, 5, jnp.bfloat16, False),
}
# Two pages per split: three splits over five pages, the last one short (xla's split-K path).
PAGES_PER_SPLIT = 2
JUNK_ENTRIES = (-1, 0, 10 ** 6)       # what a table holds past a row's pages
# The CPU paths (cpu_flash where the kernel is built: `make test` builds it).
CPU_IMPLEMENTATIONS = ["xla", "reference"] + (["cpu_flash"] if flash.available() else [])


def _pool(rng, lengths, page_size, K, dtype, junk, spare=2):
  """A shuffled pool holding each row's `lengths[b]` tokens: `(k_pages, v_pages, table)` and the
  rows' keys and values as contiguous float64 arrays `[B, MAX_PAGES · page_size, K, ·]` (zeros past
  the length). Unused pages, spare pages and the slots past a row's length in its last page hold
  NaN; table entries past a row's pages hold `junk`: a path that read them unmasked gives NaN."""
  S = MAX_PAGES * page_size
  P = B * MAX_PAGES + spare
  rows_k = rng.standard_normal((B, S, K, H)).astype(np.float32)
  rows_v = rng.standard_normal((B, S, K, HV)).astype(np.float32)
  # Round to the dtype first: the float64 rewrite sees exactly the stored values.
  rows_k = np.asarray(jnp.asarray(rows_k, dtype), np.float64)
  rows_v = np.asarray(jnp.asarray(rows_v, dtype), np.float64)
  hidden = np.arange(S)[None, :] >= np.asarray(lengths)[:, None]
  rows_k[hidden], rows_v[hidden] = np.nan, np.nan
  table = rng.permutation(P)[:B * MAX_PAGES].reshape(B, MAX_PAGES).astype(np.int32)
  k_pages = np.full((P, page_size, K, H), np.nan)
  v_pages = np.full((P, page_size, K, HV), np.nan)
  k_pages[table.reshape(-1)] = rows_k.reshape(B * MAX_PAGES, page_size, K, H)
  v_pages[table.reshape(-1)] = rows_v.reshape(B * MAX_PAGES, page_size, K, HV)
  for b, length in enumerate(lengths):
    table[b, -(-int(length) // page_size):] = junk
  rows_k[hidden], rows_v[hidden] = 0.0, 0.0
  return (jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), jnp.asarray(table),
          rows_k, rows_v)


def _float64_attention(q, rows_k, rows_v, lengths, offsets, causal, prefix=None):
  """The definition, one query at a time in float64: softmax over the visible keys of the row (the
  prefix's keys first when `prefix = (k [Sp, K, H], v [Sp, K, h])` is given: visible to all)."""
  q = np.asarray(q, np.float64)
  _, T, _, _ = q.shape
  K = rows_k.shape[2]
  out = np.zeros((B, T, N, HV))
  for b in range(B):
    for t in range(T):
      keys = [j for j in range(int(lengths[b]))
              if not causal or j <= int(offsets[b]) + t]
      for n in range(N):
        kv = n // (N // K)
        ks = [rows_k[b, j, kv] for j in keys]
        vs = [rows_v[b, j, kv] for j in keys]
        if prefix is not None:
          ks = list(prefix[0][:, kv]) + ks
          vs = list(prefix[1][:, kv]) + vs
        if not ks:
          continue
        s = np.array([q[b, t, n] @ k for k in ks]) / np.sqrt(H)
        w = np.exp(s - s.max())
        out[b, t, n] = (w / w.sum()) @ np.array(vs)
  return out


@functools.partial(jax.jit, static_argnames=("causal", "pages_per_split", "implementation"))
def _paged(q, k_pages, v_pages, table, lengths, offsets, *, causal, pages_per_split=PAGES_PER_SPLIT,
           implementation="xla"):
  return pa.paged_attention(q, k_pages, v_pages, table, lengths, q_offset=offsets, causal=causal,
                            pages_per_split=pages_per_split, implementation=implementation)


@functools.partial(jax.jit, static_argnames="causal")
def _contiguous(q, k, v, lengths, causal):
  """The contiguous cache path on the same tokens (queries at `lengths - T`)."""
  return kvcache.decode_attention(q, kvcache.KVCache(k, v, lengths), split_size=4, causal=causal)


def _case(config, lengths, seed, junk):
  T, K, ps, dtype, causal = CONFIGS[config]
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths, np.int32)
  k_pages, v_pages, table, rows_k, rows_v = _pool(rng, lengths, ps, K, dtype, junk)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  offsets = lengths - T
  return q, k_pages, v_pages, table, lengths, offsets, causal, rows_k, rows_v


def _close(actual, expected, dtype):
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             **tolerances.output(dtype))


@settings(max_examples=15, deadline=None)
@given(config=st.sampled_from(sorted(CONFIGS)),
       fill=st.lists(st.floats(0.0, 1.0), min_size=B, max_size=B),
       seed=st.integers(0, 2 ** 16), junk=st.sampled_from(JUNK_ENTRIES),
       implementation=st.sampled_from(CPU_IMPLEMENTATIONS))
def test_paged_equals_float64_loop_and_contiguous_cache(config, fill, seed, junk, implementation):
  T, _, ps, dtype, _ = CONFIGS[config]
  lengths = [round(f * MAX_PAGES * ps) for f in fill]      # 0 to full, ragged
  q, k_pages, v_pages, table, lengths, offsets, causal, rows_k, rows_v = _case(
      config, lengths, seed, junk)
  out = _paged(q, k_pages, v_pages, table, lengths, offsets, causal=causal,
               implementation=implementation)
  assert out.dtype == dtype and out.shape == (B, T, N, HV)
  assert np.isfinite(np.asarray(out, np.float32)).all()
  _close(out, _float64_attention(q, rows_k, rows_v, lengths, offsets, causal), dtype)
  contiguous = _contiguous(q, jnp.asarray(rows_k, dtype), jnp.asarray(rows_v, dtype),
                           jnp.asarray(lengths), causal=causal)
  _close(out, contiguous, dtype)


@pytest.mark.parametrize("pages_per_split", [1, None, MAX_PAGES])
def test_split_sizes_agree(pages_per_split):
  """One page per split, the default (one split at these sizes) and the whole table at once."""
  q, k_pages, v_pages, table, lengths, offsets, causal, rows_k, rows_v = _case(
      "prefill_gqa", [25, 7, 13], 0, -1)
  out = _paged(q, k_pages, v_pages, table, lengths, offsets, causal=causal,
               pages_per_split=pages_per_split)
  _close(out, _float64_attention(q, rows_k, rows_v, lengths, offsets, causal), jnp.float32)


@pytest.mark.skipif(not flash.available(), reason="cpu_flash is not built")
@pytest.mark.parametrize("T,offset", [(1, 0), (7, 0), (7, -3), (4, 9)])
def test_cpu_flash_tile_lists_cover_every_visible_key(T, offset):
  """The kernel's lists take each row's pages as full or partial tiles (at most ceil(T / page_size)
  + 2 partial ones): long causal prefills crossing many pages, queries before the first key, and
  lengths short of the queries, against the float64 loop."""
  rng = np.random.default_rng(T)
  ps, K = 3, 2
  lengths = np.array([MAX_PAGES * ps, 8, 0], np.int32)
  k_pages, v_pages, table, rows_k, rows_v = _pool(rng, lengths, ps, K, jnp.float32, -1)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  offsets = np.maximum(lengths - T, 0) + offset
  for causal in (True, False):
    out = _paged(q, k_pages, v_pages, table, lengths, offsets, causal=causal,
                 implementation="cpu_flash")
    _close(out, _float64_attention(q, rows_k, rows_v, lengths, offsets, causal), jnp.float32)


def test_empty_row_gives_zeros_forward_and_backward():
  q, k_pages, v_pages, table, lengths, offsets, causal, _, _ = _case("decode_gqa", [0, 9, 0], 1, -1)
  out = np.asarray(_paged(q, k_pages, v_pages, table, lengths, offsets, causal=causal))
  np.testing.assert_array_equal(out[[0, 2]], 0.0)
  assert np.isfinite(out).all()
  dq, dk, dv = jax.jit(jax.grad(lambda q, k, v: jnp.sum(pa.paged_attention(
      q, k, v, table, lengths, q_offset=offsets, pages_per_split=PAGES_PER_SPLIT,
      implementation="xla") ** 2), argnums=(0, 1, 2)))(q, k_pages, v_pages)
  assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv))
  np.testing.assert_array_equal(np.asarray(dq)[[0, 2]], 0.0)


def test_queries_before_any_key_give_zeros():
  """Causal prefill whose first queries sit before position 0 (q_offset < 0) see nothing."""
  q, k_pages, v_pages, table, lengths, _, causal, rows_k, rows_v = _case(
      "prefill_gqa", [2, 2, 2], 2, 0)
  offsets = np.full((B,), -2, np.int32)
  out = np.asarray(_paged(q, k_pages, v_pages, table, lengths, offsets, causal=causal))
  np.testing.assert_array_equal(out[:, :2], 0.0)
  _close(out, _float64_attention(q, rows_k, rows_v, lengths, offsets, causal), jnp.float32)


@pytest.mark.parametrize("config", ["decode_gqa", "prefill_gqa"])
def test_gradients_equal_the_reference(config):
  """`xla`'s gradients, and cpu_flash's (its backward is xla's, through a custom_vjp)."""
  q, k_pages, v_pages, table, lengths, offsets, causal, _, _ = _case(config, [14, 0, 11], 3, -1)
  # Finite pools: the gradients of the pages no row reads are zero on both paths.
  k_pages, v_pages = jnp.nan_to_num(k_pages), jnp.nan_to_num(v_pages)
  dout = jnp.asarray(np.random.default_rng(4).standard_normal((B, q.shape[1], N, HV)), jnp.float32)
  call = lambda implementation: (lambda q, k, v: pa.paged_attention(
      q, k, v, table, lengths, q_offset=offsets, causal=causal, pages_per_split=PAGES_PER_SPLIT,
      implementation=implementation))
  for implementation in [impl for impl in CPU_IMPLEMENTATIONS if impl != "reference"]:
    inputs.assert_same_gradients(call(implementation), call("reference"), (q, k_pages, v_pages),
                                 dout, ("dq", "dk_pages", "dv_pages"),
                                 tol=tolerances.grad(jnp.float32))


def test_xla_holds_one_split_at_a_time():
  """No intermediate as large as the gathered rows: each split gathers its own pages only."""
  ps, max_pages = 4, 64
  q = jnp.zeros((B, 1, N, H))
  k_pages, v_pages = jnp.zeros((B * max_pages, ps, 2, H)), jnp.zeros((B * max_pages, ps, 2, HV))
  table = jnp.arange(B * max_pages, dtype=jnp.int32).reshape(B, max_pages)
  lengths = jnp.full((B,), max_pages * ps, jnp.int32)
  fn = lambda *a: pa.paged_attention(*a, q_offset=lengths - 1, pages_per_split=4,
                                     implementation="xla")
  whole_rows = B * max_pages * ps * 2 * H
  largest = inputs.largest_intermediate(fn, q, k_pages, v_pages, table, lengths)
  assert largest <= whole_rows // 8, (largest, whole_rows)


# --------------------------------------------------------------------------------------------------
# Cascade attention

SP, PREFIX_ROOM = 7, 9              # prefix tokens in use, and the prefix buffer's length


@functools.partial(jax.jit, static_argnames=("causal", "implementation"))
def _cascade(q, prefix_k, prefix_v, k_pages, v_pages, table, lengths, offsets, prefix_length, *,
             causal, implementation):
  return pa.cascade_attention(q, prefix_k, prefix_v, k_pages, v_pages, table, lengths,
                              prefix_length=prefix_length, q_offset=offsets, causal=causal,
                              pages_per_split=PAGES_PER_SPLIT, implementation=implementation)


@pytest.mark.parametrize("config", ["decode_gqa", "prefill_gqa", "decode_mqa_bf16"])
def test_cascade_equals_paged_attention_over_prefix_pages(config):
  T, K, ps, dtype, causal = CONFIGS[config]
  rng = np.random.default_rng(5)
  suffix = np.array([5, 0, 2 * ps + 1], np.int32)
  # The prefix buffer holds NaN past the SP tokens in use (prefix_length hides them).
  prefix = [np.asarray(jnp.asarray(rng.standard_normal((PREFIX_ROOM, K, d)), dtype), np.float64)
            for d in (H, HV)]
  for x in prefix:
    x[SP:] = np.nan
  k_pages, v_pages, table, rows_k, rows_v = _pool(rng, suffix, ps, K, dtype, -1)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  # Queries follow the prefix: a row with fewer suffix tokens than queries starts at the suffix.
  offsets = np.maximum(suffix - T, 0)
  args = (q, *(jnp.asarray(x, dtype) for x in prefix), k_pages, v_pages, table, suffix, offsets,
          jnp.int32(SP))
  out = _cascade(*args, causal=causal, implementation="xla")
  assert out.dtype == dtype and np.isfinite(np.asarray(out, np.float32)).all()
  # The same tokens as one paged row each: the prefix, then the suffix (a page may hold both).
  full_k = np.concatenate([np.broadcast_to(prefix[0][None, :SP], (B, SP, K, H)), rows_k], axis=1)
  full_v = np.concatenate([np.broadcast_to(prefix[1][None, :SP], (B, SP, K, HV)), rows_v], axis=1)
  pad = -(-full_k.shape[1] // ps) * ps - full_k.shape[1]
  full_k, full_v = (np.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (full_k, full_v))
  pages = lambda x: jnp.asarray(x.reshape(-1, ps, *x.shape[2:]), dtype)
  full_table = jnp.arange(full_k.shape[0] * full_k.shape[1] // ps, dtype=jnp.int32).reshape(B, -1)
  paged = pa.paged_attention(q, pages(full_k), pages(full_v), full_table, suffix + SP,
                             q_offset=offsets + SP, causal=causal, pages_per_split=2,
                             implementation="xla")
  _close(out, paged, dtype)
  _close(out, _cascade(*args, causal=causal, implementation="reference"), dtype)
  _close(out, _float64_attention(q, rows_k, rows_v, suffix, offsets, causal,
                                 prefix=(prefix[0][:SP], prefix[1][:SP])), dtype)


def test_cascade_without_a_prefix_is_paged_attention():
  q, k_pages, v_pages, table, lengths, offsets, causal, _, _ = _case("decode_gqa", [4, 9, 1], 6, 0)
  prefix_k, prefix_v = jnp.zeros((2, 2, H)), jnp.zeros((2, 2, HV))
  out = pa.cascade_attention(q, prefix_k, prefix_v, k_pages, v_pages, table, lengths,
                             prefix_length=0, q_offset=offsets, pages_per_split=PAGES_PER_SPLIT)
  _close(out, _paged(q, k_pages, v_pages, table, lengths, offsets, causal=causal), jnp.float32)


# --------------------------------------------------------------------------------------------------
# The GPU kernel row, dispatch, errors, annotations, catalog


def _kernel_case():
  q, k_pages, v_pages, table, lengths, offsets, causal, rows_k, rows_v = _case(
      "decode_gqa", [15, 4, 0], 7, -1)
  return (q, k_pages, v_pages, table, jnp.asarray(lengths), jnp.asarray(offsets)), causal, (
      rows_k, rows_v)


def test_pallas_triton_row_in_interpret_mode_and_lowered_for_cuda():
  args, causal, (rows_k, rows_v) = _kernel_case()
  kernel = functools.partial(_paged, causal=causal, implementation="pallas_triton")
  out = kernel(*args)
  _close(out, _float64_attention(args[0], rows_k, rows_v, *args[4:], causal), jnp.float32)
  assert "xla.gpu.triton" in platform.lower_for_cuda(kernel, *args)
  with pytest.raises(NotImplementedError, match="lse"):
    pa.paged_attention(*args[:5], return_residuals=True, implementation="pallas_triton")


def test_automatic_dispatch_on_cpu_takes_cpu_flash_else_xla():
  args, causal, _ = _kernel_case()
  auto = str(jax.make_jaxpr(lambda *a: pa.paged_attention(*a[:5], q_offset=a[5], causal=causal,
                                                          pages_per_split=2))(*args))
  assert "pallas_call" not in auto
  assert ("attnjax_flash_fwd" in auto) == flash.available()
  chex.assert_trees_all_close(jax.jit(lambda *a: pa.paged_attention(
      *a[:5], q_offset=a[5], pages_per_split=2))(*args),
      _paged(*args, causal=causal, implementation="xla"), **tolerances.output(jnp.float32))


BAD_INPUTS = [   # (what replaces the good argument, the argument the error names)
    (lambda a: dict(k_pages=a["k_pages"][0]), "k_pages"),
    (lambda a: dict(k_pages=a["k_pages"][..., :4]), "k_pages"),
    (lambda a: dict(v_pages=a["v_pages"][:, :2]), "v_pages"),
    (lambda a: dict(q=a["q"].astype(jnp.int32)), "q"),
    (lambda a: dict(page_table=a["page_table"].astype(jnp.float32)), "page_table"),
    (lambda a: dict(page_table=a["page_table"][:2]), "page_table"),
    (lambda a: dict(kv_lengths=a["kv_lengths"][:2]), "kv_lengths"),
    (lambda a: dict(kv_lengths=a["kv_lengths"].astype(jnp.float32)), "kv_lengths"),
    (lambda a: dict(q_offset=jnp.zeros((2,), jnp.int32)), "q_offset"),
    (lambda a: dict(pages_per_split=0), "pages_per_split"),
]


@pytest.mark.parametrize("index", range(len(BAD_INPUTS)))
def test_bad_inputs_raise(index):
  args, _, _ = _kernel_case()
  good = dict(zip(("q", "k_pages", "v_pages", "page_table", "kv_lengths"), args[:5], strict=True))
  bad, name = BAD_INPUTS[index]
  call = {**good, **bad(good)}
  with pytest.raises(ValueError, match=f"paged_attention: `{name}`"):
    pa.paged_attention(**call)


def test_cascade_bad_prefix_raises():
  args, _, _ = _kernel_case()
  q, k, v, table, lengths, _ = args
  pk, pv = jnp.zeros((4, 2, H)), jnp.zeros((4, 2, HV))
  with pytest.raises(ValueError, match="cascade_attention: `prefix_k`"):
    pa.cascade_attention(q, pk[..., :3], pv, k, v, table, lengths)
  with pytest.raises(ValueError, match="cascade_attention: `prefix_v`"):
    pa.cascade_attention(q, pk, pv[:3], k, v, table, lengths)
  with pytest.raises(ValueError, match="cascade_attention: `prefix_length`"):
    pa.cascade_attention(q, pk, pv, k, v, table, lengths, prefix_length=5)
  with pytest.raises(ValueError, match="cascade_attention: `page_table`"):
    pa.cascade_attention(q, pk, pv, k, v, table.astype(jnp.float32), lengths)


def test_annotations_hold():
  args, _, _ = _kernel_case()
  q, k, v, table, lengths, offsets = args
  checked = lambda fn: jaxtyping.jaxtyped(fn, typechecker=beartype.beartype)
  out = jax.eval_shape(lambda *a: checked(pa.paged_attention)(*a, q_offset=offsets),
                       q, k, v, table, lengths)
  chex.assert_shape(out, (B, 1, N, HV))
  pk, pv = jnp.zeros((4, 2, H)), jnp.zeros((4, 2, HV))
  out = jax.eval_shape(checked(pa.cascade_attention), q, pk, pv, k, v, table, lengths)
  chex.assert_shape(out, (B, 1, N, HV))
  with pytest.raises(jaxtyping.TypeCheckError):   # the value pages' page size is the key pages'
    jax.eval_shape(checked(pa.paged_attention), q, k, v[:, :2], table, lengths)


def test_catalog_row_194_is_served():
  names = {s.name for s in catalog.servers() if 194 in s.seeds}
  assert {"attnjax.core.paged_attention.paged_attention",
          "attnjax.core.paged_attention.cascade_attention"} <= names
