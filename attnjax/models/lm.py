"""Decoder-only language model: embed, pre-norm causal blocks, final norm, logits.

    x_0 = E[tokens] (+ P[positions])          E: [V, D] ("vocab", "embed")
    x_l = Block_l(x_{l-1})                    causal self-attention by the mechanism of layer l
    logits = Norm(x_L) Eᵀ / sqrt(D)                      (tied)
    logits = Norm(x_L) W,  W: [D, C] ("embed", "vocab")  (untied)

`tokens [B, T] int32 → logits [B, T, C] float32` (C = num_classes, usually the vocabulary). With
`decode=True` the attention layers read and extend their KV caches (the 'cache' collection):
see `attnjax.models.generate`. Tied logits are scaled by 1/sqrt(D) because the embedding is
initialized with unit variance (as in T5 / MaxText).

Papers: Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2, 2019);
Press & Wolf, "Using the Output Embedding to Improve Language Models", arXiv:1608.05859 (tied
embeddings).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.nn import blocks


class DecoderLM(nn.Module):
  """Causal transformer language model over any registered mechanisms.

  Attributes:
    config: the blocks' `TransformerConfig` (must be causal).
    vocab_size: V, input tokens.
    num_classes: C, output classes per position (usually V).
    tie_embeddings: logits through the input embedding (requires C == V).
    max_len: positions of the learned position table (0: no learned positions; use RoPE or a
      positional mechanism instead).
  """
  config: blocks.TransformerConfig
  vocab_size: int
  num_classes: int
  tie_embeddings: bool = True
  max_len: int = 0

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool = False, decode: bool = False,
               num_new=None) -> jax.Array:
    """`inputs [B, T]` int → logits `[B, T, C]`; `num_new [B]`: with paged KV caches, the tokens each
    row appends (the rest of its T are padding; see `attnjax.models.paged_generate`)."""
    cfg = self.config
    if self.tie_embeddings and self.num_classes != self.vocab_size:
      raise ValueError(f"DecoderLM: tied embeddings need num_classes == vocab_size, got "
                       f"{self.num_classes} and {self.vocab_size}")
    embed = nn.Embed(self.vocab_size, cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     embedding_init=blocks.logical(nn.initializers.normal(1.0), "vocab", "embed"),
                     name="embed")
    x = embed(inputs.astype(jnp.int32))
    if self.max_len:
      x = x + self._positions(inputs.shape[1], decode, num_new).astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if cfg.dropout:
      x = nn.Dropout(cfg.dropout)(x, deterministic=not train)
    x = blocks.Transformer(cfg, name="decoder")(x, train=train, decode=decode, num_new=num_new)
    if self.tie_embeddings:
      logits = embed.attend(x) / jnp.sqrt(jnp.asarray(cfg.width, x.dtype))
    else:
      logits = nn.Dense(self.num_classes, use_bias=False, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype,
                        kernel_init=blocks.logical(nn.initializers.lecun_normal(), "embed",
                                                   "vocab"),
                        name="logits")(x)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    # Losses and sampling want float32 logits whatever the compute dtype.
    return logits.astype(jnp.float32)

  def _positions(self, length: int, decode: bool, num_new=None) -> jax.Array:
    """Learned position embeddings `[1, T, D]` of the current positions (offset by the cache);
    `[B, T, D]` when the index is kept per row (paged caches: it grows by `num_new`)."""
    table = self.param("pos_embed", blocks.logical(nn.initializers.normal(0.02), "position", "embed"),
                       (self.max_len, self.config.width), self.config.param_dtype)
    if length > self.max_len:
      raise ValueError(f"DecoderLM: {length} tokens exceed the {self.max_len} learned positions "
                       "(max_len)")
    start = jnp.zeros((), jnp.int32)
    if decode:
      # Like the attention caches: the first (init) call only creates the index.
      initialized = self.has_variable("cache", "position_index")
      index = self.variable("cache", "position_index", lambda: jnp.zeros((), jnp.int32))
      if initialized and index.value.ndim == 1:
        start = index.value
        index.value = start + (length if num_new is None else jnp.asarray(num_new, jnp.int32))
        # Positions past the table (padding of short rows) read its last row; they are never used.
        pos = jnp.minimum(start[:, None] + jnp.arange(length, dtype=jnp.int32), self.max_len - 1)
        return table[pos]
      if initialized:
        start = index.value
        index.value = start + length
    # Callers keep start + length <= max_len (generate checks it); dynamic_slice would clamp.
    return jax.lax.dynamic_slice_in_dim(table, start, length)[None]

