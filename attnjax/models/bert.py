"""A BERT-style encoder (post-norm transformer) over any registered attention mechanism, the shape of
the pretrained sentence encoders `attnjax.pretrained` loads.

    x_0 = LN(E_word[tokens] + E_pos[0 … T-1] + E_type[0])
    a_l = MultiHeadAttention_l(x_{l-1}; keys past each row's length hidden)
    h_l = LN(x_{l-1} + a_l)
    x_l = LN(h_l + W₂ gelu(W₁ h_l + b₁) + b₂)              GELU with erf, as BERT's "gelu"

`tokens [B, T] int32`, `lengths [B]` (the real tokens of each right-padded row) -> `[B, T, D]`
float32. The attention of every layer is `attnjax.nn.MultiHeadAttention` with the mechanism by name
(softmax by default), so a registered mechanism can stand in for the trained one, and its maps are
captured like any model's (`attnjax.analysis.capture(model, variables, tokens, lengths)`).

Parameter names follow the layer's own (`query`, `key`, `value`, `out` DenseGeneral kernels
`[D, N, H]`, `[N, H, D]`); `attnjax.pretrained` maps a Hugging Face BERT state dict onto them.
Paper: Devlin, Chang, Lee and Toutanova, "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding", arXiv:1810.04805.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.nn.attention import MultiHeadAttention
from attnjax.typing import Array, Float, Int

__all__ = ["BertEncoder"]

Tokens = Int[Array, "B T"]
Lengths = Int[Array, "B"]
Hidden = Float[Array, "B T D"]


class BertLayer(nn.Module):
  """One post-norm encoder layer (module docstring)."""
  num_heads: int
  mlp_dim: int
  eps: float
  mechanism: str
  mechanism_kwargs: Optional[Mapping[str, Any]]

  @nn.compact
  def __call__(self, x, lengths):
    a = MultiHeadAttention(num_heads=self.num_heads, mechanism=self.mechanism,
                           mechanism_kwargs=self.mechanism_kwargs, name="attention")(
                               x, kv_lengths=lengths)
    h = nn.LayerNorm(epsilon=self.eps, name="attention_norm")(x + a)
    f = nn.Dense(self.mlp_dim, name="intermediate")(h)
    f = nn.Dense(x.shape[-1], name="output")(jax.nn.gelu(f, approximate=False))
    return nn.LayerNorm(epsilon=self.eps, name="output_norm")(h + f)


class BertEncoder(nn.Module):
  """Embeddings and `depth` post-norm layers (module docstring).

  Attributes:
    vocab_size, max_len, type_vocab_size: the embedding tables' sizes.
    width, depth, num_heads, mlp_dim: D, layers, N heads, the MLP's hidden width.
    eps: the layer norms' ε (BERT's 1e-12).
    mechanism, mechanism_kwargs: the registry mechanism of every layer and its settings.
  """
  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  type_vocab_size: int = 2
  eps: float = 1e-12
  mechanism: str = "softmax"
  mechanism_kwargs: Optional[Mapping[str, Any]] = None

  @nn.compact
  def __call__(self, tokens: Tokens, lengths: Lengths) -> Hidden:
    if jnp.ndim(tokens) != 2 or jnp.shape(lengths) != jnp.shape(tokens)[:1]:
      raise ValueError(f"BertEncoder: tokens must be [B, T] and lengths [B], got {jnp.shape(tokens)} "
                       f"and {jnp.shape(lengths)}")
    T = tokens.shape[1]
    if T > self.max_len:
      raise ValueError(f"BertEncoder: {T} tokens exceed the {self.max_len} learned positions")
    embed = lambda n, name: nn.Embed(n, self.width, name=name)
    x = (embed(self.vocab_size, "word_embeddings")(tokens)
         + embed(self.max_len, "position_embeddings")(jnp.arange(T))[None]
         + embed(self.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(tokens)))
    x = nn.LayerNorm(epsilon=self.eps, name="embedding_norm")(x)
    for i in range(self.depth):
      x = BertLayer(self.num_heads, self.mlp_dim, self.eps, self.mechanism, self.mechanism_kwargs,
                    name=f"layer_{i}")(x, lengths)
    return x
