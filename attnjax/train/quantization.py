"""DNN Quantization with Attention (DQA): a weight tensor is quantized during training as a learnable,
temperature-annealed mix of K quantizers of increasing bit width that converges to the lowest one.

Paper: "DNN Quantization with Attention", arXiv:2103.13322 (method read from the OpenReview version
of the paper: Section 3, Algorithm 1, Section 4.1). Equations followed:

  (2), (3)  q = Qᵀ a = Σ_k a_k Q_k(w; n_k),         n_1 < n_2 < ... < n_K  (bit widths, sorted)
  (4) + Alg. 1  a = softmax((α / std(α)) / T(b))     α ∈ R^K learnable ("soft attention")
  (5) + Alg. 1  T(b) = T(0) ψ^b,  ψ = exp(log(T(B) / T(0)) / B)   (exponential cooling per batch)
  (6)       r(α) = λ gᵀ a(α) / S,  one term per layer, S = number of weights of the whole network,
            g increasing with k (paper: g = [1, 4, 16]) so the mix is pushed to the lowest bit width
  (7)       α_k(init) = Σ_{j≠k} n_j / Σ_j n_j     (largest for the lowest bit width: a low-bit prior)

Paper defaults (Sect. 4.1): bits (2, 4, 8) min-max, T(0) = 100, T(B) = 0.03, g = [1, 4, 16], λ in
0.5..30 by table. The quantizers use straight-through gradients (Sect. 2): the forward pass rounds,
the backward pass treats rounding as identity, so ∂q/∂w = Σ_k a_k = 1 and α gets ∂L/∂a_k ∝ Q_k(w).

Choices of ours: the min-max quantizer is per tensor, `lo + Δ round((w - lo)/Δ)` with
`Δ = (hi - lo) / (2^n - 1)` and the range [lo, hi] = [min w, max w] held constant for the gradient
(the paper defines it in an appendix A.1 that we could not read; Sony's model_compression_toolkit
DQA quantizer uses the same uniform grid over [min, max]). std(α) uses the n-1 (Bessel) divisor as
`torch.std` does in that code; the divisor only rescales T.

Shapes: w any shape; α `[K]`; bits a length-K sequence; T a scalar.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.typing import Array, Float

__all__ = [
    "DQADense", "PAPER_BITS", "PAPER_PENALTY", "bitwidth_penalty", "dqa_attention", "dqa_quantize",
    "init_alpha", "minmax_quantize", "ste_round", "temperature_schedule",
]

PAPER_BITS = (2, 4, 8)
PAPER_PENALTY = (1.0, 4.0, 16.0)

Quantizer = Callable[[jax.Array, int], jax.Array]
Logits = Float[Array, "K"]
Features = Float[Array, "B d"]


def ste_round(x: Float[Array, "..."]) -> Float[Array, "..."]:
  """round(x) in the forward pass, identity in the backward pass (straight-through estimator)."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def minmax_quantize(w: Float[Array, "..."], bits: int) -> Float[Array, "..."]:
  """Uniform `bits`-bit quantization of `w` on 2^bits levels spanning [min w, max w], with a
  straight-through gradient (identity in w). A constant tensor is returned unchanged."""
  if bits < 1:
    raise ValueError(f"minmax_quantize: bits must be >= 1, got {bits}")
  # The range is a statistic of w, not a path for the gradient: STE means ∂q/∂w = 1.
  lo = jax.lax.stop_gradient(jnp.min(w))
  hi = jax.lax.stop_gradient(jnp.max(w))
  step = (hi - lo) / (2 ** bits - 1)
  safe = jnp.where(step > 0, step, 1.0)
  q = lo + safe * ste_round((w - lo) / safe)
  return jnp.where(step > 0, q, w)


def _check_alpha(alpha: jax.Array, k: int | None, fn: str) -> None:
  if alpha.ndim != 1 or alpha.shape[0] < 2 or (k is not None and alpha.shape[0] != k):
    want = f"[{k}]" if k is not None else "[K] with K >= 2"
    raise ValueError(f"{fn}: alpha must be {want} (one logit per quantizer), got {alpha.shape}")


def dqa_attention(alpha: Logits, temperature: float | jax.Array) -> Logits:
  """a = softmax((α / std(α)) / T) (eq. 4 with the normalization of Algorithm 1)."""
  alpha = jnp.asarray(alpha)
  _check_alpha(alpha, None, "dqa_attention")
  std = jnp.std(alpha, ddof=1)
  # Equal logits have std 0: their softmax is uniform whatever the scale, so skip the division.
  scaled = jnp.where(std > 0, alpha / jnp.where(std > 0, std, 1.0), alpha)
  return jax.nn.softmax(scaled / temperature)


