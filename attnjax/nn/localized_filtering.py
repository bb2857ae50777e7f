"""Yuan 2.0's Localized Filtering-based Attention (LFA): q and k from a causal local filter of x.

    h₁[t] = x[t-1] W₁⁰ + x[t] W₁¹ + b₁          conv1: D → D/2, kernel 2, causal      [B, T, D/2]
    h₂[t] = h₁[t-1] W₂⁰ + h₁[t] W₂¹ + b₂        conv2: D/2 → D, kernel 2, causal      [B, T, D]
    LF(x) = RMSNorm(h₂ + x)                                                           [B, T, D]
    q = LF(x) W_q   [B, T, N, H],   k = LF(x) W_k   [B, T, K, H],   v = x W_v   [B, T, K, H]
    y = mechanism(q, k, v, causal) W_o                                                [B, T, F]

The two convolutions inject the dependency of each token on its neighbours into queries and keys
before attention (the paper's "localized filtering"); the values are projected from the unfiltered
input. Both convolutions are causal, so LF(x)[t] reads x[t-1] and x[t] only and a causal LFA layer's
output at t does not depend on later tokens.

The authors' `LocalizedFiltering` (IEIT-Yuan/Yuan-2.0, Hugging Face `yuan_hf_model.py`) runs each
convolution as `Conv2d(kernel (2, 1), padding (1, 0))` over the sequence and keeps the first T
outputs: the missing predecessor of the first token is a zero of that convolution's own input, so
x[-1] = 0 and h₁[-1] = 0 (not b₁). `LocalizedFiltering` below computes exactly that; its RMSNorm has
ε = 1e-6 and a learned scale (YuanRMSNorm). Interpretations:

- `YuanAttention` concatenates `q_proj(LF)` and `k_proj(LF)` and splits the result per head into
  query and key halves, which is a fixed permutation of the two projections' output columns: the
  same family of functions as the separate projections 'query' and 'key' used here (named as in
  `MultiHeadAttention`). The authors' projections have no bias (`use_bias=False` here by default).
- Packed documents (`segment_ids`): a token whose predecessor belongs to another document sees a zero
  predecessor, as at the start of a sequence, so a packed row equals its documents run alone (the
  authors train without packing).
- Decoding keeps, besides the KV cache, the last input token and its conv1 output
  (`cache/lf_prev_input [B, D]`, `cache/lf_prev_hidden [B, D/2]`): all the kernel-2 convolutions
  need (the authors keep the last two inputs and recompute conv1; the results are the same).
- Attention is any registered mechanism without learned or per-token arrays (softmax in the paper),
  with RoPE on q and k when `rope_base` is set (Yuan uses RoPE, base 10000).

Paper: Wu et al., "YUAN 2.0: A Large Language Model with Localized Filtering-based Attention",
arXiv:2311.15786.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax import registry
from attnjax.nn import layer_parts
from attnjax.ops.positional import rope

__all__ = ["CausalConv2", "LocalizedFiltering", "LocalizedFilteringAttention"]

Initializer = Callable[..., Any]


def _predecessor_kept(segment_ids, B: int, T: int) -> jax.Array:
  """`[B, T]` bool: whether token t's predecessor t-1 is in its sequence (and, packed, its
  document); False at t = 0 of a full forward."""
  first = jnp.zeros((B, 1), bool)
  if segment_ids is None:
    return jnp.concatenate([first, jnp.ones((B, T - 1), bool)], axis=1)
  segment_ids = jnp.asarray(segment_ids)
  if segment_ids.shape != (B, T):
    raise ValueError(f"LocalizedFiltering: `segment_ids` must have shape [B={B}, T={T}], got "
                     f"{segment_ids.shape}")
  return jnp.concatenate([first, segment_ids[:, 1:] == segment_ids[:, :-1]], axis=1)


class CausalConv2(nn.Module):
  """A causal convolution of kernel 2 along the sequence: `y[t] = a[t-1] W⁰ + a[t] W¹ + b`.

  `a [B, T, C_in]`, `previous [B, C_in]` the input before a[0] (zeros at a sequence start),
  `kept [B, T]` whether a[t-1] is a predecessor of a[t] (False: it counts as zero) → `[B, T, C_out]`.
  Parameters as `flax.linen.Conv`: 'kernel' `[2, C_in, C_out]` (tap 0 reads t-1), 'bias' `[C_out]`.
  """
  features: int
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, a: jax.Array, previous: jax.Array, kept: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (2, a.shape[-1], self.features),
                        self.param_dtype)
    dtype = self.dtype or jnp.result_type(a, self.param_dtype)
    a = a.astype(dtype)
    shifted = jnp.concatenate([previous[:, None].astype(dtype), a[:, :-1]], axis=1)
    shifted = jnp.where(kept[..., None], shifted, jnp.zeros((), dtype))
    kernel = kernel.astype(dtype)
    y = (jnp.einsum("btc,cf->btf", shifted, kernel[0], precision=self.precision)
         + jnp.einsum("btc,cf->btf", a, kernel[1], precision=self.precision))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,),
                         self.param_dtype).astype(dtype)
    return y


class LocalizedFiltering(nn.Module):
  """LF(x) = RMSNorm(conv2(conv1(x)) + x) (module docstring): `x [B, T, D] → [B, T, D]`.

  `decode=True` keeps the last input and conv1 output in the 'cache' collection: the first call
  (at `init`) creates them as zeros and returns the full forward; later calls continue the sequence
  after the tokens seen so far (apply with `mutable=['cache']`).

  Attributes:
    use_bias: biases of the two convolutions (the authors' Conv2d have them).
    epsilon: the RMSNorm's ε (YuanRMSNorm: 1e-6).
    dtype, param_dtype, precision: compute dtype, parameter dtype, matmul precision.
  """
  use_bias: bool = True
  epsilon: float = 1e-6
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids=None, decode: bool = False) -> jax.Array:
    if jnp.ndim(x) != 3 or x.shape[-1] < 2:
      raise ValueError(f"LocalizedFiltering: `x` must have shape [B, T, D] with D >= 2, got "
                       f"{jnp.shape(x)}")
    B, T, D = x.shape
    conv = functools.partial(CausalConv2, use_bias=self.use_bias, dtype=self.dtype,
                             param_dtype=self.param_dtype, precision=self.precision)
    dtype = self.dtype or jnp.result_type(x, self.param_dtype)
    initialized = self.has_variable("cache", "lf_prev_input")
    if decode and initialized:
      if segment_ids is not None:
        raise ValueError("LocalizedFiltering: `segment_ids` is not supported with decode=True over "
                         "a cache")
      prev_x = self.variable("cache", "lf_prev_input")
      prev_h = self.variable("cache", "lf_prev_hidden")
      kept = jnp.ones((B, T), bool)   # the cache holds the true predecessors (zeros at index 0)
      h1 = conv(D // 2, name="conv1")(x, prev_x.value, kept)
      h2 = conv(D, name="conv2")(h1, prev_h.value, kept)
      prev_x.value = x[:, -1].astype(prev_x.value.dtype)
      prev_h.value = h1[:, -1].astype(prev_h.value.dtype)
    else:
      kept = _predecessor_kept(segment_ids, B, T)
      h1 = conv(D // 2, name="conv1")(x, jnp.zeros((B, D), dtype), kept)
      h2 = conv(D, name="conv2")(h1, jnp.zeros((B, D // 2), dtype), kept)
      if decode:  # first call: the state before any token
        self.variable("cache", "lf_prev_input", jnp.zeros, (B, D), dtype)
        self.variable("cache", "lf_prev_hidden", jnp.zeros, (B, D // 2), dtype)
    return nn.RMSNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="output_norm")(h2 + x.astype(h2.dtype))


@catalog.serves(82, kind="layer")
class LocalizedFilteringAttention(nn.Module):
  """Yuan 2.0's LFA layer: q, k from LF(x), v from x, any registered mechanism, output projection.

  Attributes:
    num_heads: N query heads.
    mechanism: registry name (or record) of a mechanism without learned or per-token arrays.
    mechanism_kwargs: its keyword arguments.
    num_kv_heads: K key/value heads (None: N); must divide N.
    head_dim: H (None: D // N).
    out_features: F (None: D).
    causal: causal self-attention (Yuan is a decoder; the filter is causal either way).
    use_bias: biases of the q, k, v and output projections (the authors': none).
    lf_bias: biases of the two convolutions.
    norm_epsilon: the filter's RMSNorm ε.
    dtype, param_dtype, precision, kernel_init: as in `MultiHeadAttention`.
    rope_base: RoPE on q and k with this base (None: off); rope_fraction: share of each head rotated.
    scale: the mechanism's logit scale (None: H^-1/2); implementation: its `implementation=`.
  """
  num_heads: int
  mechanism: Union[str, registry.Mechanism] = "softmax"
  mechanism_kwargs: Optional[Mapping[str, Any]] = None
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  out_features: Optional[int] = None
  causal: bool = True
  use_bias: bool = False
  lf_bias: bool = True
  norm_epsilon: float = 1e-6
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.linear.default_kernel_init
  rope_base: Optional[float] = None
  rope_fraction: float = 1.0
  scale: Optional[float] = None
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids=None, kv_lengths=None, positions=None,
               decode: bool = False) -> jax.Array:
    """`x [B, T, D] → [B, T, F]`. `segment_ids [B, T]` packs documents (the filter and attention
    restart at each), `kv_lengths [B]` hides padded keys, `positions` are RoPE positions (default:
    segment-local, or 0 … T-1). `decode=True`: the first call (init) sizes the KV cache on this
    input; later calls append T tokens (apply with `mutable=['cache']`)."""
    owner = "LocalizedFilteringAttention"
    mech = layer_parts.plain_mechanism(owner, self.mechanism, causal=self.causal, cross=False)
    if jnp.ndim(x) != 3:
      raise ValueError(f"{owner}: `x` must have shape [B, T, D], got {jnp.shape(x)}")
    if decode and not mech.decode:
      raise ValueError(f"{owner}: mechanism {mech.name!r} does not support decoding over a KV cache")
    B, T, D = x.shape
    N = self.num_heads
    K = N if self.num_kv_heads is None else self.num_kv_heads
    H = self.head_dim or D // N
    if N <= 0 or K <= 0 or N % K or H <= 0:
      raise ValueError(f"{owner}: need num_kv_heads ({K}) dividing num_heads ({N}) and a head dim "
                       f"> 0 (got {H})")
    dense = functools.partial(nn.DenseGeneral, axis=-1, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype, precision=self.precision,
                              kernel_init=self.kernel_init)
    lf = LocalizedFiltering(use_bias=self.lf_bias, epsilon=self.norm_epsilon, dtype=self.dtype,
                            param_dtype=self.param_dtype, precision=self.precision,
                            name="lf_gate")(x, segment_ids=segment_ids, decode=decode)
    q = dense(features=(N, H), name="query")(lf)
    k = dense(features=(K, H), name="key")(lf)
    v = dense(features=(K, H), name="value")(x)
    kwargs = layer_parts.mechanism_kwargs(self, segment_ids=segment_ids, kv_lengths=kv_lengths)

    if decode and self.has_variable("cache", "cached_key"):
      if segment_ids is not None or kv_lengths is not None or positions is not None:
        raise ValueError(f"{owner}: with decode=True over a cache, `segment_ids`, `kv_lengths` and "
                         "`positions` are not supported (the cache index gives them)")
      out = self._decode_step(mech, q, k, v, kwargs)
    else:
      if decode:  # first call: size the cache on this full-length input
        layer_parts.init_kv_cache(self, k, v)
      if self.rope_base is not None:
        if positions is None:
          positions = (jnp.arange(T, dtype=jnp.int32) if segment_ids is None
                       else rope.segment_positions(segment_ids))
        q, k = (self._rotate(a, positions) for a in (q, k))
      out = self._attend(mech, q, k, v, kwargs)
    return nn.DenseGeneral(features=self.out_features or D, axis=(-2, -1), use_bias=self.use_bias,
                           dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                           kernel_init=self.kernel_init, name="out")(out)

  def _rotate(self, a, positions):
    return rope.apply_rope(a, positions, base=self.rope_base, fraction=self.rope_fraction)

  def _attend(self, mech, q, k, v, kwargs):
    if not mech.gqa and k.shape[2] != q.shape[2]:
      # One K/V head per query head for a mechanism without GQA (query head n reads n // G).
      groups = q.shape[2] // k.shape[2]
      k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    return mech(q, k, v, causal=self.causal, cross=False, **kwargs)

  def _decode_step(self, mech, q, k, v, kwargs):
    """Writes the new keys and values at `cache_index` and attends over the filled cache."""
    cached_key = self.variable("cache", "cached_key")
    cached_value = self.variable("cache", "cached_value")
    cache_index = self.variable("cache", "cache_index")
    B, T = q.shape[:2]
    index = cache_index.value
    layer_parts.check_cache_room(index, T, cached_key.value.shape[1])
    if self.rope_base is not None:
      pos = index + jnp.arange(T, dtype=jnp.int32)
      q, k = self._rotate(q, pos), self._rotate(k, pos)
    zero = jnp.zeros((), index.dtype)
    cached_key.value = jax.lax.dynamic_update_slice(
        cached_key.value, k.astype(cached_key.value.dtype), (zero, index, zero, zero))
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, v.astype(cached_value.value.dtype), (zero, index, zero, zero))
    cache_index.value = index + T
    return self._attend(mech, q, cached_key.value, cached_value.value,
                        {**kwargs, "q_offset": index, "kv_lengths": jnp.full((B,), index + T)})
