"""Models over any registered attention mechanism, built from an ml_collections config.

`build_model(config, spec)` checks every field first (a bad value or an unknown field raises
`ValueError` naming the field, before anything is traced or compiled) and returns a Flax Linen
module: `DecoderLM` (arch "decoder_lm"), `EncoderClassifier` ("encoder_classifier"), `ViT`
("vit"), `ResNetCNN` ("cnn", a ResNet-style CNN with an attention module of `attnjax.modules` in
every block: attnjax/models/cnn.py) or `PervasiveSeq2Seq` ("pervasive", a 2-D convolutional
sequence-to-sequence model: attnjax/models/pervasive.py). The fields, their defaults and their
checks are one schema, `ModelConfig` (attnjax/models/config.py, with the fields one architecture
reads in attnjax/models/arch_fields.py); `check_config(config)` runs the checks that need no task,
with the same messages (attnjax.train.validate calls it for the `model` section).

Parameters carry logical axis names; `DEFAULT_LOGICAL_AXIS_RULES` (attnjax.parallel.rules,
re-exported here) maps them onto the mesh axes ("data", "fsdp", "tensor"); `param_count` counts
parameters of a (possibly abstract) tree.

The theory papers' probes are small models of their own, as namespaces: `rank_heads` (one full-rank
head against many low-rank heads on nearest neighbours, #201) and `memorization` (how many random
labels H heads fit, #237); experiments/rank_heads.py and experiments/memorization.py run them.
`graph_net` holds the graph attention networks (GAT / GATv2 / SuperGAT node classifiers and the
DictionaryLookup model) that experiments/graph_attention.py compares; `perceiver_classifier` the
Perceiver token classifier that experiments/perceiver_listops.py compares with an encoder.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from attnjax.models import graph_net
from attnjax.models import memorization
from attnjax.models import perceiver_classifier
from attnjax.models import rank_heads
from attnjax.models.classifier import EncoderClassifier
from attnjax.models.cnn import ResNetCNN
from attnjax.models.cnn import budget_widths
from attnjax.models.cnn import cnn_param_count
from attnjax.models.config import ARCHS
from attnjax.models.config import DTYPES
from attnjax.models.config import FIELDS
from attnjax.models.config import ModelConfig
from attnjax.models.config import check_config
from attnjax.models.config import check_fields
from attnjax.models.config import layer_mechanisms
from attnjax.models.config import mechanism_names
from attnjax.models.generate import generate, sample_logits, supports_kv_cache
from attnjax.models.lm import DecoderLM
from attnjax.models.paged_generate import generate_paged
from attnjax.models.pervasive import PervasiveSeq2Seq
from attnjax.models.streaming import generate_streaming
from attnjax.models.vit import ViT
from attnjax.parallel.rules import DEFAULT_LOGICAL_AXIS_RULES


def _check_spec(arch: str, spec: Any):
  tokens = getattr(spec, "input_dtype", None) == "int32"
  if arch in ("decoder_lm", "encoder_classifier"):
    want_kind = "lm" if arch == "decoder_lm" else "classify"
    if spec.kind != want_kind or not tokens or len(spec.input_shape) != 1 or spec.vocab_size < 1:
      raise ValueError(f"model.arch {arch!r} needs a {want_kind!r} task over int32 token "
                       f"sequences; task {spec.name!r} has kind {spec.kind!r}, inputs "
                       f"{tuple(spec.input_shape)} {spec.input_dtype}")
  elif arch == "pervasive":
    if spec.kind != "lm" or not tokens or len(spec.input_shape) != 1:
      raise ValueError(f"model.arch 'pervasive' needs an 'lm' task over int32 token rows (source, "
                       f"then target); task {spec.name!r} has kind {spec.kind!r}, inputs "
                       f"{tuple(spec.input_shape)} {spec.input_dtype}")
  elif spec.kind != "classify" or len(spec.input_shape) != 3:
    raise ValueError(f"model.arch {arch!r} needs a 'classify' task over [H, W, C] images; task "
                     f"{spec.name!r} has kind {spec.kind!r}, inputs {tuple(spec.input_shape)}")
  if spec.num_classes < 1:
    raise ValueError(f"task {spec.name!r}: num_classes must be >= 1, got {spec.num_classes}")


def build_model(config: ml_collections.ConfigDict, spec: Any) -> nn.Module:
  """The model `config.arch` for the task `spec` (a `TaskSpec`), after checking every field.

  Raises:
    ValueError: naming the field, for any bad or inconsistent value.
  """
  _check_spec(check_fields(config), spec)
  cfg = ModelConfig.from_config(config)
  learned_positions = cfg.position_embedding == "learned"

  if cfg.arch == "decoder_lm":
    if cfg.tie_embeddings and spec.num_classes != spec.vocab_size:
      raise ValueError(f"model.tie_embeddings needs num_classes == vocab_size; task "
                       f"{spec.name!r} has {spec.num_classes} and {spec.vocab_size}")
    return DecoderLM(cfg.transformer(), vocab_size=spec.vocab_size,
                     num_classes=spec.num_classes, tie_embeddings=cfg.tie_embeddings,
                     max_len=spec.seq_len if learned_positions else 0)

  if cfg.arch == "encoder_classifier":
    pad_id = cfg.pad_id
    if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)
                               or not 0 <= pad_id < spec.vocab_size):
      raise ValueError(f"model.pad_id must be None or a token id in [0, {spec.vocab_size}), got "
                       f"{pad_id!r}")
    return EncoderClassifier(cfg.transformer(), vocab_size=spec.vocab_size,
                             num_classes=spec.num_classes, pooling=cfg.pooling,
                             learned_positions=learned_positions, pad_id=pad_id)

  if cfg.arch == "cnn":
    return _build_cnn(cfg, spec)

  if cfg.arch == "pervasive":
    if not cfg.source_len < spec.seq_len:
      raise ValueError(f"model.source_len ({cfg.source_len}) must be less than the task's seq_len "
                       f"({spec.seq_len}): every row needs target positions after the source")
    if cfg.tie_embeddings and spec.num_classes != spec.vocab_size:
      raise ValueError(f"model.tie_embeddings needs num_classes == vocab_size; task "
                       f"{spec.name!r} has {spec.num_classes} and {spec.vocab_size}")
    return PervasiveSeq2Seq(vocab_size=spec.vocab_size, num_classes=spec.num_classes,
                            source_len=cfg.source_len, embed_dim=cfg.width,
                            num_layers=cfg.depth, growth_rate=cfg.growth_rate,
                            kernel_size=cfg.kernel_size, tie_embeddings=cfg.tie_embeddings,
                            dropout=cfg.dropout, dtype=DTYPES[cfg.dtype],
                            param_dtype=DTYPES[cfg.param_dtype])

  height, width = spec.input_shape[:2]
  if height % cfg.patch_size or width % cfg.patch_size:
    raise ValueError(f"model.patch_size ({cfg.patch_size}) must divide the image size "
                     f"{height}x{width} of task {spec.name!r}")
  return ViT(cfg.transformer(), num_classes=spec.num_classes, patch_size=cfg.patch_size,
             pooling=cfg.pooling)


def _build_cnn(cfg: ModelConfig, spec: Any) -> ResNetCNN:
  """`ResNetCNN` from the cnn fields; with `param_budget`, its widths scaled to the budget."""
  widths = cfg.widths
  if cfg.param_budget is not None:
    try:
      widths, _ = budget_widths(cfg.param_budget, spec.input_shape, spec.num_classes, cfg.widths,
                                cfg.blocks, cfg.attention_module, cfg.attention_kwargs,
                                multiple=cfg.width_multiple)
    except ValueError as e:
      raise ValueError(f"model.param_budget: {e}") from None
  return ResNetCNN(num_classes=spec.num_classes, widths=widths, blocks=cfg.blocks,
                   attention_module=cfg.attention_module,
                   attention_kwargs=flax.core.FrozenDict(cfg.attention_kwargs),
                   dropout=cfg.dropout, dtype=DTYPES[cfg.dtype],
                   param_dtype=DTYPES[cfg.param_dtype])


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
    "ARCHS", "DEFAULT_LOGICAL_AXIS_RULES", "DTYPES", "FIELDS", "DecoderLM", "EncoderClassifier",
    "ModelConfig", "PervasiveSeq2Seq", "ResNetCNN", "ViT", "abstract_variables", "budget_widths",
    "build_model", "check_config", "cnn_param_count", "dummy_inputs",
    "generate", "generate_paged", "generate_streaming", "layer_mechanisms", "mechanism_names",
    "graph_net", "memorization", "perceiver_classifier", "rank_heads",
    "param_count", "sample_logits", "supports_kv_cache",
]
