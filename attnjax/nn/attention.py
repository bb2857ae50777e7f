"""Multi-head attention layer that runs any registered mechanism (Flax Linen).

    q = x W_q,  k = m W_k,  v = m W_v       (then optionally RoPE on q, k; m = x for self-attention)
    o = mechanism(q, k, v, causal, segment_ids, kv_lengths, ...)           [B, T, N, H]
    y = o W_o                                                              [B, T, features]

`W_q: [D, N, H]`, `W_k, W_v: [D, K, H]` (K key/value heads, GQA when K < N), `W_o: [N, H, F]`. The
parameters are named and shaped as in `flax.linen.MultiHeadDotProductAttention` ('query', 'key',
'value', 'out', each a `DenseGeneral` with 'kernel' and 'bias'), so its parameters load directly;
with `mechanism="softmax"` the two layers compute the same function.

The layer only projects, applies positions and calls the operator: the mechanism is looked up in the
registry (`attnjax.list_mechanisms()`), its pattern (causal or not, self or cross) is checked, its
learned arrays (`Mechanism.params`) are created here and passed as keywords. A mechanism registered
later works in this layer without any change to it.

Autoregressive decoding keeps a KV cache in the 'cache' collection (same variables as Flax's
`decode=True`: `cached_key [B, S_max, K, H]`, `cached_value` (not for a mechanism that does not
read v), `cache_index`): `init` with a
full-length input sizes the cache; each `apply(..., decode=True, mutable=['cache'])` with `T` new
tokens writes their keys and values at `cache_index` and attends over the whole cache with
`q_offset = cache_index`, `kv_lengths = cache_index + T` (causal masking by absolute position).
A causal layer whose mechanism is `recurrent` (linear attention and its kin) keeps its fixed-size
state instead (`cache/state`, `cache/cache_index`): each decode call advances the state over the new
tokens, so a token costs O(1) in the length and the cache does not grow. A KV cache is never
overrun silently: a decode call whose tokens do not fit raises (a `ValueError` when the cache index
is known at trace time, a runtime error from the compiled step otherwise).

What a mechanism declares shapes the layer: projections exist only for the inputs it reads
(`Mechanism.reads`; an unread input is passed as zeros of its shape); a per-token array it takes
(`Mechanism.token_inputs`) is projected from the layer input ('<name>_proj', then the declared
activation) or, when the caller supplies it (token types, masks), taken from `apply(..., name=x)`,
and the side-"kv" ones are cached beside the keys when decoding; its learned arrays are 'params',
except those its paper keeps fixed (`ParamSpec.trainable=False`, e.g. FAVOR+'s random features), which
live in the 'buffers' collection where no optimizer moves them (redraw them with
`model.init(rng, x)['buffers']`); a mechanism that samples (`Mechanism.rng`) gets a key from the
'sample' rng stream when `apply` is given one (`rngs={'sample': key}`) and runs its deterministic form
otherwise.

Positions: `rope_base` turns on RoPE on q and k (`rope_fraction` of each head); `rope_scaling` (a
Hugging Face `rope_scaling` dict: "linear", "ntk", "dynamic", "yarn") extends its context
(attnjax/ops/positional/rope_scaling.py); `fope` ({"train_length": L, "sigma": σ, "separate_heads":
True}) makes it FoPE (attnjax/ops/positional/fope.py), whose fixed random Fourier coefficients live in
'buffers' ('fope_cos_coef', 'fope_sin_coef', `[K or 1, D, D]`).

Papers: Vaswani et al., "Attention Is All You Need", arXiv:1706.03762 (multi-head attention);
Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints", arXiv:2305.13245; Su et al., "RoFormer: Enhanced Transformer with Rotary Position
Embedding", arXiv:2104.09864.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.nn import cache_steps
from attnjax.nn import layer_parts
from attnjax.nn import maps
# Also importable from here, where they were first defined.
from attnjax.nn.maps import CAPTURE, WeightsEdit, edit_weights  # noqa: F401
from attnjax.parallel import context as context_parallel
from attnjax.parallel import recurrence as context_recurrence
from attnjax.ops.positional import rope

Initializer = Callable[..., Any]
# TidalDecode's key positions `(indices, valid)`, each `[B, N, T, k]`.
Selection = tuple[jax.Array, jax.Array]


class MultiHeadAttention(nn.Module):
  """Multi-head attention over any registered mechanism, with GQA, RoPE and a decode cache.

  Attributes:
    num_heads: N, the number of query heads.
    mechanism: a registry name ("softmax", "alibi", ...) or a `Mechanism` record.
    mechanism_kwargs: keyword arguments for the mechanism (e.g. `{"window": 128}`), over its
      defaults.
    num_kv_heads: K, key/value heads; must divide N (None: K = N). Mechanisms without GQA support
      get the K/V heads repeated to N.
    qkv_features: N · H, the total query width (None: the input's features). Ignored when `head_dim`
      is set.
    head_dim: H, per-head width of q, k and v (None: `qkv_features // num_heads`).
    out_features: F, output width (None: the query input's features).
    causal: mask keys after each query's (absolute) position.
    use_bias: biases on the four projections.
    dtype: computation dtype of the projections (None: inferred from inputs and params).
    param_dtype: dtype of the parameters.
    precision: `jax.lax.Precision` of the projections.
    kernel_init, bias_init: initializers of the q/k/v projections; `out_kernel_init` and
      `out_bias_init` those of the output projection (None: the same as q/k/v).
    normalize_qk: LayerNorm (no bias) on q and k per head before attention, as Flax's layer
      (Dehghani et al., "Scaling Vision Transformers to 22 Billion Parameters", arXiv:2302.05442).
    rope_base: if set, apply rotary position embedding to q and k with this base (10000 is usual).
    rope_fraction: share of each head's dims that rotates (partial rotary).
    rope_scaling: None, or a Hugging Face `rope_scaling` dict extending RoPE's context: {"rope_type":
      "linear" | "ntk" | "dynamic" | "yarn", "factor": s, "original_max_position_embeddings": L, ...}
      (needs `rope_base`).
    fope: None, or FoPE settings {"train_length": L, "sigma": σ (0.3), "separate_heads": True}
      (needs `rope_base`; not combined with `rope_scaling`).
    scale: logit scale passed to the mechanism (None: its default, `H ** -0.5`).
    implementation: the mechanism's `implementation=` (None: the best available).
  """
  num_heads: int
  mechanism: Union[str, registry.Mechanism] = "softmax"
  mechanism_kwargs: Optional[Mapping[str, Any]] = None
  num_kv_heads: Optional[int] = None
  qkv_features: Optional[int] = None
  head_dim: Optional[int] = None
  out_features: Optional[int] = None
  causal: bool = False
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.linear.default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()
  out_kernel_init: Optional[Initializer] = None
  out_bias_init: Optional[Initializer] = None
  normalize_qk: bool = False
  rope_base: Optional[float] = None
  rope_fraction: float = 1.0
  rope_scaling: Optional[Mapping[str, Any]] = None
  fope: Optional[Mapping[str, Any]] = None
  scale: Optional[float] = None
  implementation: Optional[str] = None

  def _mechanism(self) -> registry.Mechanism:
    if isinstance(self.mechanism, registry.Mechanism):
      return self.mechanism
    return registry.get(self.mechanism)

  def _dims(self, features: int) -> tuple[int, int, int]:
    """(N, K, H) after validation."""
    N = self.num_heads
    K = N if self.num_kv_heads is None else self.num_kv_heads
    if N <= 0 or K <= 0 or N % K:
      raise ValueError(f"MultiHeadAttention: `num_kv_heads` ({K}) must divide `num_heads` ({N}) "
                       "and both must be > 0")
    if self.head_dim is not None:
      H = self.head_dim
    else:
      qkv = self.qkv_features or features
      if qkv % N:
        raise ValueError(f"MultiHeadAttention: `qkv_features` ({qkv}) must be divisible by "
                         f"`num_heads` ({N}); or set `head_dim`")
      H = qkv // N
    if H <= 0:
      raise ValueError(f"MultiHeadAttention: head dim must be > 0, got {H}")
    return N, K, H

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: Optional[jax.Array] = None, *,
               segment_ids=None, kv_lengths=None, positions=None, kv_positions=None,
               decode: bool = False, selection: Optional[Selection] = None,
               select_top_k: Optional[int] = None, num_new=None, return_weights: bool = False,
               shared_weights: Optional[jax.Array] = None, **mechanism_args):
    """Projects, applies RoPE, runs the mechanism and projects back.

    Args:
      inputs_q: `[B, T, D]` queries (and keys/values for self-attention).
      inputs_kv: `[B, S, D_kv]` keys/values for cross-attention; None for self-attention.
      segment_ids: packed sequences: `[B, T]` (self) or a pair (`[B, T]`, `[B, S]`) (cross); tokens
        attend within equal ids, and RoPE positions restart at each segment.
      kv_lengths: `[B]` valid key lengths (padding); keys at or past the length are hidden.
      positions: `[B, T]` or `[T]` RoPE positions of the queries (and keys, for self-attention);
        default: segment-local positions with `segment_ids`, else `0 … T-1`.
      kv_positions: RoPE positions of the keys in cross-attention, `[B, S]` or `[S]` (same default).
      decode: autoregressive decoding with the 'cache' collection (self-attention only). The first
        call (at `init`, no cache yet) creates a cache as long as the input and returns the full
        forward; later calls append `T` tokens and attend over everything cached so far (a
        causal `recurrent` mechanism advances its fixed-size state instead). Positions come from the
        cache index. Apply with `mutable=['cache']`. A paged cache ('paged_kv', a
        `PagedKVCache` put in the 'cache' collection in place of the contiguous one, e.g. by
        `attnjax.models.paged_generate.to_paged`) or a StreamingLLM cache ('sink_kv', a
        `SinkWindowCache`: `attnjax.models.streaming.to_sink_window`) keeps a length per row: the
        call's tokens go at each row's own length (RoPE positions per row), softmax layers only.
      num_new: `[B]` int, with a paged or StreamingLLM cache: how many of the call's T tokens each
        row appends (ragged prefill; 0 leaves a row untouched); default all T.
      return_weights: Shared Attention's anchor layer (softmax only): the call also returns this
        layer's attention weights `[B, N, T, S]` (over the cache when decoding).
      shared_weights: Shared Attention's other layers of a span: `[B, N, T, S]` weights from the
        anchor; the layer computes only values (no query / key projections, no key cache) and
        returns `weights · V` projected out (Liao et al., "Beyond KV Caching: Shared Attention for
        Efficient LLMs", arXiv:2407.12866).
      selection: TidalDecode's sparse layer: `(indices, valid)` `[B, N, 1, k]` key positions of the
        cache chosen by an earlier layer; on a single-token decode step the layer attends over
        them only (`tidal_sparse_attention`) instead of running the mechanism. Softmax layers only.
      select_top_k: TidalDecode's selection layer: the call returns `(y, selection)`, the `top_k`
        cache positions of the highest scores of each query head on a single-token decode step
        (`tidal_select`), None on any other call. Softmax layers only.
      **mechanism_args: per-call keyword arguments for the mechanism, over `mechanism_kwargs`.

    Returns:
      `[B, T, F]`, or `([B, T, F], selection)` when `select_top_k` is given, or `([B, T, F],
      weights)` with `return_weights`.
    """
    mech = self._mechanism()
    shared = shared_weights is not None
    if (return_weights or shared) and (mech.name != "softmax" or inputs_kv is not None
                                       or select_top_k is not None or num_new is not None):
      raise ValueError(f"MultiHeadAttention: `return_weights` / `shared_weights` (Shared "
                       f"Attention) are for softmax self-attention without TidalDecode or a paged "
                       f"cache; the layer's mechanism is {mech.name!r}")
    if (selection is not None or select_top_k is not None) and mech.name != "softmax":
      raise ValueError(f"MultiHeadAttention: TidalDecode's `selection` / `select_top_k` replace "
                       f"softmax attention; the layer's mechanism is {mech.name!r}")
    if jnp.ndim(inputs_q) != 3:
      raise ValueError(f"MultiHeadAttention: `inputs_q` must have shape [B, T, D], "
                       f"got shape {jnp.shape(inputs_q)}")
    cross = inputs_kv is not None
    if cross:
      if jnp.ndim(inputs_kv) != 3 or inputs_kv.shape[0] != inputs_q.shape[0]:
        raise ValueError(f"MultiHeadAttention: `inputs_kv` must have shape [B={inputs_q.shape[0]}, "
                         f"S, D_kv], got shape {jnp.shape(inputs_kv)}")
      if decode:
        raise ValueError("MultiHeadAttention: `decode=True` is for self-attention (a KV cache of "
                         "the layer's own tokens); got `inputs_kv` (cross-attention)")
    elif kv_positions is not None:
      raise ValueError("MultiHeadAttention: `kv_positions` is for cross-attention; in "
                       "self-attention the keys take `positions`")
    if decode and not mech.decode:
      raise ValueError(f"MultiHeadAttention: mechanism {mech.name!r} does not support decoding "
                       "over a KV cache (its `decode` flag is False)")
    mech.check_pattern(causal=self.causal, cross=cross)

    features = inputs_q.shape[-1]
    out_features = self.out_features or features
    N, K, H = self._dims(features)
    B, T = inputs_q.shape[:2]

    dense = functools.partial(nn.DenseGeneral, axis=-1, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                              bias_init=self.bias_init, use_bias=self.use_bias,
                              precision=self.precision)
    kv_in = inputs_kv if cross else inputs_q
    ln = functools.partial(nn.LayerNorm, use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype)

    # A layer reusing an anchor's weights reads values only.
    reads = frozenset({"v"}) if shared else mech.reads

    def project(name, x, heads, normalize):
      # An input the mechanism does not read gets no projection (no dead weights): zeros of its
      # shape stand in, for the shapes the operator checks.
      if name not in reads:
        dtype = self.dtype or jnp.result_type(x, self.param_dtype)
        return jnp.zeros(x.shape[:2] + (heads, H), dtype)
      y = dense(features=(heads, H), name={"q": "query", "k": "key", "v": "value"}[name])(x)
      return ln(name=f"{'query' if name == 'q' else 'key'}_ln")(y) if normalize else y

    rotate = layer_parts.rotary(self, K, H)
    query = project("q", inputs_q, N, self.normalize_qk)
    key = project("k", kv_in, K, self.normalize_qk)
    value = project("v", kv_in, K, False)

    # The mechanism's learned arrays (e.g. gates, temperatures), passed to it as keywords; those its
    # paper keeps fixed (random features) live in 'buffers', out of the optimizer's reach.
    settings = {**mech.defaults, **dict(self.mechanism_kwargs or {})}
    extra = {spec.name: self._mechanism_array(spec, spec.shape_for(N, K, H, settings))
             for spec in mech.params}
    # Per-token arrays: projected from this layer's input, or given by the caller per call.
    tokens = {spec.name: layer_parts.token_input(
        mech.name, spec, (N, K, H), inputs_q if spec.side == "q" else kv_in, mechanism_args, dense)
              for spec in mech.token_inputs}
    mechanism_args = {key: x for key, x in mechanism_args.items() if key not in tokens}
    kwargs = {**dict(self.mechanism_kwargs or {}), **mechanism_args, **extra,
              "scale": self.scale, "implementation": self.implementation}
    if mech.rng is not None and self.has_rng(registry.SAMPLE_RNG):
      kwargs[mech.rng] = self.make_rng(registry.SAMPLE_RNG)

    recurrent = mech.recurrent_for(dict(self.mechanism_kwargs or {})) and self.causal
    row_cache = None      # a cache with a length per row ('paged_kv', 'sink_kv'), when decoding
    for name in ("paged_kv", "sink_kv"):
      if decode and self.has_variable("cache", name):
        row_cache = name
    initialized = row_cache is not None or self.has_variable(
        "cache", "state" if recurrent else "cached_value" if shared else "cached_key")
    seen = None       # (queries, keys, mask keywords) the weights were taken over (return_weights)
    edited = None     # (weights, logits) under `edit_weights`
    chosen = None
    if num_new is not None and row_cache is None:
      raise ValueError("MultiHeadAttention: `num_new` is for decoding over a paged or StreamingLLM "
                       "KV cache ('cache/paged_kv', 'cache/sink_kv')")
    if row_cache is not None:
      if mech.name != "softmax" or selection is not None or select_top_k is not None:
        raise ValueError(f"MultiHeadAttention: a paged or StreamingLLM KV cache serves softmax "
                         f"attention; the layer's mechanism is {mech.name!r}")
      if segment_ids is not None or kv_lengths is not None or positions is not None:
        raise ValueError("MultiHeadAttention: with a paged or StreamingLLM KV cache, "
                         "`segment_ids`, `kv_lengths` and `positions` are not supported: each "
                         "row's length gives them")
      out = cache_steps.row_cache_step(self, row_cache, query, key, value, num_new, rotate)
    elif shared:
      out = cache_steps.shared_weights_step(self, shared_weights, value, decode, initialized)
    elif decode and initialized:
      if segment_ids is not None or kv_lengths is not None or positions is not None:
        raise ValueError("MultiHeadAttention: with decode=True over a cache, `segment_ids`, "
                         "`kv_lengths` and `positions` are not supported: the cache index gives "
                         "the positions and the visible length")
      if recurrent:
        out = cache_steps.recurrent_step(self, mech, query, key, value, {**kwargs, **tokens}, rotate)
      else:
        out, chosen, seen = cache_steps.decode_step(self, mech, query, key, value, kwargs, tokens,
                                                    rotate, selection, select_top_k)
    else:
      if decode and recurrent:
        # First call (init): the state before any token, zeros shaped as this input's final state.
        shapes = jax.eval_shape(
            lambda q, k, v: cache_steps.attend(
                mech, q, k, v, causal=True, cross=False, segment_ids=None, kv_lengths=None,
                kwargs={**kwargs, **tokens, "return_final_state": True})[1],
            query, key, value)
        self.variable("cache", "state", lambda: jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), shapes))
        self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      elif decode:
        # First call (init): size the cache on this full-length input, then run the full forward.
        layer_parts.init_kv_cache(self, key, value if "v" in mech.reads else None)
        for spec in mech.token_inputs:
          if spec.side == "kv":
            x = tokens[spec.name]
            self.variable("cache", f"cached_{spec.name}", jnp.zeros, x.shape, x.dtype)
      if rotate is not None:
        if isinstance(segment_ids, (tuple, list)):
          q_seg, kv_seg = segment_ids
        else:
          q_seg = kv_seg = segment_ids
        q_pos = self._default_positions(positions, q_seg, T)
        kv_pos = q_pos if not cross else self._default_positions(kv_positions, kv_seg,
                                                                 key.shape[1])
        # The current length of each sequence (dynamic NTK's `seq_len`), one for q and k alike.
        seq_len = jnp.maximum(layer_parts.row_end(q_pos), layer_parts.row_end(kv_pos))
        query = rotate(query, q_pos, seq_len)
        key = rotate(key, kv_pos, seq_len)
      seen = (query, key, dict(causal=self.causal, segment_ids=segment_ids, kv_lengths=kv_lengths))
      if maps.active_edit() is not None and not decode:
        out, edited = maps.edited_step(self, mech, query, key, value, seen[2])
      else:
        # Under a mesh with a `context` axis > 1 (the trainer's `mesh.context`), a mechanism with a
        # context-parallel form runs sharded along T: flex mechanisms through their `flex_mods`
        # (ring attention, attnjax.parallel.context), feature-mapped linear attention through the
        # recurrence's scope (states handed across devices, attnjax.parallel.recurrence).
        out = None
        if not cross and kv_lengths is None and not tokens:
          out = context_parallel.layer_attention(mech, query, key, value, causal=self.causal,
                                                 segment_ids=segment_ids, kwargs=kwargs)
        if out is None:
          with context_recurrence.layer_scope():
            out = cache_steps.attend(mech, query, key, value, causal=self.causal, cross=cross,
                               segment_ids=segment_ids, kv_lengths=kv_lengths,
                               kwargs={**kwargs, **tokens})

    y = nn.DenseGeneral(features=out_features, axis=(-2, -1),
                        kernel_init=self.out_kernel_init or self.kernel_init,
                        bias_init=self.out_bias_init or self.bias_init, use_bias=self.use_bias,
                        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                        name="out")(out)
    # Not at init, where every collection is mutable: the maps would join the variables.
    capture = (seen is not None and self.is_mutable_collection(maps.CAPTURE)
               and not self.is_initializing())
    if return_weights or capture:
      q_seen, k_seen, mask_kw = seen
      weights, logits = edited or maps.attention_weights(q_seen, k_seen, mask_kw, self.scale)
      if capture:
        self.sow(maps.CAPTURE, "weights", weights)
        self.sow(maps.CAPTURE, "logits", logits)
      if return_weights:
        return y, weights
    return y if select_top_k is None else (y, chosen)

  def _mechanism_array(self, spec: registry.ParamSpec, shape: tuple[int, ...]) -> jax.Array:
    if spec.trainable:
      return self.param(spec.name, spec.init, shape, self.param_dtype)
    # Drawn once from the 'params' stream at init, like a parameter, but never trained.
    return self.variable(registry.BUFFERS, spec.name,
                         lambda: spec.init(self.make_rng("params"), shape, self.param_dtype)).value

  def _default_positions(self, positions, segment_ids, length):
    if positions is not None:
      return positions
    if segment_ids is not None:
      return rope.segment_positions(segment_ids)
    return jnp.arange(length, dtype=jnp.int32)

