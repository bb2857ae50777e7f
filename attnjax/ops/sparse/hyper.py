"""HyperAttention: sortLSH block-diagonal attention plus uniform column sampling for the rest.

Non-causal (queries `[T]` against keys `[S]`, per head):

  1. sortLSH: hash q and k with an angular LSH of r random hyperplanes (sign bits read as a
     Gray-code bucket index, so adjacent buckets differ in one bit), and sort each by bucket
     (stable). Key sorted rank s falls in block s // b (nb = ceil(S / b) blocks); query sorted rank
     t in group ⌊t · nb / T⌋. Each query group attends exactly (one softmax) to its key block:
     `(o_blk, lse_blk)`.
  2. Residual: m key ranks drawn uniformly (with replacement) among the L real keys; a query uses the
     samples outside its own block, weighted by L / m:
        lse_res = log Σ_{j ∉ block} e^{s_ij} + log(L / m),    o_res = softmax over those samples · v.
  3. The two parts are merged as disjoint softmax states (`merge_attention_states`) and rows are
     put back in the original order.

Causal (self-attention, T = S): the paper's recursion. Pad to an even length, split in halves:
the top-left and bottom-right quarters are causal HyperAttention of half the length (recursively,
exact causal attention at length ≤ `min_seq_len`), the bottom-left quarter (second-half queries
against first-half keys, no mask) is the non-causal estimate; the bottom rows merge the two. Every
piece sees only earlier keys, so a row never depends on later tokens. As in the authors' code
(github.com/insuhan/hyper-attn, `hyper_attn.py`), calls of length ≤ `min_seq_len` are exact.

Randomness is explicit: `rng` (the registry's `Mechanism.rng`) draws the hyperplanes `[H, r]`
(shared by all heads, as the authors' `AngularLSH`) and the samples `[B, N, m]` (per batch row and
query head); each recursion node folds its own index into the key. Without a key the deterministic
form is exact softmax attention (the limit the estimate approximates). The sampled form needs
`q_offset = 0` and no `segment_ids` (no decoding, no packing). The block-diagonal part runs on
`flex_attention` in sorted order (`xla` visits only the diagonal tiles' partial blocks); hashing,
sorting and the O(T·m) residual are plain array code.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
Paper: Han et al., "HyperAttention: Long-context Attention in Near-Linear Time", arXiv:2310.05869.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import flex
from attnjax.core import masks
from attnjax.core.merge import merge_attention_states
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["hyper_attention", "angular_lsh_buckets", "gray_code_order"]


def gray_code_order(bits: int) -> np.ndarray:
  """`[2^bits]`: bucket of each sign pattern (read as a binary number) so that patterns one bit
  apart get adjacent buckets (the authors' `_unit_hamming_distance_array`)."""
  order = np.array([0, 1])
  for size in range(2, bits + 1):
    order = np.concatenate([order, order[::-1] + 2 ** (size - 1)])
  return order[:2 ** bits]


def angular_lsh_buckets(x, planes):
  """Bucket `[...]` int32 of `x [..., H]` under hyperplanes `planes [H, r]`."""
  bits = (jnp.einsum("...h,hr->...r", x.astype(jnp.float32), planes) > 0).astype(jnp.int32)
  code = jnp.sum(bits << jnp.arange(planes.shape[-1], dtype=jnp.int32), axis=-1)
  return jnp.asarray(gray_code_order(planes.shape[-1]), jnp.int32)[code]


def _sorted(x, order):
  """x `[B, L, heads, d]` gathered along L by `order [B, L, heads]`."""
  return jnp.take_along_axis(x, order[..., None], axis=1)


def _exact(q, k, v, lengths, *, causal, scale, implementation):
  """Exact attention under causal / length masks: `(out float32, lse)`."""
  mask_mod = masks.combine_masks(masks.causal(0) if causal else None,
                                 masks.padding(kv_lengths=lengths))
  out, lse = flex.flex_attention(q, k, v, mask_mod=mask_mod, scale=scale, return_residuals=True,
                                 implementation=implementation)
  return out.astype(jnp.float32), lse


def _noncausal(q, k, v, lengths, key, *, block_size, num_samples, planes, scale, implementation):
  """Non-causal HyperAttention: `(out [B,T,N,h] float32, lse [B,T,N])`."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  nb = -(-S // block_size)
  q_order = jnp.argsort(angular_lsh_buckets(q, planes), axis=1, stable=True)       # [B, T, N]
  k_bucket = angular_lsh_buckets(k, planes)
  real = contract.valid_slots(B, S, lengths)[..., None]
  # Padding sorts last, so the real keys hold sorted ranks 0 .. L-1.
  k_order = jnp.argsort(jnp.where(real, k_bucket, 2 ** planes.shape[-1]),
                        axis=1, stable=True)
  qs, ks, vs = _sorted(q, q_order), _sorted(k, k_order), _sorted(v, k_order)
  group = lambda t: (t * nb) // T                                          # noqa: E731

  def diagonal(b, n, q_idx, kv_idx):
    del n
    return (group(q_idx) == kv_idx // block_size) & (kv_idx < lengths[b])

  out, lse = flex.flex_attention(qs, ks, vs, mask_mod=diagonal, scale=scale, return_residuals=True,
                                 implementation=implementation)
  out = out.astype(jnp.float32)
  if num_samples and nb > 1:
    draw = jax.random.uniform(key, (B, N, num_samples))
    idx = jnp.minimum((draw * lengths[:, None, None]).astype(jnp.int32),
                      jnp.maximum(lengths[:, None, None] - 1, 0))                   # [B, N, m]
    b = jnp.arange(B)[:, None, None]
    head = (jnp.arange(N) // G)[None, :, None]
    k_smp = ks.astype(jnp.float32)[b, idx, head]                                     # [B, N, m, H]
    v_smp = vs.astype(jnp.float32)[b, idx, head]
    s = jnp.einsum("btnh,bnmh->bntm", qs.astype(jnp.float32), k_smp) * scale
    own = group(jnp.arange(T))[None, None, :, None] == (idx // block_size)[:, :, None, :]
    use = ~own & (lengths > 0)[:, None, None, None]
    m = jnp.max(jnp.where(use, s, -jnp.inf), axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.where(use, jnp.exp(jnp.where(use, s - m, 0.0)), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    some = total > 0
    o_res = jnp.einsum("bntm,bnmh->btnh", e / jnp.where(some, total, 1.0), v_smp)
    weight = jnp.log(jnp.maximum(lengths, 1).astype(jnp.float32) / num_samples)[:, None, None, None]
    lse_res = jnp.where(some, m + jnp.log(jnp.where(some, total, 1.0)) + weight, -jnp.inf)
    out, lse = merge_attention_states([out, o_res], [lse, jnp.moveaxis(lse_res[..., 0], 1, 2)])
  inverse = jnp.argsort(q_order, axis=1)
  return _sorted(out, inverse), jnp.take_along_axis(lse, inverse, axis=1)


def _causal(q, k, v, lengths, key, *, min_seq_len, **kw):
  """The paper's causal recursion over halves: `(out [B,T,N,h] float32, lse [B,T,N])`."""
  T = q.shape[1]
  if T <= min_seq_len:
    return _exact(q, k, v, lengths, causal=True, scale=kw["scale"],
                  implementation=kw["implementation"])
  pad = T % 2
  if pad:  # one zero token at the end: after every real query, hidden from all of them
    q, k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q, k, v))
  half = (T + pad) // 2
  first = jnp.minimum(lengths, half)
  rest = jnp.clip(lengths - half, 0, half)
  top = _causal(q[:, :half], k[:, :half], v[:, :half], first, jax.random.fold_in(key, 0),
                min_seq_len=min_seq_len, **kw)
  right = _causal(q[:, half:], k[:, half:], v[:, half:], rest, jax.random.fold_in(key, 1),
                  min_seq_len=min_seq_len, **kw)
  left = _noncausal(q[:, half:], k[:, :half], v[:, :half], first, jax.random.fold_in(key, 2), **kw)
  bottom = merge_attention_states([right[0], left[0]], [right[1], left[1]])
  out = jnp.concatenate([top[0], bottom[0]], axis=1)[:, :T]
  return out, jnp.concatenate([top[1], bottom[1]], axis=1)[:, :T]


