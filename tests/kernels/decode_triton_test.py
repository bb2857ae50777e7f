"""Split-K decode kernels (Pallas Triton) in interpret mode against the float32 reference, split-K
attention and dense flex attention: ragged lengths, GQA, causal T = 3 and T = 1, bf16, an empty row,
a shuffled paged pool; and each configuration lowers for CUDA.

Interpret mode compiles slowly, so the cases are few and tiny and every compiled function is shared.
"""

import functools

import beartype
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from attnjax.core import flex, kvcache
from attnjax.core.contract import contract_mask
from attnjax.kernels import decode_triton, platform
from tests import tolerances

# S = 40 keys in chunks of 16 (block_k 16, 3 splits): the lengths 17 and 23 end inside a chunk,
# and length 17 leaves its third chunk empty (lse = -inf); length 0 is an empty row.
B, S, PAGE = 4, 40, 5
LENGTHS = np.array([40, 17, 0, 23], np.int32)
SETTINGS = dict(num_splits=3, block_k=16)
# "gqa_t3": fp32, causal T = 3, G = 2, head dims not powers of two (padded and masked in the kernel).
# "mqa_t1": bf16, causal T = 1, one kv head for four query heads. "gqa_t2": fp32, not causal, h > H.
# Causal offsets: row 3's queries sit before its last keys (causal hides filled keys); row 1's sit
# past its length (the length hides keys causal would show), so neither mask stands in for the other.
# Row 3's last query (or, for T = 1, a padding row of the kernel's query tile) reaches key 16, the
# first of chunk 2: that chunk has visible keys for some rows of the tile and none for the others.
CASES = {
    "gqa_t3": dict(T=3, N=4, K=2, H=12, h=8, dtype=jnp.float32, causal=True, offsets=[37, 20, 0, 14]),
    "mqa_t1": dict(T=1, N=4, K=1, H=16, h=16, dtype=jnp.bfloat16, causal=True,
                   offsets=[39, 25, 0, 15]),
    "gqa_t2": dict(T=2, N=6, K=3, H=16, h=24, dtype=jnp.float32, causal=False, offsets=[0, 0, 0, 0]),
}


def _normal(seed, shape, dtype):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


@functools.cache
def _inputs(case):
  c = CASES[case]
  q = _normal(0, (B, c["T"], c["N"], c["H"]), c["dtype"])
  k = _normal(1, (B, S, c["K"], c["H"]), c["dtype"])
  v = _normal(2, (B, S, c["K"], c["h"]), c["dtype"])
  return q, k, v, jnp.asarray(LENGTHS), jnp.asarray(c["offsets"], jnp.int32)