@catalog.serves(230, kind="training", name="attnjax.train.quantization.dqa_quantize")
def dqa_quantize(w: Float[Array, "..."], alpha: Logits, temperature: float | jax.Array,
                 bits: Sequence[int] = PAPER_BITS,
                 quantizer: Quantizer = minmax_quantize) -> Float[Array, "..."]:
  """DQA weights q = Σ_k a_k Q_k(w; n_k) (eqs. 2-4), a = `dqa_attention(alpha, temperature)`.

  Args:
    w: full-precision weights, any shape.
    alpha: `[K]` attention logits, one per entry of `bits`.
    temperature: T > 0 (from `temperature_schedule`); T -> 0 gives the quantizer of argmax α.
    bits: K increasing bit widths (paper: 2, 4, 8).
    quantizer: `(w, bits) -> q` with a straight-through gradient (default min-max).

  Returns:
    the mixed quantized weights, shaped like `w`; differentiable in `w` (STE) and `alpha`.
  """
  bits = tuple(int(b) for b in bits)
  if any(b2 <= b1 for b1, b2 in zip(bits[:-1], bits[1:], strict=True)):
    raise ValueError(f"dqa_quantize: bits must be strictly increasing (eq. 3), got {bits}")
  alpha = jnp.asarray(alpha)
  _check_alpha(alpha, len(bits), "dqa_quantize")
  a = dqa_attention(alpha, temperature)
  stacked = jnp.stack([quantizer(w, b) for b in bits])             # Q of eq. 3: [K, *w.shape]
  return jnp.tensordot(a.astype(stacked.dtype), stacked, axes=1)  # Qᵀ a (eq. 2)


def init_alpha(bits: Sequence[int] = PAPER_BITS) -> Logits:
  """Initial logits α_k = Σ_{j≠k} n_j / Σ_j n_j (eq. 7): the lowest bit width gets the largest."""
  n = jnp.asarray(bits, jnp.float32)
  return (n.sum() - n) / n.sum()


def temperature_schedule(init_temperature: float = 100.0, final_temperature: float = 0.03,
                         total_steps: int = 1) -> Callable[[jax.Array | int], jax.Array]:
  """optax-style schedule `step -> T(step) = T(0) ψ^step`, ψ = (T(B)/T(0))^(1/B) (eq. 5, Alg. 1);
  T(B) = `final_temperature` at step B = `total_steps`, and it keeps cooling after B."""
  if init_temperature <= 0 or final_temperature <= 0 or total_steps < 1:
    raise ValueError("temperature_schedule: need init_temperature > 0, final_temperature > 0 and "
                     f"total_steps >= 1; got {init_temperature}, {final_temperature}, {total_steps}")
  log_psi = jnp.log(final_temperature / init_temperature) / total_steps

  def schedule(step):
    return init_temperature * jnp.exp(log_psi * jnp.asarray(step, jnp.float32))

  return schedule


def bitwidth_penalty(alphas, temperature: float | jax.Array, num_weights: int, strength: float,
                     penalty: Sequence[float] = PAPER_PENALTY) -> jax.Array:
  """Σ over layers of r(α) = λ gᵀ a(α) / S (eq. 6), added to the task loss.

  Args:
    alphas: a pytree whose leaves are the layers' `[K]` logits.
    temperature: the current T (the a(α) of eq. 6 is the one used in the forward pass).
    num_weights: S, the number of weights of the whole network (makes λ size independent).
    strength: λ.
    penalty: g, increasing in k (paper: 1, 4, 16).
  """
  g = jnp.asarray(penalty, jnp.float32)
  if num_weights < 1:
    raise ValueError(f"bitwidth_penalty: num_weights (S) must be >= 1, got {num_weights}")
  total = jnp.float32(0)
  for alpha in jax.tree_util.tree_leaves(alphas):
    _check_alpha(jnp.asarray(alpha), g.shape[0], "bitwidth_penalty")
    total = total + g @ dqa_attention(alpha, temperature)
  return strength * total / num_weights


class DQADense(nn.Module):
  """Dense layer whose kernel is DQA-quantized (`dqa_quantize`); the logits are the param "alpha"
  initialized by eq. 7, so `bitwidth_penalty(params-with-alpha, ...)` can collect them."""
  features: int
  bits: Sequence[int] = PAPER_BITS
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Features, temperature: float | jax.Array):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    alpha = self.param("alpha", lambda _: init_alpha(self.bits))
    y = x @ dqa_quantize(kernel, alpha, temperature, self.bits).astype(x.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y
