"""The model config schema: `ModelConfig`, one field per model setting, and its one validator.

`ModelConfig.from_config(config)` reads an ml_collections (or plain) mapping, checks every field
that needs no task and returns the checked config with its defaults resolved; a bad value raises
a `ValueError` naming the field (`model.<field>`), the same message wherever the mistake is found
(`attnjax.models.build_model` and `attnjax.train.validate` both go through it). The checks that
need the task (its kind, vocabulary, image size) stay in `build_model`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax
import ml_collections
import numpy as np

from attnjax import catalog
from attnjax.models import arch_fields
from attnjax.models import layer_schedule
from attnjax.models.arch_fields import choice, positive_int
from attnjax.models.layer_schedule import layer_mechanisms, layer_rope
from attnjax.nn.blocks import MLP_KINDS, NORM_KINDS, TransformerConfig
from attnjax.ops.positional import fope as fope_lib
from attnjax.ops.positional import rope
from attnjax.ops.positional import rope_scaling as rope_scaling_lib
from attnjax.ops.sparse import tidal_decode as tidal_decode_lib

ARCHS = ("decoder_lm", "encoder_classifier", "vit", "cnn", "pervasive")
DTYPES = arch_fields.DTYPES
POSITION_EMBEDDINGS = ("learned", "none")
POOLINGS = ("mean", "cls")

# RNoPE (Yang et al., "Rope to Nope and Back Again: A New Hybrid Attention Strategy",
# arXiv:2501.18795, catalog row 174) is this model option: `layer_rope="every 4: nope"` with
# `mechanism="sliding_window"` and `layer_mechanisms="every 4: softmax"`.
catalog.register_server("attnjax.models.ModelConfig.layer_rope", (174,), kind="model option")
# TidalDecode (arXiv:2410.05076, row 119) in the decoder: `tidal_decode={"top_k": k, ...}`.
catalog.register_server("attnjax.models.ModelConfig.tidal_decode", (119,), kind="model option")
# Shared Attention (arXiv:2407.12866, row 57): `shared_attention=[[start, end], ...]`.
catalog.register_server("attnjax.models.ModelConfig.shared_attention", (57,), kind="model option")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every field of the `model` config section (a field not listed here is a typo and raises).

  Attributes:
    arch: "decoder_lm" (`DecoderLM`), "encoder_classifier" (`EncoderClassifier`), "vit", "cnn"
      (`ResNetCNN`, attnjax/models/cnn.py: it reads widths, blocks, attention_module,
      attention_kwargs, param_budget, width_multiple, dropout, dtype and param_dtype; the
      transformer fields, width to pooling, are not used and not checked) or "pervasive"
      (`PervasiveSeq2Seq`, attnjax/models/pervasive.py: it reads width (the embedding width),
      depth (the DenseNet's layers), source_len, growth_rate, kernel_size, tie_embeddings, dropout
      and the dtypes; a 2-D convolutional sequence-to-sequence model on "lm" tasks).
    width: D, the residual width.
    depth: the number of blocks.
    num_heads: N query heads (must divide width).
    num_kv_heads: K key/value heads (None: N; must divide N).
    mlp_dim: MLP hidden width (None or 0: 4·width).
    mlp: "gelu" | "swiglu".
    norm: "rmsnorm" | "layernorm".
    mechanism: registry name for every layer.
    mechanism_kwargs: the keyword arguments of `mechanism` (a dict).
    layer_mechanisms: None, a list of one registry name per layer, or a schedule "every K: name"
      (layer i uses `name` when i % K == K - 1, `mechanism` otherwise).
    layer_mechanism_kwargs: {name: kwargs} for layers whose mechanism is not `mechanism`.
    rope_base: None or a number > 1 (RoPE on q, k).
    rope_scaling: None or a Hugging Face `rope_scaling` dict (RoPE context extension: "linear",
      "ntk", "dynamic", "yarn"; attnjax/ops/positional/rope_scaling.py); needs rope_base.
    fope: None or FoPE settings {"train_length": L, "sigma": σ, "separate_heads": bool}
      (attnjax/ops/positional/fope.py); needs rope_base, not with rope_scaling.
    layer_rope: None (every layer has RoPE when rope_base is set), a list of one bool per layer, or a
      schedule "every K: nope" (layer i has no RoPE when i % K == K - 1) / "every K: rope" (only
      those layers have RoPE); needs rope_base. With `mechanism="sliding_window"` and
      `layer_mechanisms="every K: softmax"` it is RNoPE (Yang et al., arXiv:2501.18795): RoPE +
      sliding-window attention, and full-attention NoPE every K-th layer.
    position_embedding: "learned" | "none" (None: "none" for decoder_lm, "learned" otherwise when
      rope_base is None; vit always learns its positions, "none" is an error).
    tie_embeddings: decoder_lm: logits through the input embedding.
    pooling: "mean" | "cls" (classifiers; None: "cls" for vit, "mean" otherwise).
    patch_size: vit: side of a square patch (must divide the image).
    pad_id: encoder_classifier, optional: tokens equal to it are masked out of attention and
      pooling (a token id of the task: checked by `build_model`).
    tidal_decode: decoder_lm: None, or TidalDecode on single-token decode steps {"top_k": k,
      "selection_layer": 2, "reselection_layer": None} (attnjax/ops/sparse/tidal_decode.py): full
      attention before `selection_layer`, top-k positions chosen there (and at `reselection_layer`),
      attention over them only in the other layers; the layers from `selection_layer` on must be
      "softmax".
    shared_attention: None, or Shared Attention spans `[[start, end], ...]`: layers start … end-1
      (softmax) reuse the attention weights of layer `start` and compute values only (no query /
      key projections, no key cache; attnjax.nn.blocks.TransformerConfig).
    use_bias: biases on the projections.
    dropout: residual/embedding dropout rate in [0, 1), active with `apply(..., train=True,
      rngs={"dropout": key})`.
    dtype: compute dtype, "float32" | "bfloat16".
    param_dtype: parameter dtype, "float32" | "bfloat16".
    widths: cnn: channels per stage (None: (16, 32, 64)).
    blocks: cnn: residual basic blocks per stage (None: one per stage; one entry per width).
    attention_module: cnn: None, or the registry name of a feature-map module
      (`attnjax.list_modules("feature_map")`) inserted in every block before the residual add.
    attention_kwargs: cnn: the module's Linen settings (a dict).
    param_budget: cnn: None, or a parameter count: `build_model` then scales `widths` by one
      multiplier (each a multiple of `width_multiple`) to the count closest to it
      (`cnn.budget_widths`), for comparisons at equal budgets.
    width_multiple: cnn with param_budget: the scaled widths are multiples of it.
    source_len: pervasive: S, the source tokens at the start of every input row.
    growth_rate: pervasive: g, channels each DenseNet layer adds (None: the paper's 32).
    kernel_size: pervasive: k, odd, the masked convolutions' size (None: the paper's 3).
  """
  arch: str
  width: int
  depth: int
  num_heads: int
  num_kv_heads: Optional[int] = None
  mlp_dim: Optional[int] = None
  mlp: str = "gelu"
  norm: str = "rmsnorm"
  mechanism: str = "softmax"
  mechanism_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  layer_mechanisms: Any = None
  layer_mechanism_kwargs: Mapping[str, Mapping[str, Any]] = dataclasses.field(
      default_factory=dict)
  rope_base: Optional[float] = None
  rope_scaling: Optional[Mapping[str, Any]] = None
  fope: Optional[Mapping[str, Any]] = None
  layer_rope: Any = None
  position_embedding: Optional[str] = None
  tie_embeddings: bool = True
  pooling: Optional[str] = None
  patch_size: Optional[int] = None
  pad_id: Optional[int] = None
  tidal_decode: Optional[Mapping[str, Any]] = None
  shared_attention: Any = None
  use_bias: bool = True
  dropout: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  widths: Any = None
  blocks: Any = None
  attention_module: Optional[str] = None
  attention_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  param_budget: Optional[int] = None
  width_multiple: int = 4
  source_len: Optional[int] = None
  growth_rate: Optional[int] = None
  kernel_size: Optional[int] = None

  @classmethod
  def from_config(cls, config: Any) -> "ModelConfig":
    """The checked config (defaults resolved) from a mapping of fields (module docstring).

    Raises:
      ValueError: naming the field, for any bad or inconsistent value.
    """
    values = _read(config)
    arch = values["arch"]
    arch_fields.check_cnn_fields(values)
    arch_fields.check_pervasive_fields(values)
    if arch in ("cnn", "pervasive"):
      return cls(**values)
    for name in ("width", "depth", "num_heads"):
      values[name] = positive_int(name, values[name])
    width, num_heads = values["width"], values["num_heads"]
    if width % num_heads:
      raise ValueError(f"model.num_heads ({num_heads}) must divide model.width ({width})")
    if values["num_kv_heads"] is not None:
      kv_heads = values["num_kv_heads"] = positive_int("num_kv_heads", values["num_kv_heads"])
      if num_heads % kv_heads:
        raise ValueError(f"model.num_kv_heads ({kv_heads}) must divide model.num_heads "
                         f"({num_heads})")
    mlp_dim = values["mlp_dim"] or 4 * width
    if isinstance(mlp_dim, bool) or not isinstance(mlp_dim, (int, np.integer)) or mlp_dim <= 0:
      raise ValueError(f"model.mlp_dim must be a positive integer or None, got {mlp_dim!r}")
    values["mlp_dim"] = int(mlp_dim)
    rope_base = values["rope_base"]
    if rope_base is not None:
      if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or rope_base <= 1:
        raise ValueError(f"model.rope_base must be None or a number > 1, got {rope_base!r}")
      try:
        rope.rotary_dim(width // num_heads)
      except ValueError as e:
        raise ValueError(f"model.rope_base: {e}") from None
      values["rope_base"] = float(rope_base)
    _check_rope_options(values)
    arch_fields.check_dropout_and_dtypes(values)
    if not isinstance(values["use_bias"], bool):
      raise ValueError(f"model.use_bias must be a bool, got {values['use_bias']!r}")
    choice("mlp", values["mlp"], MLP_KINDS)
    choice("norm", values["norm"], NORM_KINDS)

    default_pos = "none" if arch == "decoder_lm" or (rope_base and arch != "vit") else "learned"
    if values["position_embedding"] is None:
      values["position_embedding"] = default_pos
    choice("position_embedding", values["position_embedding"], POSITION_EMBEDDINGS)
    if arch == "decoder_lm":
      if not isinstance(values["tie_embeddings"], bool):
        raise ValueError(f"model.tie_embeddings must be a bool, got {values['tie_embeddings']!r}")
    else:
      if values["pooling"] is None:
        values["pooling"] = "cls" if arch == "vit" else "mean"
      choice("pooling", values["pooling"], POOLINGS)
    if arch == "vit":
      if values["position_embedding"] == "none":
        raise ValueError("model.position_embedding: a vit always learns its patch positions; "
                         "use 'learned' (or leave it unset)")
      values["patch_size"] = positive_int("patch_size", values["patch_size"])
    config = cls(**values)
    names, _ = config.layers()  # checks the mechanisms and their keyword arguments
    if values["tidal_decode"] is not None:
      config = dataclasses.replace(config, tidal_decode=_tidal_decode(values, names))
    if values["shared_attention"] is not None:
      config = dataclasses.replace(config, shared_attention=_spans(values["shared_attention"]))
      try:
        config.transformer()
      except ValueError as e:
        raise ValueError(f"model.shared_attention: {e}") from None
    return config

  @property
  def causal(self) -> bool:
    return self.arch == "decoder_lm"

  @property
  def packed(self) -> bool:
    """True when the layers get segment ids (an encoder_classifier with a pad_id)."""
    return self.arch == "encoder_classifier" and self.pad_id is not None

  def layers(self) -> tuple[tuple[str, ...], tuple[flax.core.FrozenDict, ...]]:
    """Per layer, the mechanism name and its keyword arguments, after checking them (every name
    the config gives, also one a schedule uses at no layer of this depth)."""
    names = layer_mechanisms(self.mechanism, self.layer_mechanisms, self.depth)
    other_kwargs = self.layer_mechanism_kwargs or {}
    if not isinstance(other_kwargs, Mapping):
      raise ValueError(f"model.layer_mechanism_kwargs must map mechanism names to dicts, got "
                       f"{other_kwargs!r}")
    for name in dict.fromkeys(mechanism_names(self)):
      if name not in names:
        where = "model.mechanism" if name == self.mechanism else "model.layer_mechanisms"
        layer_schedule.mechanism_record(where, name)
    per_layer = []
    for i, name in enumerate(names):
      where = "model.mechanism" if name == self.mechanism else f"model.layer_mechanisms[{i}]"
      mech = layer_schedule.mechanism_record(where, name)
      try:
        mech.check_pattern(causal=self.causal, cross=False)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
      if self.packed and not mech.packed:
        raise ValueError(f"{where}: mechanism {name!r} does not support segment_ids, which "
                         "model.pad_id needs")
      if name == self.mechanism:
        kwargs, kw_where = self.mechanism_kwargs or {}, "model.mechanism_kwargs"
      else:
        kwargs, kw_where = other_kwargs.get(name, {}), f"model.layer_mechanism_kwargs[{name!r}]"
      layer_schedule.check_mechanism_kwargs(kw_where, mech, kwargs)
      per_layer.append(flax.core.FrozenDict(kwargs))
    return names, tuple(per_layer)

  def transformer(self) -> TransformerConfig:
    """The blocks' `TransformerConfig`."""
    names, kwargs = self.layers()
    return TransformerConfig(
        width=self.width, num_heads=self.num_heads, mechanisms=names, mechanism_kwargs=kwargs,
        num_kv_heads=self.num_kv_heads, mlp_dim=self.mlp_dim, mlp=self.mlp, norm=self.norm,
        causal=self.causal, rope_base=self.rope_base, rope_scaling=self.rope_scaling,
        fope=self.fope, layer_rope=layer_rope(self.layer_rope, self.depth),
        tidal_decode=self.tidal_decode, shared_attention=self.shared_attention,
        use_bias=self.use_bias,
        dropout=self.dropout, dtype=DTYPES[self.dtype], param_dtype=DTYPES[self.param_dtype])


FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def _plain(value: Any) -> Any:
  """ConfigDict / FrozenDict → dict (recursively); other values as they are."""
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  if isinstance(value, flax.core.FrozenDict):
    return flax.core.unfreeze(value)
  return value


def check_fields(config: Any) -> str:
  """Checks the field names and `arch`; returns the arch."""
  unknown = sorted(set(config.keys()) - set(FIELDS))
  if unknown:
    raise ValueError(f"model: unknown fields {unknown}; the model config takes {list(FIELDS)}")
  return choice("arch", _plain(config.get("arch", None)), ARCHS)


def _read(config: Any) -> dict[str, Any]:
  """Every field's value as set (the dataclass default when unset; None for a required field)."""
  check_fields(config)
  values = {}
  for f in dataclasses.fields(ModelConfig):
    default = None if f.default is dataclasses.MISSING else f.default
    values[f.name] = _plain(config.get(f.name, default))
  values["mechanism_kwargs"] = values["mechanism_kwargs"] or {}
  values["layer_mechanism_kwargs"] = values["layer_mechanism_kwargs"] or {}
  return values


def _check_rope_options(values: dict[str, Any]):
  """Checks (and normalizes in `values`) rope_scaling, fope and layer_rope."""
  for name in ("rope_scaling", "fope", "layer_rope"):
    if values[name] is not None and values["rope_base"] is None:
      raise ValueError(f"model.{name} modifies RoPE, which is off: set model.rope_base")
  try:
    values["rope_scaling"] = rope_scaling_lib.check_rope_scaling(values["rope_scaling"])
  except ValueError as e:
    raise ValueError(f"model.rope_scaling: {e}") from None
  try:
    values["fope"] = fope_lib.check_fope(values["fope"])
    if values["fope"] is not None:
      fope_lib.fope_kept_pairs(rope.rotary_dim(values["width"] // values["num_heads"]),
                               base=values["rope_base"], train_length=values["fope"]["train_length"])
  except ValueError as e:
    raise ValueError(f"model.fope: {e}") from None
  if values["fope"] is not None and values["rope_scaling"] is not None:
    raise ValueError("model.fope and model.rope_scaling are not combined; set one")
  layer_rope(values["layer_rope"], values["depth"])


def _spans(value: Any) -> tuple[tuple[int, int], ...]:
  """`shared_attention` as a tuple of (start, end) int pairs (the blocks check the ranges)."""
  try:
    spans = tuple((int(a), int(b)) for a, b in value)
  except (TypeError, ValueError):
    raise ValueError(f"model.shared_attention must be a list of [start, end] layer pairs, got "
                     f"{value!r}") from None
  return spans


def _tidal_decode(values: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
  """The checked `tidal_decode` settings (defaults filled in)."""
  if values["arch"] != "decoder_lm":
    raise ValueError(f"model.tidal_decode is a decoder_lm option (decoding), got arch "
                     f"{values['arch']!r}")
  try:
    settings = tidal_decode_lib.decode_settings(values["tidal_decode"], values["depth"])
  except ValueError as e:
    raise ValueError(f"model.{e}") from None
  later = list(names[settings["selection_layer"]:])
  if any(name != "softmax" for name in later):
    raise ValueError(f"model.tidal_decode: the layers from selection_layer "
                     f"{settings['selection_layer']} on must be 'softmax', got {later}")
  return settings


def mechanism_names(config: Any) -> list[str]:
  """Every mechanism name a model config (a mapping or a `ModelConfig`) gives: `mechanism`, then
  those of `layer_mechanisms` (the list as written, or the name of a schedule "every K: name")."""
  if isinstance(config, ModelConfig):
    mechanism, schedule = config.mechanism, config.layer_mechanisms
  else:
    mechanism = _plain(config.get("mechanism", "softmax"))
    schedule = _plain(config.get("layer_mechanisms", None))
  names = [mechanism]
  if isinstance(schedule, str) and schedule:
    names.append(layer_schedule.parse_schedule(schedule)[1])
  elif isinstance(schedule, (list, tuple)):
    names.extend(schedule)
  return names


def check_config(config: Any) -> ModelConfig:
  """`ModelConfig.from_config`: every check that needs no task, the messages of `build_model`."""
  return ModelConfig.from_config(config)


__all__ = ["ARCHS", "DTYPES", "FIELDS", "ModelConfig", "check_config", "layer_mechanisms",
           "layer_rope", "mechanism_names"]
