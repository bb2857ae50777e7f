"""NeuFA's bidirectional attention: one score matrix between two sequences, normalized over each of
its two axes, so that each sequence is read at the other's positions with a shared alignment.

Li, Wu, Li, Li, Lu, Meng, Xu, Wang, "NeuFA: Neural Network Based End-to-End Forced Alignment with
Bidirectional Attention Mechanism", arXiv:2203.16838. Following the authors' `BidirectionalAttention`
(thuhcsi/NeuFA, `model/attention.py`): with keys `k_a [T_a, D_a]` (text) and `k_b [T_b, D_b]`
(speech), values `v_a`, `v_b`,

    A   = (k_a W_a + b_a)(k_b W_b + b_b)ᵀ                          [T_a, T_b]   one score matrix
    P   = softmax of A over the b axis (each a-token's distribution over b)     rows sum to 1
    Q   = softmax of A over the a axis (each b-token's distribution over a)     columns sum to 1
    a_at_b = Pᵀ v_a   [T_b, d_a]   (the code's o1 = softmax(Aᵀ, dim=1) v1: text at each frame, the
                                    TTS direction)
    b_at_a = Q v_b    [T_a, d_b]   (o2 = softmax(A, dim=1) v2: speech at each text token, the ASR
                                    direction)

returned with the maps w1 = Pᵀ `[T_b, T_a]` and w2 = Q `[T_a, T_b]`, as the code returns them. Each
output is spread with the weights the other direction normalizes: a text token's distribution over the
frames places its value on those frames. The alignment the paper extracts reads both maps;
`diagonal_attention_loss` is the authors' prior that pushes their elementwise maximum toward the
diagonal. Padding (`lengths_a`, `lengths_b`): pairs with a padded side are masked, and padded rows and
columns are zero (the code masks pairs where exactly one side is padded and leaves padded-with-padded
pairs in; here those are masked too, so padding never enters a valid token's output).

Shapes: `keys_a [B, T_a, D_a]`, `keys_b [B, T_b, D_b]`, `values_a [B, T_a, d_a]`, `values_b
[B, T_b, d_b]`, `proj_a [D_a, A]`, `proj_b [D_b, A]`, biases `[A]`.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.core import pooling
from attnjax.typing import Array, Float, Int

__all__ = ["BidirectionalSharedAttention", "bidirectional_shared_attention",
           "diagonal_attention_loss"]

SeqA = Float[Array, "B Ta Da"]
SeqB = Float[Array, "B Tb Db"]
ValuesA = Float[Array, "B Ta da"]
ValuesB = Float[Array, "B Tb db"]
MapBA = Float[Array, "B Tb Ta"]
MapAB = Float[Array, "B Ta Tb"]
Lengths = Int[Array, "B"]
# The authors' loss: tanh(0.5 · (max ratio of relative positions − 1)).
LOSS_ALPHA = 0.5
# The authors' relative positions run over linspace(1e-6, 1, T) (no division by zero).
_POSITION_FLOOR = 1e-6


def _valid(lengths, B, T):
  if lengths is None:
    return jnp.ones((B, T), bool)
  return jnp.arange(T)[None] < jnp.asarray(lengths)[:, None]


def _check(op, name, x, rank_desc, B=None, T=None):
  if jnp.ndim(x) != 3 or (B is not None and x.shape[0] != B) or (T is not None and x.shape[1] != T):
    raise ValueError(f"{op}: `{name}` must be {rank_desc}, got shape {jnp.shape(x)}")



def bidirectional_shared_attention(keys_a: SeqA, keys_b: SeqB, values_a: ValuesA, values_b: ValuesB,
                                   *, proj_a, bias_a, proj_b, bias_b,
                                   lengths_a: Optional[Lengths] = None,
                                   lengths_b: Optional[Lengths] = None):
  """NeuFA bidirectional attention (module docstring): returns `(a_at_b [B,T_b,d_a], b_at_a
  [B,T_a,d_b], w1 [B,T_b,T_a], w2 [B,T_a,T_b])`, in the dtype of `values_a` / `values_b`."""
  op = "bidirectional_shared_attention"
  _check(op, "keys_a", keys_a, "[B, T_a, D_a]")
  B, Ta = keys_a.shape[:2]
  _check(op, "keys_b", keys_b, f"[B, T_b, D_b] with B = {B}", B=B)
  Tb = keys_b.shape[1]
  _check(op, "values_a", values_a, f"[B, T_a, d_a] = [{B}, {Ta}, d_a]", B=B, T=Ta)
  _check(op, "values_b", values_b, f"[B, T_b, d_b] = [{B}, {Tb}, d_b]", B=B, T=Tb)
  A = jnp.shape(proj_a)[-1]
  for name, w, want in (("proj_a", proj_a, (keys_a.shape[2], A)),
                        ("proj_b", proj_b, (keys_b.shape[2], A)),
                        ("bias_a", bias_a, (A,)), ("bias_b", bias_b, (A,))):
    if jnp.shape(w) != want:
      raise ValueError(f"{op}: `{name}` must have shape {list(want)}, got {list(jnp.shape(w))}")
  for name, lengths in (("lengths_a", lengths_a), ("lengths_b", lengths_b)):
    if lengths is not None and jnp.shape(lengths) != (B,):
      raise ValueError(f"{op}: `{name}` must be [B] = [{B}], got shape {jnp.shape(lengths)}")
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  ka = f32(keys_a) @ f32(proj_a) + f32(bias_a)
  kb = f32(keys_b) @ f32(proj_b) + f32(bias_b)
  scores = jnp.einsum("bia,bja->bij", ka, kb)                               # [B, T_a, T_b]
  keep = _valid(lengths_a, B, Ta)[:, :, None] & _valid(lengths_b, B, Tb)[:, None, :]
  rows = pooling.masked_softmax(scores, keep, axis=2)       # P: each a-token over b
  cols = pooling.masked_softmax(scores, keep, axis=1)       # Q: each b-token over a
  w1, w2 = jnp.swapaxes(rows, 1, 2), cols
  a_at_b = jnp.einsum("bji,bid->bjd", w1, f32(values_a)).astype(values_a.dtype)
  b_at_a = jnp.einsum("bij,bjd->bid", w2, f32(values_b)).astype(values_b.dtype)
  return a_at_b, b_at_a, w1, w2


def _relative_positions(lengths, T, B):
  """`linspace(1e-6, 1, length)` per example, padded positions 1 (masked by the caller)."""
  n = jnp.full((B,), T) if lengths is None else jnp.asarray(lengths)
  i = jnp.arange(T, dtype=jnp.float32)[None]
  step = (1.0 - _POSITION_FLOOR) / jnp.maximum(n - 1, 1).astype(jnp.float32)[:, None]
  return jnp.minimum(_POSITION_FLOOR + i * step, 1.0)


def diagonal_attention_loss(w1: MapBA, w2: MapAB, *, lengths_a: Optional[Lengths] = None,
                            lengths_b: Optional[Lengths] = None, alpha: float = LOSS_ALPHA):
  """The authors' alignment prior (`NeuFA_base.attention_loss`): with w = max(w1ᵀ, w2) and relative
  positions x_i, y_j = linspace(1e-6, 1) over each sequence's valid length,

      loss = mean_b mean_{i<l_a, j<l_b} w_ij · tanh(α (max(x_i / y_j, y_j / x_i) − 1))

  zero weight on the diagonal x_i = y_j and growing with the ratio off it (no gradient through the
  penalty, as the code detaches it)."""
  B, Ta, Tb = jnp.shape(w2)
  if jnp.shape(w1) != (B, Tb, Ta):
    raise ValueError(f"diagonal_attention_loss: `w1` must be [B, T_b, T_a] = [{B}, {Tb}, {Ta}], "
                     f"got shape {jnp.shape(w1)}")
  w = jnp.maximum(jnp.swapaxes(w1, 1, 2), w2).astype(jnp.float32)
  x = _relative_positions(lengths_a, Ta, B)[:, :, None]
  y = _relative_positions(lengths_b, Tb, B)[:, None, :]
  penalty = jax.lax.stop_gradient(jnp.tanh(alpha * (jnp.maximum(x / y, y / x) - 1.0)))
  keep = _valid(lengths_a, B, Ta)[:, :, None] & _valid(lengths_b, B, Tb)[:, None, :]
  per_example = jnp.sum(jnp.where(keep, w * penalty, 0.0), axis=(1, 2)) / jnp.sum(keep, axis=(1, 2))
  return jnp.mean(per_example)


@catalog.serves(17, kind="layer")
class BidirectionalSharedAttention(nn.Module):
  """Creates the two key projections to `attention_dim` (PyTorch `nn.Linear`'s uniform init, as the
  authors' layers) and calls `bidirectional_shared_attention`."""
  attention_dim: int = 128

  @nn.compact
  def __call__(self, keys_a: SeqA, keys_b: SeqB, values_a: ValuesA, values_b: ValuesB,
               lengths_a: Optional[Lengths] = None, lengths_b: Optional[Lengths] = None):

    def linear(name, fan_in):
      bound = fan_in ** -0.5
      init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(  # noqa: E731
          key, shape, dtype, -bound, bound)
      return (self.param(f"proj_{name}", init, (fan_in, self.attention_dim)),
              self.param(f"bias_{name}", init, (self.attention_dim,)))

    proj_a, bias_a = linear("a", keys_a.shape[-1])
    proj_b, bias_b = linear("b", keys_b.shape[-1])
    return bidirectional_shared_attention(keys_a, keys_b, values_a, values_b, proj_a=proj_a,
                                          bias_a=bias_a, proj_b=proj_b, bias_b=bias_b,
                                          lengths_a=lengths_a, lengths_b=lengths_b)