def hyper_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                    q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                    implementation: Optional[str] = None, rng: Optional[jax.Array] = None,
                    block_size: int = 256, num_samples: int = 256, num_projections: int = 7,
                    min_seq_len: int = 4096) -> Output:
  """HyperAttention (see the module docstring): sortLSH block-diagonal attention plus a sampled
  estimate of the rest (`rng` given), or exact attention (no key)."""
  op = "hyper_attention"
  B, T, S, _, _, H, _ = checks.check_qkv(op, q, k, v)
  for name, value, low in (("block_size", block_size, 1), ("num_samples", num_samples, 0),
                           ("num_projections", num_projections, 1), ("min_seq_len", min_seq_len, 1)):
    if not isinstance(value, int) or value < low:
      raise ValueError(f"{op}: `{name}` must be an int >= {low}, got {value!r}")
  if rng is None:
    return contract.flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                       q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                       implementation=implementation)
  if segment_ids is not None or not checks.is_static_zero(q_offset):
    raise ValueError(f"{op}: the sampled form (`rng` given) takes no `segment_ids` and q_offset 0 "
                     "(no packing, no decoding)")
  if causal and T != S:
    raise ValueError(f"{op}: causal HyperAttention is self-attention (T == S); got T={T}, S={S}")
  lengths = contract.lengths_or_full(op, kv_lengths, B, S)
  scale = H ** -0.5 if scale is None else scale
  planes_key, key = jax.random.split(rng)
  kw = dict(block_size=block_size, num_samples=num_samples, scale=scale,
            planes=jax.random.normal(planes_key, (H, num_projections)),
            implementation=implementation)
  if causal:
    out, _ = _causal(q, k, v, lengths, key, min_seq_len=min_seq_len, **kw)
  elif T <= min_seq_len:
    out, _ = _exact(q, k, v, lengths, causal=False, scale=scale, implementation=implementation)
  else:
    out, _ = _noncausal(q, k, v, lengths, key, **kw)
  return out.astype(q.dtype)


register(Mechanism(
    name="hyper_attention", fn=hyper_attention, family="sparse-inference", seeds=(85,),
    paper="HyperAttention: Long-context Attention in Near-Linear Time", arxiv="2310.05869",
    patterns=frozenset({"self", "causal_self", "cross"}), decode=False, packed=False, rng="rng",
    complexity="O(T·(block_size + num_samples)·H) sampled (rng given; causal: × log T); O(T·S) exact",
    defaults=dict(block_size=256, num_samples=256, num_projections=7, min_seq_len=4096),
    # min_seq_len 10: one level of the causal recursion at the suite's T = 19 (deeper levels repeat
    # the same code and only grow the compiled program; tests/ops/sparse/hyper_test.py goes deeper).
    example=lambda: dict(rng=np.asarray(jax.random.PRNGKey(0)), block_size=4, num_samples=4,
                         num_projections=3, min_seq_len=10)))
