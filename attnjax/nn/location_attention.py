"""Location-relative decoder attention layers: GMM attention and Dynamic Convolution Attention (DCA).

Both read a memory `h [B, S, h]` (e.g. a TTS encoder's output) from decoder queries `s [B, T, D_q]`
(e.g. the attention RNN's state) with no content-based q·k term; the alignment moves along the
memory by the mechanisms of attnjax/ops/positional/location.py (formulas there):

    GMMAttention:                 (ŵ, Δ̂, σ̂) = V tanh(W s + b) + c      [B, T, 3, M]
                                  α_i: M Gaussians whose means step forward by Δ ≥ 0
    DynamicConvolutionAttention:  G(s) = W_G tanh(W_s s + b_s)           [B, T, F_d, W_d]
                                  e_ij = vᵀ tanh(U (F ∗ α_(i-1))_j + T (G ∗ α_(i-1))_j + b)
                                         + log(P ∗ α_(i-1))_j,   α_i = softmax(e_i)

`__call__(queries, memory, kv_lengths=None, state=None)` runs `T` decoder steps from `state` (None:
the start, means at 0 / alignment one-hot at slot 0) and returns `(contexts [B, T, h], alignments
[B, T, S], state)`; an autoregressive decoder calls it with `T = 1` and carries the state (the
queries of later steps depend on earlier contexts), and calling step by step equals one call over
all steps.

Defaults are the paper's (5 components; DCA: attention dim 128, 8 static and 8 dynamic filters of
width 21, prior of length 11 with a = 0.1, b = 0.9). GMMAttention's output biases start Δ̂ at 1 and
σ̂ at 10 ("GMMv2b": initial biases so alignment moves and the components are wide at the start of
training; the values are Coqui TTS's, whose GravesAttention follows the paper).

Paper: Battenberg et al., "Location-Relative Attention Mechanisms For Robust Long-Form Speech
Synthesis", arXiv:1910.10288.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.ops.positional import location

__all__ = ["DynamicConvolutionAttention", "GMMAttention"]


def _check(name: str, queries, memory):
  if jnp.ndim(queries) != 3 or jnp.ndim(memory) != 3 or queries.shape[0] != memory.shape[0]:
    raise ValueError(f"{name}: `queries` must have shape [B, T, D_q] and `memory` [B, S, h] with "
                     f"the same B, got {jnp.shape(queries)} and {jnp.shape(memory)}")


@catalog.serves(12, kind="layer")
class GMMAttention(nn.Module):
  """GMM attention (Graves; the paper's V0 / V1 / V2 parameterizations) from decoder queries.

  Attributes:
    num_mixtures: M, the Gaussian components.
    hidden_dim: width of the MLP's tanh layer (None: the query width).
    version: "v2" (softplus mean steps and widths, normalized components; the paper's choice),
      "v1" or "v0" (Graves).
    delta_bias, sigma_bias: initial output biases of Δ̂ and σ̂ (ŵ's start at 0).
  """
  num_mixtures: int = 5
  hidden_dim: Optional[int] = None
  version: str = "v2"
  delta_bias: float = 1.0
  sigma_bias: float = 10.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries: jax.Array, memory: jax.Array, *, kv_lengths=None, state=None):
    """`(contexts [B, T, h], alignments [B, T, S], means [B, M])` after `T` steps from the means
    `state [B, M]` (None: zeros)."""
    _check("GMMAttention", queries, memory)
    M = self.num_mixtures

    def output_bias(key, shape, dtype):
      del key
      return jnp.concatenate([jnp.zeros((M,)), jnp.full((M,), self.delta_bias),
                              jnp.full((M,), self.sigma_bias)]).astype(dtype).reshape(shape)

    hidden = jnp.tanh(nn.Dense(self.hidden_dim or queries.shape[-1], dtype=self.dtype,
                               param_dtype=self.param_dtype, name="hidden")(queries))
    out = nn.Dense(3 * M, dtype=self.dtype, param_dtype=self.param_dtype, bias_init=output_bias,
                   name="mixture")(hidden)
    w_hat, delta_hat, sigma_hat = jnp.split(out.astype(jnp.float32), 3, axis=-1)
    return location.gmm_attention_scan(w_hat, delta_hat, sigma_hat, memory, kv_lengths=kv_lengths,
                                       initial_means=state, version=self.version)


@catalog.serves(12, kind="layer")
class DynamicConvolutionAttention(nn.Module):
  """Dynamic Convolution Attention from decoder queries (static, dynamic and prior filters).

  Attributes:
    attention_dim: A, the width of the energy MLP (and of the filter predictor's tanh layer).
    static_filters, static_width: F_s filters of odd width W_s, learned.
    dynamic_filters, dynamic_width: F_d filters of odd width W_d, predicted per step.
    prior_length, prior_alpha, prior_beta: the fixed causal beta-binomial prior filter.
    prior_floor: ε in `log(max(P ∗ α, ε))`.
  """
  attention_dim: int = 128
  static_filters: int = 8
  static_width: int = 21
  dynamic_filters: int = 8
  dynamic_width: int = 21
  prior_length: int = 11
  prior_alpha: float = 0.1
  prior_beta: float = 0.9
  prior_floor: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries: jax.Array, memory: jax.Array, *, kv_lengths=None, state=None):
    """`(contexts [B, T, h], alignments [B, T, S], alignment [B, S])` after `T` steps from the
    alignment `state [B, S]` (None: one-hot at slot 0)."""
    _check("DynamicConvolutionAttention", queries, memory)
    A, Fs, Ws = self.attention_dim, self.static_filters, self.static_width
    Fd, Wd = self.dynamic_filters, self.dynamic_width
    if Ws % 2 == 0 or Wd % 2 == 0:
      raise ValueError(f"DynamicConvolutionAttention: filter widths must be odd (centered), got "
                       f"static {Ws}, dynamic {Wd}")
    dense = lambda features, name, bias: nn.Dense(features, use_bias=bias, dtype=self.dtype,
                                                  param_dtype=self.param_dtype, name=name)
    hidden = jnp.tanh(dense(A, "query_hidden", True)(queries))
    filters = dense(Fd * Wd, "dynamic_filter_proj", False)(hidden)
    filters = filters.astype(jnp.float32).reshape(queries.shape[:2] + (Fd, Wd))
    # A one-channel convolution kernel: its fan-in is its width.
    conv_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-1,
                                                 out_axis=-2)
    weights = dict(
        static_filters=self.param("static_filters", conv_init, (Fs, Ws), self.param_dtype),
        static_proj=self.param("static_proj", nn.initializers.lecun_normal(), (Fs, A),
                               self.param_dtype),
        dynamic_proj=self.param("dynamic_proj", nn.initializers.lecun_normal(), (Fd, A),
                                self.param_dtype),
        bias=self.param("energy_bias", nn.initializers.zeros_init(), (A,), self.param_dtype),
        v=self.param("v", nn.initializers.normal(A ** -0.5), (A,), self.param_dtype))
    prior = location.beta_binomial_prior(self.prior_length, self.prior_alpha, self.prior_beta)
    return location.dca_attention_scan(filters, memory, prior=prior, kv_lengths=kv_lengths,
                                       initial_alignment=state, prior_floor=self.prior_floor,
                                       **weights)
