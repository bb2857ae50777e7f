"""Pre-norm transformer blocks whose attention mechanism is chosen by name, layer by layer.

    h = x + Dropout(Attention_l(Norm(x)))          Attention_l: `MultiHeadAttention` running the
    y = h + Dropout(MLP(Norm(h)))                   registry mechanism named for layer l

    MLP "gelu":   W_o · gelu(W_i x)                                       (Vaswani et al.; GPT-2)
    MLP "swiglu": W_o · (silu(W_g x) ⊙ W_i x)                             (Shazeer, arXiv:2002.05202)
    Norm "rmsnorm": x / sqrt(mean(x²) + ε) · g   (Zhang & Sennrich, arXiv:1910.07467); "layernorm".

Shapes: `x [B, T, D]` (D = width) → `[B, T, D]`. Every parameter carries logical axis names
(`flax.linen.with_logical_partitioning`): "embed" (D), "mlp" (the MLP hidden width), "heads" (N or K),
"kv" (the head dim H), "norm" (norm scales); activations are constrained to ("batch", "length",
"embed") / ("batch", "length", "mlp"). Outside a mesh both are no-ops, so the same module runs on one
CPU and on a sharded mesh; the mesh mapping is `attnjax.parallel.DEFAULT_LOGICAL_AXIS_RULES`.

Mixed precision: `dtype` is the compute dtype (activations, matmuls); parameters stay in
`param_dtype`; norms reduce in float32 (flax's `force_float32_reductions`).

Papers: Vaswani et al., "Attention Is All You Need", arXiv:1706.03762; Xiong et al., "On Layer
Normalization in the Transformer Architecture", arXiv:2002.04745 (pre-norm); Shazeer, "GLU Variants
Improve Transformer", arXiv:2002.05202; Zhang & Sennrich, "Root Mean Square Layer Normalization",
arXiv:1910.07467.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.nn.attention import MultiHeadAttention
from attnjax.ops.sparse import tidal_decode

MLP_KINDS = ("gelu", "swiglu")
NORM_KINDS = ("rmsnorm", "layernorm")

_kernel_init = nn.initializers.lecun_normal()
_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()


def logical(init, *names):
  """`init` whose parameter carries the logical axis `names` (metadata only; no-op off a mesh)."""
  return nn.with_logical_partitioning(init, names)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of a stack of `TransformerBlock`s (hashable, so modules can hold it).

  Attributes:
    width: D, the residual width.
    num_heads: N query heads (must divide D).
    mechanisms: one registry name (or `registry.Mechanism` record) per layer; the depth is its
      length.
    mechanism_kwargs: per layer, the mechanism's keyword arguments (a mapping), same length.
    num_kv_heads: K key/value heads (None: N); GQA when K < N.
    mlp_dim: the MLP hidden width.
    mlp: "gelu" or "swiglu".
    norm: "rmsnorm" or "layernorm".
    causal: causal self-attention (decoders) or bidirectional (encoders).
    rope_base: rotary position embedding base for q and k (None: no RoPE).
    rope_scaling: RoPE context extension, a Hugging Face `rope_scaling` dict (None: none).
    fope: FoPE settings (None: plain RoPE); see `MultiHeadAttention`.
    layer_rope: per layer, whether it applies RoPE (None: every layer does when `rope_base` is set);
      a layer without is NoPE (e.g. RNoPE's full-attention layers).
    tidal_decode: TidalDecode on single-token decode steps (None: off): {"top_k": k,
      "selection_layer": 2, "reselection_layer": None} (`attnjax.ops.sparse.tidal_decode`); the
      layers from `selection_layer` on must be softmax.
    shared_attention: Shared Attention spans (None: off): `((start, end), ...)`, layers start …
      end-1 (softmax, at least two) reuse the attention weights of layer `start`, the span's anchor;
      the others compute values only (no query / key projections, no key cache). Liao et al.,
      "Beyond KV Caching: Shared Attention for Efficient LLMs", arXiv:2407.12866.
    use_bias: biases on the attention and MLP projections (norms keep theirs).
    dropout: residual dropout rate (active only with `train=True`).
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  width: int
  num_heads: int
  mechanisms: tuple[Any, ...]
  mechanism_kwargs: tuple[Mapping[str, Any], ...]
  num_kv_heads: Optional[int] = None
  mlp_dim: int = 0
  mlp: str = "gelu"
  norm: str = "rmsnorm"
  causal: bool = True
  rope_base: Optional[float] = None
  rope_scaling: Optional[Mapping[str, Any]] = None
  fope: Optional[Mapping[str, Any]] = None
  layer_rope: Optional[tuple[bool, ...]] = None
  tidal_decode: Optional[Mapping[str, Any]] = None
  shared_attention: Optional[tuple[tuple[int, int], ...]] = None
  use_bias: bool = True
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if len(self.mechanisms) != len(self.mechanism_kwargs):
      raise ValueError(f"TransformerConfig: {len(self.mechanisms)} mechanisms but "
                       f"{len(self.mechanism_kwargs)} mechanism_kwargs (one per layer)")
    if self.mlp not in MLP_KINDS:
      raise ValueError(f"TransformerConfig: `mlp` must be one of {MLP_KINDS}, got {self.mlp!r}")
    if self.norm not in NORM_KINDS:
      raise ValueError(f"TransformerConfig: `norm` must be one of {NORM_KINDS}, got {self.norm!r}")
    if self.layer_rope is not None and len(self.layer_rope) != len(self.mechanisms):
      raise ValueError(f"TransformerConfig: {len(self.mechanisms)} mechanisms but "
                       f"{len(self.layer_rope)} layer_rope entries (one per layer)")
    if self.tidal_decode is not None:
      try:
        settings = tidal_decode.decode_settings(self.tidal_decode, len(self.mechanisms))
      except ValueError as e:
        raise ValueError(f"TransformerConfig: {e}") from None
      names = [getattr(m, "name", m) for m in self.mechanisms[settings["selection_layer"]:]]
      if any(name != "softmax" for name in names) or not self.causal:
        raise ValueError(f"TransformerConfig: tidal_decode needs causal softmax layers from layer "
                         f"{settings['selection_layer']} on, got {names}")
    if self.shared_attention is not None:
      self._check_shared_attention()

  def _check_shared_attention(self):
    if self.tidal_decode is not None:
      raise ValueError("TransformerConfig: shared_attention and tidal_decode are not combined")
    taken = set()
    for span in self.shared_attention:
      if len(span) != 2 or not 0 <= span[0] < span[0] + 1 < span[1] <= self.depth:
        raise ValueError(f"TransformerConfig: shared_attention spans must be (start, end) with "
                         f"0 <= start < end - 1 < depth = {self.depth}, got {span!r}")
      layers = set(range(*span))
      names = [getattr(self.mechanisms[i], "name", self.mechanisms[i]) for i in sorted(layers)]
      if layers & taken or any(name != "softmax" for name in names):
        raise ValueError(f"TransformerConfig: shared_attention spans must not overlap and must be "
                         f"softmax layers; span {span!r} has {names}")
      taken |= layers

  def shared_attention_roles(self) -> Optional[tuple[Optional[str], ...]]:
    """Each layer's Shared Attention role ("anchor", "shared" or None), None when it is off."""
    if self.shared_attention is None:
      return None
    roles = [None] * self.depth
    for start, end in self.shared_attention:
      roles[start] = "anchor"
      roles[start + 1:end] = ["shared"] * (end - start - 1)
    return tuple(roles)

  def decode_roles(self) -> Optional[tuple[str, ...]]:
    """TidalDecode's role of each layer ("full", "select", "sparse"), None when it is off."""
    if self.tidal_decode is None:
      return None
    settings = tidal_decode.decode_settings(self.tidal_decode, self.depth)
    return tidal_decode.tidal_layer_roles(self.depth, selection_layer=settings["selection_layer"],
                                          reselection_layer=settings["reselection_layer"])

  @property
  def depth(self) -> int:
    return len(self.mechanisms)

  def __hash__(self):
    # Mappings are unhashable; the per-layer kwargs hash by their sorted items.
    kwargs = tuple(tuple(sorted((k, _hashable(v)) for k, v in m.items()))
                   for m in self.mechanism_kwargs)
    fields = [_hashable(getattr(self, f.name)) for f in dataclasses.fields(self)
              if f.name != "mechanism_kwargs"]
    return hash((tuple(fields), kwargs))