def _paged(k, v, seed=3):
  """The contiguous cache cut into pages of PAGE keys, scattered over a shuffled pool with two spare
  pages. Pages past a row's length and the spare pages hold NaN; their table entries point at a spare
  page or far outside the pool: a kernel that read them would give NaN."""
  rng = np.random.default_rng(seed)
  max_pages = S // PAGE
  pool = B * max_pages + 2
  perm = rng.permutation(pool)
  table = perm[:B * max_pages].reshape(B, max_pages).copy()
  pages = lambda x: np.asarray(x, np.float32).reshape(B * max_pages, PAGE, *x.shape[2:])
  k_pages = np.full((pool, PAGE, *k.shape[2:]), np.nan, np.float32)
  v_pages = np.full((pool, PAGE, *v.shape[2:]), np.nan, np.float32)
  k_pages[table.reshape(-1)], v_pages[table.reshape(-1)] = pages(k), pages(v)
  for b, length in enumerate(LENGTHS):
    used = -(-int(length) // PAGE)
    k_pages[table[b, used:]] = v_pages[table[b, used:]] = np.nan
    table[b, used:] = perm[-1] if b % 2 else 10 ** 6
  return (jnp.asarray(k_pages, k.dtype), jnp.asarray(v_pages, v.dtype),
          jnp.asarray(table, jnp.int32))


def _contiguous(q, k, v, lengths, offsets, implementation, causal=True):
  return decode_triton.decode_attention(q, k, v, kv_lengths=lengths, q_offset=offsets, causal=causal,
                                        implementation=implementation, **SETTINGS)


def _paged_call(q, k_pages, v_pages, table, lengths, offsets, implementation):
  return decode_triton.paged_decode_attention(q, k_pages, v_pages, table, lengths, q_offset=offsets,
                                              causal=True, implementation=implementation, **SETTINGS)


_kernel = jax.jit(functools.partial(_contiguous, implementation="pallas_triton"),
                  static_argnames="causal")
_reference = jax.jit(functools.partial(_contiguous, implementation="reference"),
                     static_argnames="causal")
_paged_kernel = jax.jit(functools.partial(_paged_call, implementation="pallas_triton"))
_paged_reference = jax.jit(functools.partial(_paged_call, implementation="reference"))


@functools.cache
def _kernel_out(case):
  return np.asarray(_kernel(*_inputs(case), causal=CASES[case]["causal"]), np.float32)


def _check(actual, expected, dtype):
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             **tolerances.output(dtype))


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_equals_reference(case):
  out = _kernel_out(case)
  assert out.shape == (B, CASES[case]["T"], CASES[case]["N"], CASES[case]["h"])
  _check(out, _reference(*_inputs(case), causal=CASES[case]["causal"]), CASES[case]["dtype"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_empty_row_gives_zeros(case):
  out = _kernel_out(case)
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(out[LENGTHS == 0], 0.0)


@functools.partial(jax.jit, static_argnames="causal")
def _split_k_and_flex(q, k, v, lengths, offsets, causal):
  split_k = kvcache.split_k_attention(q, k, v, split_size=7, q_offset=offsets, kv_lengths=lengths,
                                      causal=causal, implementation="reference")
  mask = contract_mask(B=B, T=q.shape[1], S=S, causal=causal, q_offset=offsets, kv_lengths=lengths)
  dense = flex.flex_attention(q, k, v, mask_mod=mask, implementation="reference")
  return split_k, dense


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_equals_split_k_and_dense_flex(case):
  split_k, dense = _split_k_and_flex(*_inputs(case), causal=CASES[case]["causal"])
  _check(_kernel_out(case), split_k, CASES[case]["dtype"])
  _check(_kernel_out(case), dense, CASES[case]["dtype"])


def test_split_k_attention_routes_pallas_triton_to_the_kernel():
  q, k, v, lengths, offsets = _inputs("gqa_t3")
  # split_size 14 -> 3 splits, the same kernel settings as `_kernel` up to its default block_k.
  routed = jax.jit(lambda *a: kvcache.split_k_attention(
      *a[:3], split_size=14, q_offset=a[4], kv_lengths=a[3], causal=True,
      implementation="pallas_triton"))
  assert "pallas_call" in str(jax.make_jaxpr(routed)(q, k, v, lengths, offsets))
  _check(routed(q, k, v, lengths, offsets), _kernel_out("gqa_t3"), jnp.float32)


def test_paged_shuffled_pool_equals_contiguous_cache():
  q, k, v, lengths, offsets = _inputs("gqa_t3")
  k_pages, v_pages, table = _paged(k, v)
  out = np.asarray(_paged_kernel(q, k_pages, v_pages, table, lengths, offsets))
  assert np.isfinite(out).all()
  _check(out, _kernel_out("gqa_t3"), jnp.float32)
  _check(out, _paged_reference(q, k_pages, v_pages, table, lengths, offsets), jnp.float32)


def test_automatic_dispatch_on_cpu_takes_the_reference():
  inputs = _inputs("gqa_t3")
  auto = jax.make_jaxpr(functools.partial(_contiguous, implementation=None))(*inputs)
  assert "pallas_call" not in str(auto)


@pytest.mark.parametrize("bad, message", [
    (dict(num_splits=0), "num_splits"), (dict(block_k=24), "block_k"),
    (dict(q_offset=np.zeros(3, np.int32)), "q_offset"),
    (dict(kv_lengths=np.zeros(3, np.int32)), "kv_lengths")])
def test_rejects_bad_settings(bad, message):
  q, k, v, _, _ = _inputs("gqa_t3")
  with pytest.raises(ValueError, match=f"decode_attention: `{message}`"):
    decode_triton.decode_attention(q, k, v, **bad)


def test_paged_rejects_a_bad_page_table():
  q, k, v, lengths, offsets = _inputs("gqa_t3")
  k_pages, v_pages, table = _paged(k, v)
  with pytest.raises(ValueError, match="paged_decode_attention.*page_table"):
    decode_triton.paged_decode_attention(q, k_pages, v_pages, table[:2], lengths)
  with pytest.raises(TypeError, match="page_table"):
    decode_triton.paged_decode_attention(q, k_pages, v_pages, table.astype(jnp.float32), lengths)


@pytest.mark.parametrize("config", [*sorted(CASES), "paged"])
def test_lowers_for_cuda(config):
  if config == "paged":
    q, k, v, lengths, offsets = _inputs("gqa_t3")
    fn = functools.partial(_paged_call, implementation="pallas_triton")
    args = (q, *_paged(k, v), lengths, offsets)
  else:
    fn = functools.partial(_contiguous, implementation="pallas_triton",
                           causal=CASES[config]["causal"])
    args = _inputs(config)
  assert "xla.gpu.triton" in platform.lower_for_cuda(fn, *args)


def test_annotations_hold():
  q, k, v, lengths, offsets = _inputs("gqa_t3")
  k_pages, v_pages, table = _paged(k, v)
  checked = lambda fn: jaxtyping.jaxtyped(fn, typechecker=beartype.beartype)
  for implementation in ("pallas_triton", "reference"):
    out = jax.eval_shape(lambda *a: checked(decode_triton.decode_attention)(
        *a[:3], kv_lengths=a[3], q_offset=a[4], implementation=implementation), q, k, v, lengths,
        offsets)
    assert out.shape == (B, 3, 4, 8)
    out = jax.eval_shape(lambda *a: checked(decode_triton.paged_decode_attention)(
        *a, q_offset=2, implementation=implementation), q, k_pages, v_pages, table, lengths)
    assert out.shape == (B, 3, 4, 8)
  with pytest.raises(jaxtyping.TypeCheckError):   # the value pages' page size is the key pages'
    jax.eval_shape(checked(decode_triton.paged_decode_attention), q, k_pages, v_pages[:, :2],
                   table, lengths)


def test_gradients_through_the_kernels_are_the_references():
  # The kernels compute the forward only; jax.grad through them takes the dense reference's VJP.
  q, k, v, lengths, offsets = _inputs("gqa_t3")
  k_pages, v_pages, table = _paged(k, v)
  w = _normal(7, (B, 3, 4, 8), jnp.float32)

  def grads(call, *kv):
    return jax.jit(jax.grad(lambda q, *kv: jnp.sum(call(q, *kv, lengths, offsets) * w),
                            argnums=(0, 1, 2)))(q, *kv)

  for kernel, reference, kv in ((_kernel, _reference, (k, v)),
                                (_paged_kernel, _paged_reference, (k_pages, v_pages, table))):
    got, want = grads(kernel, *kv), grads(reference, *kv)
    for a, b in zip(got, want, strict=True):
      np.testing.assert_allclose(np.nan_to_num(a), np.nan_to_num(b), **tolerances.grad(jnp.float32))
    assert np.isfinite(got[0]).all()


def test_traced_scale_and_unserved_inputs():
  q, k, v, lengths, offsets = _inputs("gqa_t3")
  scaled = jax.jit(lambda q, k, v, s: decode_triton.decode_attention(
      q, k, v, kv_lengths=lengths, q_offset=offsets, causal=True, scale=s,
      implementation="pallas_triton", **SETTINGS))
  want = decode_triton.decode_attention(q, k, v, kv_lengths=lengths, q_offset=offsets, causal=True,
                                        scale=0.3, implementation="reference")
  _check(scaled(q, k, v, 0.3), want, jnp.float32)
  # More query rows per kv head than one tile holds, and jax.jvp: not served by the kernel (named:
  # a clear error; split_k_attention then runs its chunks on flex).
  long_q = jnp.zeros((1, decode_triton.MAX_QUERY_ROWS, 4, 12))
  with pytest.raises(NotImplementedError, match="query rows"):
    decode_triton.decode_attention(long_q, k[:1], v[:1], implementation="pallas_triton")
  f = lambda q: kvcache.split_k_attention(q, k, v, split_size=14, q_offset=offsets,
                                          kv_lengths=lengths, causal=True,
                                          implementation="pallas_triton")
  _, tangent = jax.jvp(f, (q,), (q,))
  _, ref = jax.jvp(lambda q: _reference(q, k, v, lengths, offsets), (q,), (q,))
  _check(tangent, ref, jnp.float32)
