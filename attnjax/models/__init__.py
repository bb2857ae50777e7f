"""Models over any registered attention mechanism, built from an ml_collections config.

`build_model(config, spec)` checks every field first (a bad value or an unknown field raises
`ValueError` naming the field, before anything is traced or compiled) and returns a Flax Linen
module:

  arch                 "decoder_lm" (`DecoderLM`), "encoder_classifier" (`EncoderClassifier`), "vit"
  width, depth         D and the number of blocks
  num_heads            N (must divide width); num_kv_heads: K (None = N; must divide N)
  mlp_dim, mlp         MLP hidden width (None/0: 4·width), "gelu" | "swiglu"
  norm                 "rmsnorm" | "layernorm"
  mechanism            registry name for every layer, with mechanism_kwargs (dict)
  layer_mechanisms     None, a list of one registry name per layer, or a schedule "every K: name"
                       (layer i uses `name` when i % K == K - 1, `mechanism` otherwise)
  layer_mechanism_kwargs  optional {name: kwargs} for layers whose mechanism is not `mechanism`
  rope_base            None or a float (RoPE on q, k)
  position_embedding   "learned" | "none" (default: "none" for decoder_lm, "learned" otherwise when
                       rope_base is None; vit always learns its positions, "none" is an error)
  tie_embeddings       decoder_lm: logits through the input embedding
  pooling              "mean" | "cls" (classifiers); patch_size (vit); pad_id (encoder_classifier,
                       optional: tokens equal to it are masked out of attention and pooling)
  use_bias             biases on the projections (default True)
  dropout              residual/embedding dropout rate, active with `apply(..., train=True,
                       rngs={"dropout": key})`
  dtype, param_dtype   "float32" | "bfloat16": compute dtype and parameter dtype

Parameters carry logical axis names and `DEFAULT_LOGICAL_AXIS_RULES` maps them onto the mesh axes
("data", "fsdp", "tensor"); `param_count` counts parameters of a (possibly abstract) tree.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attnjax import registry
from attnjax.models.classifier import EncoderClassifier
from attnjax.models.generate import generate, sample_logits, supports_kv_cache
from attnjax.models.lm import DecoderLM
from attnjax.models.vit import ViT
from attnjax.nn.blocks import MLP_KINDS, NORM_KINDS, TransformerConfig
from attnjax.ops import rope

ARCHS = ("decoder_lm", "encoder_classifier", "vit")
# Every field build_model reads; any other name in the config is a typo and raises.
FIELDS = ("arch", "width", "depth", "num_heads", "num_kv_heads", "mlp_dim", "mlp", "norm",
          "mechanism", "mechanism_kwargs", "layer_mechanisms", "layer_mechanism_kwargs",
          "rope_base", "position_embedding", "tie_embeddings", "pooling", "patch_size", "pad_id",
          "use_bias", "dropout", "dtype", "param_dtype")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# (logical axis, mesh axes) pairs, first match wins; a mesh axis is used at most once per array,
# so activations ("batch", "length", "embed") shard the batch over data × fsdp and parameters
# ("embed", ...) over fsdp. Names not listed are replicated.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("classes", None),
    ("patch", None),
    ("norm", None),
)

# Arguments that the layer passes to every mechanism: not settable through mechanism_kwargs.
_RESERVED = frozenset({"causal", "cross", "segment_ids", "q_offset", "kv_lengths", "scale",
                       "implementation"})
_SCHEDULE = re.compile(r"^\s*every\s+(\d+)\s*:\s*([A-Za-z0-9_]+)\s*$")


def _plain(value: Any) -> Any:
  """ConfigDict / FrozenDict → dict (recursively); other values as they are."""
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  if isinstance(value, flax.core.FrozenDict):
    return flax.core.unfreeze(value)
  return value


def _field(config, name: str, default: Any = None) -> Any:
  return _plain(config.get(name, default))


def _positive_int(config, name: str, default: Any = None) -> int:
  value = _field(config, name, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
  return int(value)


def _choice(config, name: str, choices: Sequence[str], default: Any = None) -> str:
  value = _field(config, name, default)
  if value not in choices:
    raise ValueError(f"model.{name} must be one of {tuple(choices)}, got {value!r}")
  return value


def layer_mechanisms(mechanism: str, schedule: Any, depth: int) -> tuple[str, ...]:
  """One mechanism name per layer from `layer_mechanisms` (None, a list, or "every K: name")."""
  if schedule is None or schedule == "":
    return (mechanism,) * depth
  if isinstance(schedule, str):
    match = _SCHEDULE.match(schedule)
    if not match or int(match.group(1)) < 1:
      raise ValueError(f"model.layer_mechanisms: a schedule string must read 'every K: name' with "
                       f"K >= 1, got {schedule!r}")
    every, name = int(match.group(1)), match.group(2)
    return tuple(name if i % every == every - 1 else mechanism for i in range(depth))
  if isinstance(schedule, (list, tuple)):
    if len(schedule) != depth or not all(isinstance(n, str) for n in schedule):
      raise ValueError(f"model.layer_mechanisms must name one mechanism per layer (depth {depth}), "
                       f"got {schedule!r}")
    return tuple(schedule)
  raise ValueError(f"model.layer_mechanisms must be None, a list of names or 'every K: name', "
                   f"got {schedule!r}")


def _check_kwargs(where: str, mech: registry.Mechanism, kwargs: Mapping[str, Any]):
  """Keyword arguments the mechanism's function accepts, and every required one present."""
  if not isinstance(kwargs, Mapping):
    raise ValueError(f"{where} must be a dict of keyword arguments, got {kwargs!r}")
  reserved = sorted(set(kwargs) & (_RESERVED | {p.name for p in mech.params}))
  if reserved:
    raise ValueError(f"{where}: {reserved} are set by the layer, not by config, for mechanism "
                     f"{mech.name!r}")
  params = inspect.signature(mech.fn).parameters
  if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
      accepted = sorted(set(params) - _RESERVED - {"q", "k", "v"} - {p.name for p in mech.params})
      raise ValueError(f"{where}: mechanism {mech.name!r} takes no arguments {unknown}; it accepts "
                       f"{accepted}")
  missing = sorted(n for n, p in params.items()
                   if p.kind == p.KEYWORD_ONLY and p.default is p.empty and n not in kwargs
                   and n not in mech.defaults and n not in {s.name for s in mech.params})
  if missing:
    raise ValueError(f"{where}: mechanism {mech.name!r} needs the arguments {missing}")