def _hashable(value):
  if isinstance(value, Mapping):
    return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  try:
    hash(value)
  except TypeError:
    return id(value)
  return value


def make_norm(kind: str, *, dtype, param_dtype, name: Optional[str] = None) -> nn.Module:
  """RMSNorm or LayerNorm over the last axis, scale (and LayerNorm bias) named ("norm",)."""
  if kind == "rmsnorm":
    return nn.RMSNorm(dtype=dtype, param_dtype=param_dtype, scale_init=logical(_ones, "norm"),
                      name=name)
  if kind == "layernorm":
    return nn.LayerNorm(dtype=dtype, param_dtype=param_dtype, scale_init=logical(_ones, "norm"),
                        bias_init=logical(_zeros, "norm"), name=name)
  raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")


class MLP(nn.Module):
  """Position-wise feed-forward: gelu `W_o gelu(W_i x)` or SwiGLU `W_o (silu(W_g x) ⊙ W_i x)`.

  `x [B, T, D] → [B, T, D]`; kernels `[D, M]` named ("embed", "mlp") and `[M, D]` named
  ("mlp", "embed").
  """
  mlp_dim: int
  kind: str = "gelu"
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind not in MLP_KINDS:
      raise ValueError(f"MLP: `kind` must be one of {MLP_KINDS}, got {self.kind!r}")
    width = x.shape[-1]

    def dense(features, names, name):
      return nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, kernel_init=logical(_kernel_init, *names),
                      bias_init=logical(_zeros, names[-1]), name=name)

    hidden = dense(self.mlp_dim, ("embed", "mlp"), "wi")(x)
    if self.kind == "swiglu":
      gate = dense(self.mlp_dim, ("embed", "mlp"), "wg")(x)
      hidden = nn.silu(gate) * hidden
    else:
      hidden = nn.gelu(hidden)
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    return dense(width, ("mlp", "embed"), "wo")(hidden)


