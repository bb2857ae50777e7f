"""SepFormer's dual-path chunked attention: intra-chunk then inter-chunk transformers (Flax Linen).

    chunks = segment(x, C)                       x [B, L, D] → [B, C, S, D], hop P = C/2, S chunks
    for each dual-path block:
      intra = Norm(IntraT(chunks)) + chunks      IntraT: a Transformer over the C positions of each chunk
      chunks = Norm(InterT(intra)) + intra       InterT: a Transformer over the S chunks at each of
                                                 the C within-chunk positions
    y = overlap_add(chunks)                      [B, C, S, D] → [B, L, D]

Segmentation (speechbrain's `Dual_Path_Model._padding` / `_Segmentation`): the sequence gets
`gap = C - (P + L mod C) mod C` zeros at its end (1 ≤ gap ≤ C) and P zeros on each side, so its
length L + gap + 2P is a multiple of C plus P; chunk j covers padded positions [jP, jP + C), giving
S = 2 (L + gap + P) / C chunks, each real token in exactly two of them. Overlap-add (`_over_add`) sums
the two chunk entries of each position (no window, no averaging) and drops the padding, so the
segmentation followed by overlap-add of unchanged chunks is 2x: the scale is the network's to learn,
as in SepFormer and DPRNN.

A dual-path block is speechbrain's `Dual_Computation_Block`: each path folds the other chunk axis
into the batch, adds the sinusoidal positional encoding of its own axis (SepFormer's
`SBTransformerBlock(use_positional_encoding=True)`, `PositionalEncoding`: sin on even, cos on odd
features, base 10000), runs a pre-norm Transformer with a final norm (`TransformerEncoder(
normalize_before=True)`; here this library's `Transformer` over any registered non-causal mechanism),
optionally a linear layer (`linear_layer_after_inter_intra`, False in SepFormer), then the path's norm
("ln": `GroupNorm(1, D, eps=1e-8)`, statistics over all chunks, positions and features of an
example; "cln": a LayerNorm per position, eps 1e-8; None) and the residuals above
(`skip_around_intra`; the inter path's residual is always there). Shapes in the paper: C = 250, two
blocks of 8-layer transformers of width 256, 8 heads, feed-forward 1024.

Interpretations: as in SepFormer, padded positions are zeros that take part in attention and in the
"ln" statistics (no masking); a batch is padded to one length by the caller. The paper's MLP is ReLU;
this library's blocks offer GELU or SwiGLU (`TransformerConfig.mlp`). The SepFormer mask network
around the dual-path part (input norm and 1x1 convolutions, PReLU, per-speaker masks and gated output)
is the speech-separation model, not the attention, and is left out.

Paper: Subakan et al., "Attention is All You Need in Speech Separation", arXiv:2010.13154 (SepFormer);
the dual-path segmentation is Luo et al., "Dual-path RNN", arXiv:1910.06379.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.nn.blocks import Transformer, TransformerConfig

__all__ = ["ChunkPath", "DualPathBlock", "DualPathChunkedAttention", "NORMS", "overlap_add",
           "segment"]

NORMS = ("ln", "cln", None)
_PATHS = ("intra", "inter")


def _check_chunk_size(op: str, chunk_size: int):
  if not isinstance(chunk_size, int) or chunk_size < 2 or chunk_size % 2:
    raise ValueError(f"{op}: `chunk_size` must be an even int >= 2 (hop chunk_size / 2), got "
                     f"{chunk_size!r}")


def segment(x: jax.Array, chunk_size: int) -> tuple[jax.Array, int]:
  """`x [B, L, D]` → (`chunks [B, C, S, D]`, `gap`): chunks of C = `chunk_size` with hop C/2 over the
  zero-padded sequence (module docstring); `gap` is the padding added at the end."""
  _check_chunk_size("segment", chunk_size)
  if jnp.ndim(x) != 3:
    raise ValueError(f"segment: `x` must have shape [B, L, D], got {jnp.shape(x)}")
  B, L, D = x.shape
  C, P = chunk_size, chunk_size // 2
  gap = C - (P + L % C) % C
  padded = jnp.pad(x, ((0, 0), (P, gap + P), (0, 0)))
  # As `_Segmentation`: the chunks at offsets 0, C, 2C, ... and P, P + C, ..., interleaved.
  first = padded[:, :-P].reshape(B, -1, C, D)
  second = padded[:, P:].reshape(B, -1, C, D)
  chunks = jnp.stack([first, second], axis=2).reshape(B, -1, C, D)
  return jnp.swapaxes(chunks, 1, 2), gap


def overlap_add(chunks: jax.Array, gap: int) -> jax.Array:
  """`chunks [B, C, S, D]` (as made by `segment`) → `[B, L, D]`: each position the sum of its two
  chunk entries, padding dropped (speechbrain's `_over_add`)."""
  if jnp.ndim(chunks) != 4 or chunks.shape[1] < 2 or chunks.shape[1] % 2 or chunks.shape[2] % 2:
    raise ValueError(f"overlap_add: `chunks` must have shape [B, C, S, D] with C and S even, got "
                     f"{jnp.shape(chunks)}")
  B, C, _, D = chunks.shape
  P = C // 2
  chunks = jnp.swapaxes(chunks, 1, 2)                             # [B, S, C, D]
  even = chunks[:, 0::2].reshape(B, -1, D)[:, P:]
  odd = chunks[:, 1::2].reshape(B, -1, D)[:, :-P]
  out = even + odd
  return out[:, :out.shape[1] - gap]


def _sinusoid(length: int, width: int) -> jax.Array:
  """speechbrain's `PositionalEncoding`: pe[t, 2i] = sin(t ω_i), pe[t, 2i+1] = cos(t ω_i),
  ω_i = 10000^(-2i / width); `[length, width]` float32."""
  t = jnp.arange(length, dtype=jnp.float32)[:, None]
  omega = jnp.exp(jnp.arange(0, width, 2, dtype=jnp.float32) * -(math.log(10000.0) / width))
  pe = jnp.zeros((length, width), jnp.float32)
  pe = pe.at[:, 0::2].set(jnp.sin(t * omega))
  return pe.at[:, 1::2].set(jnp.cos(t * omega)[:, :width // 2])


class ChunkPath(nn.Module):
  """One path of a dual-path block, without its norm: `[B, C, S, D] → [B, C, S, D]`.

  "intra": each chunk is a sequence over its C positions; "inter": each within-chunk position is a
  sequence over the S chunks. The other axis is folded into the batch, so nothing mixes across it.

  Attributes:
    config: the path's `TransformerConfig` (non-causal; width D).
    kind: "intra" or "inter".
    positional_encoding: add the sinusoidal encoding of the path's axis before the Transformer.
    linear: a linear layer after the Transformer (SepFormer: False).
  """
  config: TransformerConfig
  kind: str
  positional_encoding: bool = True
  linear: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.kind not in _PATHS:
      raise ValueError(f"ChunkPath: `kind` must be one of {_PATHS}, got {self.kind!r}")
    if jnp.ndim(x) != 4:
      raise ValueError(f"ChunkPath: `x` must have shape [B, C, S, D], got {jnp.shape(x)}")
    B, C, S, D = x.shape
    if self.kind == "intra":
      seq = jnp.swapaxes(x, 1, 2).reshape(B * S, C, D)
    else:
      seq = x.reshape(B * C, S, D)
    if self.positional_encoding:
      seq = seq + _sinusoid(seq.shape[1], D).astype(seq.dtype)
    y = Transformer(self.config, name="transformer")(seq, train=train)
    if self.linear:
      y = nn.Dense(D, dtype=self.config.dtype, param_dtype=self.config.param_dtype,
                   name="linear")(y)
    if self.kind == "intra":
      return jnp.swapaxes(y.reshape(B, S, C, D), 1, 2)
    return y.reshape(B, C, S, D)


class DualPathBlock(nn.Module):
  """speechbrain's `Dual_Computation_Block` on chunks `[B, C, S, D]` (module docstring).

  Attributes:
    config: the intra path's `TransformerConfig`.
    inter_config: the inter path's (None: the same hyper-parameters, separate weights).
    norm: "ln" (GroupNorm with one group), "cln" (LayerNorm per position) or None.
    skip_around_intra: the residual around the intra path.
    linear: a linear layer after each path's Transformer.
    positional_encoding: sinusoidal encodings along each path's axis.
  """
  config: TransformerConfig
  inter_config: Optional[TransformerConfig] = None
  norm: Optional[str] = "ln"
  skip_around_intra: bool = True
  linear: bool = False
  positional_encoding: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.norm not in NORMS:
      raise ValueError(f"DualPathBlock: `norm` must be one of {NORMS}, got {self.norm!r}")
    configs = {"intra": self.config, "inter": self.inter_config or self.config}
    for name, cfg in configs.items():
      if cfg.causal:
        raise ValueError(f"DualPathBlock: the {name} path's TransformerConfig must be non-causal "
                         "(causal=False): both paths attend over whole chunks")
      if cfg.width != x.shape[-1]:
        raise ValueError(f"DualPathBlock: the {name} path's width ({cfg.width}) must equal the "
                         f"features D of x {jnp.shape(x)}")

    def path(name, a):
      y = ChunkPath(configs[name], name, positional_encoding=self.positional_encoding,
                    linear=self.linear, name=name)(a, train=train)
      if self.norm == "ln":
        return nn.GroupNorm(num_groups=1, epsilon=1e-8, name=f"{name}_norm")(y)
      if self.norm == "cln":
        return nn.LayerNorm(epsilon=1e-8, name=f"{name}_norm")(y)
      return y

    intra = path("intra", x)
    if self.skip_around_intra:
      intra = intra + x
    return path("inter", intra) + intra


@catalog.serves(239, kind="layer")
class DualPathChunkedAttention(nn.Module):
  """SepFormer's dual-path processing: segment, dual-path blocks, overlap-add: `[B, L, D] → [B, L, D]`.

  Attributes:
    chunk_size: C, even (hop C/2; SepFormer: 250).
    config: the intra paths' `TransformerConfig` (non-causal; width D; SepFormer: 8 layers).
    inter_config: the inter paths' (None: the same hyper-parameters).
    num_blocks: dual-path blocks (SepFormer: 2).
    norm, skip_around_intra, linear, positional_encoding: as in `DualPathBlock`.
  """
  chunk_size: int
  config: TransformerConfig
  inter_config: Optional[TransformerConfig] = None
  num_blocks: int = 1
  norm: Optional[str] = "ln"
  skip_around_intra: bool = True
  linear: bool = False
  positional_encoding: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    owner = "DualPathChunkedAttention"
    _check_chunk_size(owner, self.chunk_size)
    if jnp.ndim(x) != 3:
      raise ValueError(f"{owner}: `x` must have shape [B, L, D], got {jnp.shape(x)}")
    chunks, gap = segment(x, self.chunk_size)
    for i in range(self.num_blocks):
      chunks = DualPathBlock(self.config, self.inter_config, norm=self.norm,
                             skip_around_intra=self.skip_around_intra, linear=self.linear,
                             positional_encoding=self.positional_encoding,
                             name=f"block_{i}")(chunks, train=train)
    return overlap_add(chunks, gap)
