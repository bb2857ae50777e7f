"""Pervasive Attention as a sequence model (arch "pervasive"): a source and a target sequence in one
token row, joined by a 2-D convolutional network over their (target, source) grid.

    inputs [B, T] = [ x_1 … x_S | t_0 … t_{T-S-1} ]          source (source_len S), then the target
                                                             side shifted right (t_0 a separator)
    s_j = sqrt(D) E_s[x_j],  u_i = sqrt(D) E_t[t_i]           two embeddings of width D
    h_i = PervasiveAttention( [s_j ; u_i] over i, j )         attnjax.vision.conv.pervasive
    logits_{S+i} = W_o (W_p h_i)                              W_p: [C_h, D]; W_o = E_tᵀ (tied) or its
                                                              own [D, num_classes]
    logits_p = 0 for p < S                                    (no prediction at source positions)

`inputs [B, T] int32 -> logits [B, T, num_classes] float32`. Row S + i predicts the token after
t_i (the task's target there) from t_0 … t_i and the whole source: the grid network is causal along
the target axis, so no other mask is needed. The source positions' logits are zeros (uniform); a
task must give them zero loss weight, as the sequence-to-sequence tasks do (e.g. "sorting": T/2
tokens, a separator, the same tokens sorted, weights on the sorted half; source_len = T/2).

Embeddings are scaled by sqrt(D) and drawn from N(0, 1/D), dropout applies to both embeddings and
to the prediction layer's input, as in the authors' fairseq model. Paper: Elbayad, Besacier and
Verbeek, "Pervasive Attention: 2D Convolutional Neural Networks for Sequence-to-Sequence
Prediction", arXiv:1808.03867.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from attnjax.typing import Array, Float, Int
from attnjax.vision.conv import pervasive

__all__ = ["PervasiveSeq2Seq"]

Tokens = Int[Array, "B T"]
Logits = Float[Array, "B T num_classes"]


class PervasiveSeq2Seq(nn.Module):
  """Source-then-target token rows -> per-position logits (module docstring).

  Attributes:
    vocab_size: V, input tokens (both sides).
    num_classes: output classes per position (V when tied).
    source_len: S, the source tokens at the start of every row (1 ≤ S < T).
    embed_dim: D, each side's embedding width (the grid has 2D channels).
    num_layers, growth_rate, kernel_size: the DenseNet's L, g and k (k odd).
    tie_embeddings: logits through the target embedding.
    dropout: on the embeddings and before the output layer, with `train=True`.
  """
  vocab_size: int
  num_classes: int
  source_len: int
  embed_dim: int = 128
  num_layers: int = 24
  growth_rate: int = 32
  kernel_size: int = 3
  tie_embeddings: bool = False
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Tokens, *, train: bool = False) -> Logits:
    if jnp.ndim(inputs) != 2 or not 1 <= self.source_len < inputs.shape[1]:
      raise ValueError(f"PervasiveSeq2Seq: inputs must be [B, T] with T > source_len = "
                       f"{self.source_len}, got shape {jnp.shape(inputs)}")
    if self.tie_embeddings and self.num_classes != self.vocab_size:
      raise ValueError(f"PervasiveSeq2Seq: tied embeddings need num_classes == vocab_size, got "
                       f"{self.num_classes} and {self.vocab_size}")
    D, S = self.embed_dim, self.source_len
    init = nn.initializers.normal(stddev=D ** -0.5)
    embed = lambda name: nn.Embed(self.vocab_size, D, embedding_init=init, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=name)
    target_embed = embed("target_embed")
    drop = nn.Dropout(self.dropout, deterministic=not train)
    source = drop(math.sqrt(D) * embed("source_embed")(inputs[:, :S]))
    target = drop(math.sqrt(D) * target_embed(inputs[:, S:]))
    h = pervasive.PervasiveAttention(
        num_layers=self.num_layers, growth_rate=self.growth_rate, kernel_size=self.kernel_size,
        param_dtype=self.param_dtype, name="grid")(pervasive.pervasive_grid(target, source))
    h = drop(nn.Dense(D, dtype=self.dtype, param_dtype=self.param_dtype, name="project")(h))
    if self.tie_embeddings:
      logits = target_embed.attend(h)
    else:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="predict")(h)
    logits = logits.astype(jnp.float32)
    return jnp.concatenate([jnp.zeros((inputs.shape[0], S, logits.shape[-1]), jnp.float32), logits],
                           axis=1)
