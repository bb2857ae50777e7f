"""Gated attention unit (GAU) and TacoLM's gated cross-attention, as Flax Linen layers.

GatedAttentionUnit (Hua et al., Code 1 of arXiv:2202.10447), one head, `x [B, T, D] → [B, T, D]`:

    X̂ = Norm(X)
    U, V, Z = split(silu(X̂ W_uvz + b_uvz), [e, e, s])          W_uvz: [D, 2e + s]
    Q = Z ⊙ γ_q + β_q,   K = Z ⊙ γ_k + β_k                       (then RoPE, if `rope_base`)
    A = relu(Q Kᵀ / n + b)²                                      [T, T], n: the visible-key count
    O = X + (U ⊙ A V) W_o + b_o                                   W_o: [e, D]

e = 2D and s = 128 by default, as in the paper; `residual=False` drops the shortcut. The attention
is the registered mechanism `gated_attention_unit` (`attnjax.ops.softmax.gau`: how n is counted for
causal rows, the optional relative position bias b). With e = 2D one GAU has 6D² + Ds weights, so two
GAUs have about the 12D² of a Transformer layer (multi-head attention + 4D feed-forward): the paper
stacks 2L GAUs where a Transformer stacks L layers. `decode=True` keeps a KV cache of K and V (the
'cache' collection: `cached_key [B, S_max, 1, s]`, `cached_value [B, S_max, 1, e]`, `cache_index`),
as `attnjax.nn.MultiHeadAttention` does: causal only; the first call (at `init`) sizes the cache.

GatedCrossAttentionUnit (TacoLM's gated cross-attention, `GatedCrossAttention` of
github.com/Ereboas/TacoLM `fairseq/modules/gated_cross_attention.py`), queries and gates from the
speech stream `x [B, T, D]`, keys and values from the text `m [B, S, D_m]`:

    X̂ = Norm(X)
    u, r, q = split(X̂ W_q + b_q, [D, D, s]);  u ← σ(u),  r ← silu(r)    (update and reset gates)
    k = m W_k + b_k,   v = silu(m W_v + b_v)                             [S, s], [S, D]
    A = softmax(q kᵀ / sqrt(s) + b)   or   relu(q kᵀ / n + b)²           (`activation`)
    h = silu((A v ⊙ r) W_h + b_h)
    O = X + u ⊙ (h - X)                                                  (a gated highway update)

The authors' code also runs this layer with softmax by default (`attention_activation_fn` defaults
to 'softmax' and their training commands do not change it), which is our default too. No cache is
needed to decode: the text is fixed and each query row is independent.

Papers: Hua, Dai, Liu and Le, "Transformer Quality in Linear Time", arXiv:2202.10447; Song et al.,
"TacoLM: GaTed Attention Equipped Codec Language Model are Efficient Zero-Shot Text to Speech
Synthesizers", arXiv:2406.15752 (TacoLM's self-attention layer is Mega's, which adds a moving
average to GAU: `attnjax.ops.memory.mega`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.nn import layer_parts
from attnjax.ops.positional import rope
from attnjax.ops.softmax.gau import ACTIVATIONS, gated_attention_unit

__all__ = ["GatedAttentionUnit", "GatedCrossAttentionUnit", "NORMS"]

Initializer = Callable[..., Any]
NORMS = ("layernorm", "rmsnorm", None)


def _norm(kind, dtype, param_dtype, owner: str):
  if kind == "layernorm":
    return nn.LayerNorm(dtype=dtype, param_dtype=param_dtype, name="norm")
  if kind == "rmsnorm":
    return nn.RMSNorm(dtype=dtype, param_dtype=param_dtype, name="norm")
  if kind is None:
    return lambda x: x
  raise ValueError(f"{owner}: `norm` must be one of {NORMS}, got {kind!r}")


def _relative_bias(module: nn.Module, max_distance: Optional[int], param_dtype):
  """Mega's simple relative position bias `[2L - 1]` (zeros at init), or None."""
  if max_distance is None:
    return None
  if max_distance < 1:
    raise ValueError(f"{type(module).__name__}: `max_relative_distance` must be >= 1, "
                     f"got {max_distance}")
  return module.param("relative_bias", nn.initializers.zeros_init(), (2 * max_distance - 1,),
                      param_dtype)


