"""Label attention layer (LAL): each head is a label with a learned query vector (no query
projection); its attention over the words gives one label vector, added back into every word.

Mrini, Dernoncourt, Tran, Bui, Chang, Nakashole, "Rethinking Self-Attention: Towards
Interpretability in Neural Parsing", arXiv:1911.03875. Following the authors' `LabelAttention`
(KhalilMrini/LAL-Parser, `src_joint/KM_parser.py`; learned query vectors, not partitioned, labels
kept apart rather than combined as in self-attention), for words x_t [D] and L labels:

    a_l   = softmax_t( q_l · (x_t W^K_l) / sqrt(D) )        q_l [d_k]: no query matrix; the code's
                                                            temperature is sqrt(d_model)
    o_l   = Σ_t a_l,t (x_t W^V_l)                           one vector per label      [d_v]
    y_t,l = LN( (o_l W_O + x_t) W_R )                       the label's vector added to each word,
                                                            reduced to d_proj, layer-normalized
    y_t   = [y_t,1, ..., y_t,L]                             [L · d_proj]

The label attention weights a_l are what the paper reads for interpretability: which words each
label looks at. The layer norm is the parser's (unbiased standard deviation, ε = 1e-3 added to it).

Shapes: `x [B, T, D]` (optional `mask [B, T]`) → `[B, T, L·d_proj]`; `return_weights` also gives
`a [B, L, T]`.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.typing import Array, Bool, Float

__all__ = ["LabelAttention", "label_attention"]

Words = Float[Array, "B T D"]
WordMask = Bool[Array, "B T"]
_LN_EPS = 1e-3


def _parser_layer_norm(z, scale, bias):
  mu = jnp.mean(z, axis=-1, keepdims=True)
  sigma = jnp.std(z, axis=-1, keepdims=True, ddof=1)
  return (z - mu) / (sigma + _LN_EPS) * scale + bias


def label_attention(x: Words, mask: Optional[WordMask] = None, *, query, key, value, out, reduce,
                    norm_scale, norm_bias, return_weights: bool = False):
  """LAL (module docstring). `query [L, d_k]`, `key [L, D, d_k]`, `value [L, D, d_v]`, `out
  [d_v, D]`, `reduce [D, P]`, `norm_scale`, `norm_bias` `[P]`."""
  op = "label_attention"
  if jnp.ndim(x) != 3:
    raise ValueError(f"{op}: `x` must be [B, T, D], got shape {jnp.shape(x)}")
  b, t, d = x.shape
  if mask is not None and jnp.shape(mask) != (b, t):
    raise ValueError(f"{op}: `mask` must be [B, T] = [{b}, {t}], got shape {jnp.shape(mask)}")
  num_labels = jnp.shape(query)[0]
  if jnp.ndim(key) != 3 or key.shape[:2] != (num_labels, d):
    raise ValueError(f"{op}: `key` must be [L, D, d_k] = [{num_labels}, {d}, d_k], got shape "
                     f"{jnp.shape(key)}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  h = x.astype(jnp.float32)
  k = jnp.einsum("btd,ldk->bltk", h, f32(key))
  v = jnp.einsum("btd,ldv->bltv", h, f32(value))
  logits = jnp.einsum("lk,bltk->blt", f32(query), k) / jnp.sqrt(jnp.float32(d))
  if mask is not None:
    keep = mask[:, None, :]
    a = jnp.where(keep, jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1, where=keep), 0.0)
  else:
    a = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("blt,bltv->blv", a, v) @ f32(out)                        # [B, L, D]
  y = (o[:, None, :, :] + h[:, :, None, :]) @ f32(reduce)                 # [B, T, L, P]
  y = _parser_layer_norm(y, f32(norm_scale), f32(norm_bias)).reshape(b, t, -1).astype(x.dtype)
  return (y, a) if return_weights else y


class LabelAttention(nn.Module):
  """Creates LAL's weights (`num_labels` labels, `d_kv` key/value width, `d_proj` per label;
  Xavier-normal as the code) and calls `label_attention(x, mask)`."""
  num_labels: int = 8
  d_kv: int = 16
  d_proj: int = 8

  @nn.compact
  def __call__(self, x: Words, mask: Optional[WordMask] = None):
    d = x.shape[-1]
    xavier = nn.initializers.xavier_normal()
    return label_attention(
        x, mask,
        query=self.param("query", xavier, (self.num_labels, self.d_kv)),
        key=self.param("key", xavier, (self.num_labels, d, self.d_kv)),
        value=self.param("value", xavier, (self.num_labels, d, self.d_kv)),
        out=self.param("out", nn.initializers.lecun_normal(), (self.d_kv, d)),
        reduce=self.param("reduce", nn.initializers.lecun_normal(), (d, self.d_proj)),
        norm_scale=self.param("norm_scale", nn.initializers.ones, (self.d_proj,)),
        norm_bias=self.param("norm_bias", nn.initializers.zeros, (self.d_proj,)))


modules.register_module(modules.Module(
    name="label_attention", fn=label_attention, linen=LabelAttention, kind="signal",
    family="cross-attention", seeds=(35,),
    paper="Rethinking Self-Attention: Towards Interpretability in Neural Parsing",
    arxiv="1911.03875", keeps_shape=False,
    out_shape=lambda s, st: (s[0], s[1], st.get("num_labels", 8) * st.get("d_proj", 8)),
    example={"num_labels": 3, "d_kv": 6, "d_proj": 4}))