def transformer_config(config: ml_collections.ConfigDict, *, causal: bool,
                       packed: bool = False) -> TransformerConfig:
  """The blocks' `TransformerConfig` from a model config, after checking every field."""
  width = _positive_int(config, "width")
  depth = _positive_int(config, "depth")
  num_heads = _positive_int(config, "num_heads")
  if width % num_heads:
    raise ValueError(f"model.num_heads ({num_heads}) must divide model.width ({width})")
  num_kv_heads = _field(config, "num_kv_heads")
  if num_kv_heads is not None:
    num_kv_heads = _positive_int(config, "num_kv_heads")
    if num_heads % num_kv_heads:
      raise ValueError(f"model.num_kv_heads ({num_kv_heads}) must divide model.num_heads "
                       f"({num_heads})")
  mlp_dim = _field(config, "mlp_dim") or 4 * width
  if isinstance(mlp_dim, bool) or not isinstance(mlp_dim, (int, np.integer)) or mlp_dim <= 0:
    raise ValueError(f"model.mlp_dim must be a positive integer or None, got {mlp_dim!r}")
  rope_base = _field(config, "rope_base")
  if rope_base is not None:
    if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or rope_base <= 1:
      raise ValueError(f"model.rope_base must be None or a number > 1, got {rope_base!r}")
    try:
      rope.rotary_dim(width // num_heads)
    except ValueError as e:
      raise ValueError(f"model.rope_base: {e}") from None
  dropout = _field(config, "dropout", 0.0)
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise ValueError(f"model.dropout must be in [0, 1), got {dropout!r}")
  use_bias = _field(config, "use_bias", True)
  if not isinstance(use_bias, bool):
    raise ValueError(f"model.use_bias must be a bool, got {use_bias!r}")

  mechanism = _field(config, "mechanism", "softmax")
  names = layer_mechanisms(mechanism, _field(config, "layer_mechanisms"), depth)
  base_kwargs = _field(config, "mechanism_kwargs") or {}
  other_kwargs = _field(config, "layer_mechanism_kwargs") or {}
  if not isinstance(other_kwargs, Mapping):
    raise ValueError(f"model.layer_mechanism_kwargs must map mechanism names to dicts, got "
                     f"{other_kwargs!r}")
  per_layer = []
  for i, name in enumerate(names):
    where = "model.mechanism" if name == mechanism else f"model.layer_mechanisms[{i}]"
    try:
      mech = registry.get(name)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    try:
      mech.check_pattern(causal=causal, cross=False)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    if packed and not mech.packed:
      raise ValueError(f"{where}: mechanism {name!r} does not support segment_ids, which "
                       "model.pad_id needs")
    if name == mechanism:
      kwargs, kw_where = base_kwargs, "model.mechanism_kwargs"
    else:
      kwargs, kw_where = other_kwargs.get(name, {}), f"model.layer_mechanism_kwargs[{name!r}]"
    _check_kwargs(kw_where, mech, kwargs)
    per_layer.append(flax.core.FrozenDict(kwargs))

  return TransformerConfig(
      width=width, num_heads=num_heads, mechanisms=names, mechanism_kwargs=tuple(per_layer),
      num_kv_heads=num_kv_heads, mlp_dim=int(mlp_dim),
      mlp=_choice(config, "mlp", MLP_KINDS, "gelu"),
      norm=_choice(config, "norm", NORM_KINDS, "rmsnorm"), causal=causal,
      rope_base=None if rope_base is None else float(rope_base), use_bias=use_bias,
      dropout=float(dropout), dtype=DTYPES[_choice(config, "dtype", tuple(DTYPES), "float32")],
      param_dtype=DTYPES[_choice(config, "param_dtype", tuple(DTYPES), "float32")])


def _check_spec(arch: str, spec: Any):
  tokens = getattr(spec, "input_dtype", None) == "int32"
  if arch in ("decoder_lm", "encoder_classifier"):
    want_kind = "lm" if arch == "decoder_lm" else "classify"
    if spec.kind != want_kind or not tokens or len(spec.input_shape) != 1 or spec.vocab_size < 1:
      raise ValueError(f"model.arch {arch!r} needs a {want_kind!r} task over int32 token "
                       f"sequences; task {spec.name!r} has kind {spec.kind!r}, inputs "
                       f"{tuple(spec.input_shape)} {spec.input_dtype}")
  elif spec.kind != "classify" or len(spec.input_shape) != 3:
    raise ValueError(f"model.arch 'vit' needs a 'classify' task over [H, W, C] images; task "
                     f"{spec.name!r} has kind {spec.kind!r}, inputs {tuple(spec.input_shape)}")
  if spec.num_classes < 1:
    raise ValueError(f"task {spec.name!r}: num_classes must be >= 1, got {spec.num_classes}")


def build_model(config: ml_collections.ConfigDict, spec: Any) -> nn.Module:
  """The model `config.arch` for the task `spec` (a `TaskSpec`), after checking every field.

  Raises:
    ValueError: naming the field, for any bad or inconsistent value.
  """
  unknown = sorted(set(config.keys()) - set(FIELDS))
  if unknown:
    raise ValueError(f"model: unknown fields {unknown}; the model config takes {list(FIELDS)}")
  arch = _choice(config, "arch", ARCHS)
  _check_spec(arch, spec)
  default_pos = "none" if arch == "decoder_lm" or _field(config, "rope_base") else "learned"
  positions = _choice(config, "position_embedding", ("learned", "none"), default_pos)

  if arch == "decoder_lm":
    tie = _field(config, "tie_embeddings", True)
    if not isinstance(tie, bool):
      raise ValueError(f"model.tie_embeddings must be a bool, got {tie!r}")
    if tie and spec.num_classes != spec.vocab_size:
      raise ValueError(f"model.tie_embeddings needs num_classes == vocab_size; task "
                       f"{spec.name!r} has {spec.num_classes} and {spec.vocab_size}")
    return DecoderLM(transformer_config(config, causal=True), vocab_size=spec.vocab_size,
                     num_classes=spec.num_classes, tie_embeddings=tie,
                     max_len=spec.seq_len if positions == "learned" else 0)

  pooling = _choice(config, "pooling", ("mean", "cls"), "mean" if arch != "vit" else "cls")
  if arch == "encoder_classifier":
    pad_id = _field(config, "pad_id")
    if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)
                               or not 0 <= pad_id < spec.vocab_size):
      raise ValueError(f"model.pad_id must be None or a token id in [0, {spec.vocab_size}), got "
                       f"{pad_id!r}")
    return EncoderClassifier(transformer_config(config, causal=False, packed=pad_id is not None),
                             vocab_size=spec.vocab_size, num_classes=spec.num_classes,
                             pooling=pooling, learned_positions=positions == "learned",
                             pad_id=pad_id)

  if _field(config, "position_embedding") == "none":
    raise ValueError("model.position_embedding: a vit always learns its patch positions; "
                     "use 'learned' (or leave it unset)")
  patch_size = _positive_int(config, "patch_size")
  height, width = spec.input_shape[:2]
  if height % patch_size or width % patch_size:
    raise ValueError(f"model.patch_size ({patch_size}) must divide the image size "
                     f"{height}x{width} of task {spec.name!r}")
  return ViT(transformer_config(config, causal=False), num_classes=spec.num_classes,
             patch_size=patch_size, pooling=pooling)


def dummy_inputs(spec: Any, batch_size: int = 1) -> jax.Array:
  """Zeros shaped and typed like `Task.batch()["inputs"]`, for `init` / `eval_shape`."""
  return jnp.zeros((batch_size, *spec.input_shape), jnp.dtype(spec.input_dtype))


def abstract_variables(model: nn.Module, spec: Any, batch_size: int = 1) -> Any:
  """`jax.eval_shape` of `model.init`: the variables' shapes and dtypes, nothing allocated."""
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy_inputs(spec, batch_size)))


def param_count(tree: Any) -> int:
  """Number of scalars in a tree of arrays or `ShapeDtypeStruct`s (partitioning boxes unwrapped)."""
  leaves = jax.tree.leaves(nn.unbox(tree))
  return sum(math.prod(x.shape) for x in leaves)


__all__ = [
    "ARCHS", "DEFAULT_LOGICAL_AXIS_RULES", "FIELDS", "DecoderLM", "EncoderClassifier", "ViT",
    "abstract_variables", "build_model", "dummy_inputs", "generate", "layer_mechanisms",
    "param_count", "sample_logits", "supports_kv_cache", "transformer_config",
]