@catalog.serves(226, kind="layer")
class GatedAttentionUnit(nn.Module):
  """Hua et al.'s gated attention unit (module docstring): single-head relu² attention gated by U.

  Attributes:
    expansion_dim: e, the width of U and V (None: 2 · D).
    qk_dim: s, the width of the shared representation Z (and of Q, K).
    causal: causal self-attention (row i divides by its i + 1 visible keys; see the mechanism).
    length: a fixed n for 1/n instead of the per-row visible-key count.
    max_relative_distance: L of a learned relative position bias `[2L - 1]` (None: no bias).
    rope_base: RoPE on Q and K with this base (the pseudo-code rotates them; None: off).
    norm: "layernorm" (the pseudo-code's default), "rmsnorm" or None: the pre-norm.
    residual: add the shortcut X.
    use_bias: biases of the two dense layers.
    dtype, param_dtype: compute and parameter dtypes.
    kernel_init: initializer of the dense kernels.
    implementation: the mechanism's `implementation=` (None: best available).
  """
  expansion_dim: Optional[int] = None
  qk_dim: int = 128
  causal: bool = False
  length: Optional[int] = None
  max_relative_distance: Optional[int] = None
  rope_base: Optional[float] = None
  norm: Optional[str] = "layernorm"
  residual: bool = True
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.linear.default_kernel_init
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, *, segment_ids=None, kv_lengths=None, positions=None,
               decode: bool = False) -> jax.Array:
    """`x [B, T, D] → [B, T, D]`; `segment_ids [B, T]` packs documents, `kv_lengths [B]` pads,
    `positions` are RoPE positions (default: segment-local, or `0 … T-1`). `decode=True` appends
    T tokens to the cache (apply with `mutable=['cache']`)."""
    if jnp.ndim(x) != 3:
      raise ValueError(f"GatedAttentionUnit: `x` must have shape [B, T, D], got {jnp.shape(x)}")
    if decode and not self.causal:
      raise ValueError("GatedAttentionUnit: decode=True needs a causal unit")
    B, T, D = x.shape
    e, s = self.expansion_dim or 2 * D, self.qk_dim
    dense = functools.partial(nn.Dense, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    h = _norm(self.norm, self.dtype, self.param_dtype, "GatedAttentionUnit")(x)
    u, v, z = jnp.split(nn.silu(dense(2 * e + s, name="uvz")(h)), [e, 2 * e], axis=-1)
    # Per-dim scales and offsets of Z (row 0: queries, row 1: keys), initialized as in Code 1.
    gamma = self.param("gamma", nn.initializers.normal(0.02), (2, s), self.param_dtype)
    beta = self.param("beta", nn.initializers.zeros_init(), (2, s), self.param_dtype)
    q = (z * gamma[0] + beta[0])[:, :, None]
    k = (z * gamma[1] + beta[1])[:, :, None]
    v = v[:, :, None]
    bias = _relative_bias(self, self.max_relative_distance, self.param_dtype)
    attend = functools.partial(gated_attention_unit, causal=self.causal, length=self.length,
                               relative_bias=bias, implementation=self.implementation)

    if decode and self.has_variable("cache", "cached_key"):
      if segment_ids is not None or kv_lengths is not None or positions is not None:
        raise ValueError("GatedAttentionUnit: with decode=True over a cache, `segment_ids`, "
                         "`kv_lengths` and `positions` are not supported (the cache index gives "
                         "the positions and the visible length)")
      o = self._decode_step(q, k, v, attend)
    else:
      if decode:  # first call: size the cache on this full-length input
        layer_parts.init_kv_cache(self, k, v)
      if self.rope_base is not None:
        if positions is None:
          positions = (jnp.arange(T, dtype=jnp.int32) if segment_ids is None
                       else rope.segment_positions(segment_ids))
        q, k = (rope.apply_rope(a, positions, base=self.rope_base) for a in (q, k))
      o = attend(q, k, v, segment_ids=segment_ids, kv_lengths=kv_lengths)
    y = dense(D, name="out")(u * o[:, :, 0].astype(u.dtype))
    return x + y.astype(x.dtype) if self.residual else y

  def _decode_step(self, q, k, v, attend):
    """Writes the new K, V at `cache_index` and attends over the filled part of the cache."""
    cached_key = self.variable("cache", "cached_key")
    cached_value = self.variable("cache", "cached_value")
    cache_index = self.variable("cache", "cache_index")
    B, T = q.shape[:2]
    s_max = cached_key.value.shape[1]
    index = cache_index.value
    _check_cache_room("GatedAttentionUnit", index, T, s_max)
    if self.rope_base is not None:
      pos = index + jnp.arange(T, dtype=jnp.int32)
      q, k = (rope.apply_rope(a, pos, base=self.rope_base) for a in (q, k))
    zero = jnp.zeros((), index.dtype)
    cached_key.value = jax.lax.dynamic_update_slice(
        cached_key.value, k.astype(cached_key.value.dtype), (zero, index, zero, zero))
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, v.astype(cached_value.value.dtype), (zero, index, zero, zero))
    cache_index.value = index + T
    return attend(q, cached_key.value, cached_value.value, q_offset=index,
                  kv_lengths=jnp.full((B,), index + T))


