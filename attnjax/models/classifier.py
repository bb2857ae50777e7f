"""Encoder classifier over token sequences: bidirectional blocks, mean or CLS pooling, linear head.

    x_0 = E[tokens] (+ P[0..T])        [B, T, D]; with CLS pooling a learned token is prepended
    x_L = Norm(Blocks(x_0))            non-causal self-attention by each layer's mechanism
    z   = mean_t x_L[:, t]  or  x_L[:, 0] (CLS)
    logits = z W + b                   [B, C]

With `pad_id` set, padding tokens are kept apart through `segment_ids` (real tokens attend to real
tokens only) and left out of the mean. The Long Range Arena text/ListOps classifiers are this
model (Tay et al., "Long Range Arena: A Benchmark for Efficient Transformers", arXiv:2011.04006;
CLS pooling as in Devlin et al., "BERT", arXiv:1810.04805).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.nn import blocks

POOLINGS = ("mean", "cls")


def pool(x: jax.Array, pooling: str, mask: Optional[jax.Array] = None) -> jax.Array:
  """`[B, T, D] → [B, D]`: the first token ("cls") or the mean over tokens where `mask` [B, T]."""
  if pooling == "cls":
    return x[:, 0]
  if pooling != "mean":
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
  if mask is None:
    return jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)
  w = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(x.astype(jnp.float32) * w, axis=1)
  return (total / jnp.maximum(jnp.sum(w, axis=1), 1.0)).astype(x.dtype)


class ClassifierHead(nn.Module):
  """Linear `[B, D] → [B, C]` float32 logits, kernel named ("embed", "classes")."""
  num_classes: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=blocks.logical(nn.initializers.lecun_normal(), "embed",
                                                 "classes"),
                      bias_init=blocks.logical(nn.initializers.zeros_init(), "classes"),
                      name="dense")(z)
    return logits.astype(jnp.float32)


def cls_token(module: nn.Module, x: jax.Array, param_dtype) -> jax.Array:
  """Prepends a learned `[1, 1, D]` token to `x [B, T, D]`."""
  token = module.param("cls", blocks.logical(nn.initializers.zeros_init(), None, None, "embed"),
                       (1, 1, x.shape[-1]), param_dtype)
  token = jnp.broadcast_to(token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
  return jnp.concatenate([token, x], axis=1)


def position_embedding(module: nn.Module, x: jax.Array, param_dtype) -> jax.Array:
  """Adds a learned `[T, D]` position table (normal, std 0.02) to `x [B, T, D]`."""
  table = module.param("pos_embed", blocks.logical(nn.initializers.normal(0.02), "position", "embed"),
                       x.shape[1:], param_dtype)
  return x + table.astype(x.dtype)[None]


class EncoderClassifier(nn.Module):
  """Bidirectional transformer over tokens with one label per sequence.

  Attributes:
    config: the blocks' `TransformerConfig` (must be non-causal).
    vocab_size: V, input tokens.
    num_classes: C, labels.
    pooling: "mean" or "cls".
    learned_positions: add a learned position table (otherwise use RoPE or a positional
      mechanism; without either the encoder cannot tell positions apart).
    pad_id: token id of padding (None: no padding).
  """
  config: blocks.TransformerConfig
  vocab_size: int
  num_classes: int
  pooling: str = "mean"
  learned_positions: bool = True
  pad_id: Optional[int] = None

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool = False) -> jax.Array:
    cfg = self.config
    if self.pooling not in POOLINGS:
      raise ValueError(f"EncoderClassifier: `pooling` must be one of {POOLINGS}, "
                       f"got {self.pooling!r}")
    tokens = inputs.astype(jnp.int32)
    x = nn.Embed(self.vocab_size, cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 embedding_init=blocks.logical(nn.initializers.normal(1.0), "vocab", "embed"),
                 name="embed")(tokens)
    keep = None if self.pad_id is None else tokens != self.pad_id
    if self.pooling == "cls":
      x = cls_token(self, x, cfg.param_dtype)
      if keep is not None:
        keep = jnp.concatenate([jnp.ones_like(keep[:, :1]), keep], axis=1)
    if self.learned_positions:
      x = position_embedding(self, x, cfg.param_dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if cfg.dropout:
      x = nn.Dropout(cfg.dropout)(x, deterministic=not train)
    segment_ids = None if keep is None else keep.astype(jnp.int32)
    x = blocks.Transformer(cfg, name="encoder")(x, train=train, segment_ids=segment_ids)
    z = pool(x, self.pooling, keep)
    return ClassifierHead(self.num_classes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                          name="head")(z)