class TransformerBlock(nn.Module):
  """Pre-norm block: `h = x + Attn(Norm(x))`, `y = h + MLP(Norm(h))`, attention by registry name.

  Attributes:
    config: the stack's `TransformerConfig`.
    layer: this block's index in the stack (selects `config.mechanisms[layer]` and its kwargs).
  """
  config: TransformerConfig
  layer: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, decode: bool = False,
               segment_ids: Optional[jax.Array] = None, selection=None, num_new=None,
               weights=None):
    """`x [B, T, D] → [B, T, D]`; `segment_ids [B, T]` keeps tokens to their own segment; `num_new
    [B]`: tokens each row appends to a paged KV cache (`MultiHeadAttention`).

    With `config.tidal_decode`, returns `(y, selection)`: this layer's TidalDecode role reads the
    carried `selection` ("sparse") or replaces it ("select", on single-token decode steps). With
    `config.shared_attention`, returns `(y, weights)`: an anchor layer's attention weights replace
    the carried `weights`, which a "shared" layer reuses."""
    cfg = self.config
    # A NoPE layer of a hybrid (layer_rope False) gets no positional transform at all.
    rope_on = cfg.rope_base is not None and (cfg.layer_rope is None or cfg.layer_rope[self.layer])
    attention = MultiHeadAttention(
        num_heads=cfg.num_heads, mechanism=cfg.mechanisms[self.layer],
        mechanism_kwargs=dict(cfg.mechanism_kwargs[self.layer]), num_kv_heads=cfg.num_kv_heads,
        causal=cfg.causal, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        rope_base=cfg.rope_base if rope_on else None,
        rope_scaling=cfg.rope_scaling if rope_on else None, fope=cfg.fope if rope_on else None,
        kernel_init=logical(_kernel_init, "embed", "heads", "kv"),
        bias_init=logical(_zeros, "heads", "kv"),
        out_kernel_init=logical(_kernel_init, "heads", "kv", "embed"),
        out_bias_init=logical(_zeros, "embed"), name="attention")

    def norm(name):
      return make_norm(cfg.norm, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)

    def drop(y):
      return nn.Dropout(cfg.dropout)(y, deterministic=not train) if cfg.dropout else y

    roles = cfg.decode_roles()
    role = None if roles is None else roles[self.layer]
    share_roles = cfg.shared_attention_roles()
    share_role = None if share_roles is None else share_roles[self.layer]
    tidal = {}
    if share_role == "anchor":
      tidal = {"return_weights": True}
    elif share_role == "shared":
      tidal = {"shared_weights": weights}
    if role == "select":
      tidal = {"select_top_k": cfg.tidal_decode["top_k"]}
    elif role == "sparse":
      tidal = {"selection": selection}
    a = attention(norm("attention_norm")(x), decode=decode, segment_ids=segment_ids,
                  num_new=num_new, **tidal)
    if role == "select":
      a, chosen = a
      selection = selection if chosen is None else chosen
    if share_role == "anchor":
      a, weights = a
    h = x + drop(a)
    h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
    mlp = MLP(cfg.mlp_dim, kind=cfg.mlp, use_bias=cfg.use_bias, dtype=cfg.dtype,
              param_dtype=cfg.param_dtype, name="mlp")
    y = h + drop(mlp(norm("mlp_norm")(h)))
    y = nn.with_logical_constraint(y, ("batch", "length", "embed"))
    if share_roles is not None:
      return y, weights
    return y if roles is None else (y, selection)


class Transformer(nn.Module):
  """`config.depth` `TransformerBlock`s ("layer_0", ...) followed by a final norm: `[B,T,D] → [B,T,D]`.

  Layers are a Python loop rather than `nn.scan` because hybrid schedules give layers different
  mechanisms (and so different parameters).
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, decode: bool = False,
               segment_ids: Optional[jax.Array] = None, num_new=None) -> jax.Array:
    tidal = self.config.tidal_decode is not None
    sharing = self.config.shared_attention is not None
    selection = weights = None
    for i in range(self.config.depth):
      x = TransformerBlock(self.config, i, name=f"layer_{i}")(
          x, train=train, decode=decode, segment_ids=segment_ids, num_new=num_new,
          **({"selection": selection} if tidal else {}), **({"weights": weights} if sharing else {}))
      if tidal:
        x, selection = x
      elif sharing:
        x, weights = x
    if selection is not None:
      # The positions the sparse layers read on this step (for analysis and tests).
      self.sow("intermediates", "tidal_selection", selection)
    return make_norm(self.config.norm, dtype=self.config.dtype,
                     param_dtype=self.config.param_dtype, name="final_norm")(x)