@catalog.serves(226, kind="layer")
class GatedCrossAttentionUnit(nn.Module):
  """TacoLM's gated cross-attention (module docstring): speech queries and gates, text keys/values.

  Attributes:
    qk_dim: s, the width of q and k (TacoLM's `zdim`, 128).
    activation: "softmax" (TacoLM's run, scale s^-1/2) or "relu2" (relu(q·k / n + b)², n the
      number of non-padded text tokens).
    max_relative_distance: L of a learned relative position bias `[2L - 1]` between the query's
      position and the key's (None: no bias).
    norm: the pre-norm of the queries ("layernorm", "rmsnorm" or None); the text is used as given.
    use_bias: biases of the four dense layers.
    dtype, param_dtype: compute and parameter dtypes.
    kernel_init: initializer of the dense kernels.
    implementation: the mechanism's `implementation=` (None: best available).
  """
  qk_dim: int = 128
  activation: str = "softmax"
  max_relative_distance: Optional[int] = None
  norm: Optional[str] = "layernorm"
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.linear.default_kernel_init
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, *, kv_lengths=None,
               segment_ids=None, q_offset=0) -> jax.Array:
    """`x [B, T, D]` (speech), `context [B, S, D_m]` (text) → `[B, T, D]`. `kv_lengths [B]` marks
    the text's padding, `segment_ids` a pair (`[B, T]`, `[B, S]`) for packed pairs, `q_offset` the
    position of the first query (for the relative bias while decoding)."""
    if jnp.ndim(x) != 3 or jnp.ndim(context) != 3 or context.shape[0] != x.shape[0]:
      raise ValueError(f"GatedCrossAttentionUnit: `x` must have shape [B, T, D] and `context` "
                       f"[B, S, D_m] with the same B, got {jnp.shape(x)} and {jnp.shape(context)}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"GatedCrossAttentionUnit: `activation` must be one of {ACTIVATIONS}, "
                       f"got {self.activation!r}")
    D, s = x.shape[-1], self.qk_dim
    dense = functools.partial(nn.Dense, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    h = _norm(self.norm, self.dtype, self.param_dtype, "GatedCrossAttentionUnit")(x)
    u, r, q = jnp.split(dense(2 * D + s, name="query")(h), [D, 2 * D], axis=-1)
    u, r = nn.sigmoid(u), nn.silu(r)
    k = dense(s, name="key")(context)
    v = nn.silu(dense(D, name="value")(context))
    bias = _relative_bias(self, self.max_relative_distance, self.param_dtype)
    o = gated_attention_unit(q[:, :, None], k[:, :, None], v[:, :, None], causal=False,
                             segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
                             relative_bias=bias, activation=self.activation,
                             implementation=self.implementation)
    hidden = nn.silu(dense(D, name="out")(o[:, :, 0].astype(r.dtype) * r))
    return (x + u * (hidden - x)).astype(x.dtype)


def _overrun_message(owner, index, T, s_max) -> str:
  return (f"{owner}: decoding {int(T)} token(s) at cache index {int(index)} overruns the KV cache "
          f"of length {int(s_max)}; initialise the cache on a sequence as long as the prompt plus "
          "every token to generate")


def _check_cache_room(owner: str, index, T: int, s_max: int):
  """Raises when `index + T > s_max`: a `ValueError` now when `index` is concrete, else a runtime
  error from the compiled program (a host callback that runs only on overrun)."""
  try:
    concrete = int(index)
  except (jax.errors.ConcretizationTypeError, TypeError):
    def fail(i):
      raise ValueError(_overrun_message(owner, i, T, s_max))
    jax.lax.cond(index + T > s_max, lambda: jax.debug.callback(fail, index), lambda: None)
  else:
    if concrete + T > s_max:
      raise ValueError(_overrun_message(owner, concrete, T, s_max))
