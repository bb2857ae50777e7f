"""Location-relative alignment attention for a decoder reading a memory: GMM attention and Dynamic
Convolution Attention (DCA), with no content (q·k) term.

A decoder step `i` attends over the memory `h [B, S, h]` (e.g. a TTS encoder's text) with weights
`α_i [B, S]` computed from the previous step's alignment state, and reads `c_i = Σ_j α_ij h_j`.

GMM attention (Graves, arXiv:1308.0850; Battenberg et al. §2.2, Table 1): `M` Gaussian components
whose means only move forward,

    α_ij = Σ_k w_ik / Z_ik · exp(-(j - μ_ik)² / (2 σ_ik²)),     μ_ik = μ_(i-1)k + Δ_ik,

from unconstrained `(ŵ, Δ̂, σ̂)` that the decoder's query predicts (`attnjax.nn.GMMAttention`):

    version  Z            w          Δ            σ
    "v0"     1            exp(ŵ)     exp(Δ̂)       sqrt(exp(-σ̂) / 2)       (Graves)
    "v1"     sqrt(2πσ²)   softmax(ŵ) exp(Δ̂)       exp(σ̂)
    "v2"     sqrt(2πσ²)   softmax(ŵ) softplus(Δ̂)  softplus(σ̂)             (the paper's GMMv2)

Every version has `Δ > 0`, so the means never decrease (monotonic alignment); the weights are a
mixture of (normalized, for v1 and v2) densities sampled at the memory positions, not renormalized
over `j`. The state is the means `[B, M]` (0 before the first step).

DCA (Battenberg et al. §2.3): additive energies of three filterings of the previous alignment,

    f_i = F ∗ α_(i-1)                 static filters F [F_s, W_s] (learned)
    g_i = G(s_i) ∗ α_(i-1)            dynamic filters G [B, F_d, W_d], predicted from the query s_i
    p_i = log(max(P ∗ α_(i-1), ε))    fixed causal prior P = BetaBinomial(L - 1, a, b) pmf
    e_ij = vᵀ tanh(U f_ij + T g_ij + b) + p_ij,       α_i = softmax_j(e_i)

`F ∗`, `G ∗` are centered ("same") filters of odd width (`Σ_u F[c, u] α_(j+u-r)`, `r = (W-1)/2`);
the prior is causal, `(P ∗ α)_j = Σ_k P[k] α_(j-k)`: it moves alignment mass forward by `k` with
probability `P[k]` (paper: L = 11, a = 0.1, b = 0.9, mean move `(L-1) a / (a+b) = 1` per step).
`ε` (1e-6, as Coqui TTS's implementation) keeps the log finite where the prior has no mass. The
state is the alignment `[B, S]` (one-hot at 0 before the first step).

Padding: `kv_lengths [B]` gives zero weight to memory slots at or past the length (DCA normalizes
over the valid slots; a row with none gives zeros). Statistics in float32; contexts in the memory's
dtype.

Step functions (`gmm_attention_step`, `dca_attention_step`) advance one decoder step; the scans
(`gmm_attention_scan`, `dca_attention_scan`) run them over `T` steps whose predicted parameters are
given (the decoder's queries known in advance, as under teacher forcing). Not registered mechanisms:
they do not fit `q, k, v` (no keys; the state is an alignment).

Paper: Battenberg et al., "Location-Relative Attention Mechanisms For Robust Long-Form Speech
Synthesis", arXiv:1910.10288.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.typing import Array, Float, Lengths

__all__ = ["GMM_VERSIONS", "beta_binomial_prior", "dca_attention_scan", "dca_attention_step",
           "gmm_attention_scan", "gmm_attention_step", "gmm_parameters"]

GMM_VERSIONS = ("v0", "v1", "v2")
Means = Float[Array, "B M"]
MixtureLogits = Float[Array, "B M"]
StepMixtureLogits = Float[Array, "B T M"]
Alignment = Float[Array, "B S"]
Alignments = Float[Array, "B T S"]
Memory = Float[Array, "B S h"]
Contexts = Float[Array, "B T h"]
DynamicFilters = Float[Array, "B Fd Wd"]
StepDynamicFilters = Float[Array, "B T Fd Wd"]
StaticFilters = Float[Array, "Fs Ws"]
StaticProjection = Float[Array, "Fs A"]
DynamicProjection = Float[Array, "Fd A"]
EnergyVector = Float[Array, "A"]
PriorFilter = Float[Array, "L"]


def gmm_parameters(w_hat, delta_hat, sigma_hat, *, version: str = "v2"):
  """`(w, Δ, σ, Z)` of Table 1 (module docstring) from the predicted `(ŵ, Δ̂, σ̂)` `[..., M]`."""
  if version not in GMM_VERSIONS:
    raise ValueError(f"gmm_attention: `version` must be one of {GMM_VERSIONS}, got {version!r}")
  w_hat, delta_hat, sigma_hat = (jnp.asarray(a, jnp.float32) for a in (w_hat, delta_hat, sigma_hat))
  if version == "v0":
    sigma = jnp.sqrt(jnp.exp(-sigma_hat) / 2)
    return jnp.exp(w_hat), jnp.exp(delta_hat), sigma, jnp.ones_like(sigma)
  w = jax.nn.softmax(w_hat, axis=-1)
  if version == "v1":
    delta, sigma = jnp.exp(delta_hat), jnp.exp(sigma_hat)
  else:
    delta, sigma = jax.nn.softplus(delta_hat), jax.nn.softplus(sigma_hat)
  return w, delta, sigma, jnp.sqrt(2 * jnp.pi * sigma ** 2)


def _valid(B: int, S: int, kv_lengths) -> jax.Array:
  """`[B, S]` bool: memory slot j < kv_lengths[b] (all True without lengths)."""
  if kv_lengths is None:
    return jnp.ones((B, S), bool)
  kv_lengths = jnp.asarray(kv_lengths)
  if kv_lengths.shape != (B,):
    raise ValueError(f"location attention: `kv_lengths` must have shape [B] = [{B}], got "
                     f"{kv_lengths.shape}")
  return jnp.arange(S)[None, :] < kv_lengths[:, None]


def gmm_attention_step(means: Means, w_hat: MixtureLogits, delta_hat: MixtureLogits,
                       sigma_hat: MixtureLogits, *, length: int,
                       kv_lengths: Optional[Lengths] = None,
                       version: str = "v2") -> tuple[Alignment, Means]:
  """One GMM attention step: `(α_i [B, S], μ_i [B, M])` from the previous means `μ_(i-1) [B, M]` and
  this step's predicted `(ŵ, Δ̂, σ̂)` `[B, M]` over a memory of `length` slots."""
  means = jnp.asarray(means, jnp.float32)
  for name, a in (("w_hat", w_hat), ("delta_hat", delta_hat), ("sigma_hat", sigma_hat)):
    if jnp.shape(a) != means.shape:
      raise ValueError(f"gmm_attention_step: `{name}` must have shape [B, M] = {means.shape} "
                       f"(like `means`), got {jnp.shape(a)}")
  w, delta, sigma, z = gmm_parameters(w_hat, delta_hat, sigma_hat, version=version)
  means = means + delta
  j = jnp.arange(length, dtype=jnp.float32)
  # [B, M, S] component densities, summed over the components.
  dens = (w / z)[..., None] * jnp.exp(-(j - means[..., None]) ** 2 / (2 * sigma[..., None] ** 2))
  alignment = jnp.sum(dens, axis=1)
  return jnp.where(_valid(means.shape[0], length, kv_lengths), alignment, 0.0), means


@catalog.serves(12, kind="decoder attention", name="attnjax.ops.positional.gmm_attention_scan")
def gmm_attention_scan(w_hat: StepMixtureLogits, delta_hat: StepMixtureLogits,
                       sigma_hat: StepMixtureLogits, memory: Memory, *,
                       kv_lengths: Optional[Lengths] = None, initial_means: Optional[Means] = None,
                       version: str = "v2") -> tuple[Contexts, Alignments, Means]:
  """GMM attention over `T` decoder steps: `(contexts [B, T, h], alignments [B, T, S], final means
  [B, M])` from the steps' predicted `(ŵ, Δ̂, σ̂)` `[B, T, M]` (initial means: zeros)."""
  if jnp.ndim(memory) != 3:
    raise ValueError(f"gmm_attention_scan: `memory` must have shape [B, S, h], got "
                     f"{jnp.shape(memory)}")
  B, S = memory.shape[:2]
  if jnp.ndim(w_hat) != 3 or w_hat.shape[0] != B:
    raise ValueError(f"gmm_attention_scan: `w_hat` must have shape [B={B}, T, M], got "
                     f"{jnp.shape(w_hat)}")
  means = (jnp.zeros((B, w_hat.shape[2]), jnp.float32) if initial_means is None
           else jnp.asarray(initial_means, jnp.float32))

  def step(means, params):
    alignment, means = gmm_attention_step(means, *params, length=S, kv_lengths=kv_lengths,
                                          version=version)
    return means, alignment

  params = tuple(jnp.moveaxis(jnp.asarray(a), 1, 0) for a in (w_hat, delta_hat, sigma_hat))
  means, alignments = jax.lax.scan(step, means, params)
  alignments = jnp.moveaxis(alignments, 0, 1)
  contexts = jnp.einsum("bts,bsh->bth", alignments, memory.astype(jnp.float32))
  return contexts.astype(memory.dtype), alignments, means


def beta_binomial_prior(length: int = 11, alpha: float = 0.1, beta: float = 0.9) -> jax.Array:
  """DCA's prior filter `P[k]`, `k = 0 … length-1`: the BetaBinomial(n = length - 1, alpha, beta)
  pmf `C(n, k) B(k + α, n - k + β) / B(α, β)` (float32 `[length]`, sums to 1)."""
  if length < 1 or alpha <= 0 or beta <= 0:
    raise ValueError(f"beta_binomial_prior: need length >= 1 and alpha, beta > 0, got "
                     f"{length}, {alpha}, {beta}")
  n = length - 1
  lbeta = lambda a, b: math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
  pmf = [math.comb(n, k) * math.exp(lbeta(k + alpha, n - k + beta) - lbeta(alpha, beta))
         for k in range(length)]
  return jnp.asarray(pmf, jnp.float32)


def _windows(alignment: jax.Array, width: int, left: int) -> jax.Array:
  """`[B, S, width]`: entry `[b, j, u] = α[b, j + u - left]` (0 outside the memory)."""
  S = alignment.shape[1]
  padded = jnp.pad(alignment, ((0, 0), (left, width - 1 - left)))
  return padded[:, jnp.arange(S)[:, None] + jnp.arange(width)[None, :]]


def dca_attention_step(alignment: Alignment, dynamic_filters: DynamicFilters, *,
                       static_filters: StaticFilters, static_proj: StaticProjection,
                       dynamic_proj: DynamicProjection, bias: EnergyVector, v: EnergyVector,
                       prior: PriorFilter,
                       kv_lengths: Optional[Lengths] = None,
                       prior_floor: float = 1e-6) -> Alignment:
  """One DCA step: `α_i [B, S]` from `α_(i-1) [B, S]` and this step's dynamic filters `G(s_i)
  [B, F_d, W_d]` (module docstring; `U = static_proj`, `T = dynamic_proj`)."""
  alignment = jnp.asarray(alignment, jnp.float32)
  if alignment.ndim != 2:
    raise ValueError(f"dca_attention_step: `alignment` must have shape [B, S], got "
                     f"{alignment.shape}")
  B, S = alignment.shape
  for name, filters in (("static_filters", static_filters), ("dynamic_filters", dynamic_filters)):
    if jnp.shape(filters)[-1] % 2 == 0:
      raise ValueError(f"dca_attention_step: `{name}` must have an odd width (centered filters), "
                       f"got shape {jnp.shape(filters)}")
  if jnp.ndim(dynamic_filters) != 3 or dynamic_filters.shape[0] != B:
    raise ValueError(f"dca_attention_step: `dynamic_filters` must have shape [B={B}, F_d, W_d], "
                     f"got {jnp.shape(dynamic_filters)}")
  ws, wd, lp = static_filters.shape[-1], dynamic_filters.shape[-1], prior.shape[-1]
  f = jnp.einsum("bsu,cu->bsc", _windows(alignment, ws, (ws - 1) // 2),
                 static_filters.astype(jnp.float32))
  g = jnp.einsum("bsu,bcu->bsc", _windows(alignment, wd, (wd - 1) // 2),
                 dynamic_filters.astype(jnp.float32))
  # Causal prior: window entry u holds α_(j + u - (L-1)), i.e. the move k = L - 1 - u.
  p = jnp.einsum("bsu,u->bs", _windows(alignment, lp, lp - 1),
                 jnp.flip(prior.astype(jnp.float32)))
  hidden = jnp.tanh(f @ static_proj.astype(jnp.float32) + g @ dynamic_proj.astype(jnp.float32)
                    + bias.astype(jnp.float32))
  energies = hidden @ v.astype(jnp.float32) + jnp.log(jnp.maximum(p, prior_floor))
  valid = _valid(B, S, kv_lengths)
  shifted = energies - jnp.max(jnp.where(valid, energies, -jnp.inf), axis=-1, keepdims=True)
  weights = jnp.where(valid, jnp.exp(jnp.where(valid, shifted, 0.0)), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  return weights / jnp.where(total > 0, total, 1.0)


@catalog.serves(12, kind="decoder attention", name="attnjax.ops.positional.dca_attention_scan")
def dca_attention_scan(dynamic_filters: StepDynamicFilters, memory: Memory, *,
                       static_filters: StaticFilters, static_proj: StaticProjection,
                       dynamic_proj: DynamicProjection, bias: EnergyVector, v: EnergyVector,
                       prior: PriorFilter,
                       kv_lengths: Optional[Lengths] = None,
                       initial_alignment: Optional[Alignment] = None,
                       prior_floor: float = 1e-6) -> tuple[Contexts, Alignments, Alignment]:
  """DCA over `T` decoder steps: `(contexts [B, T, h], alignments [B, T, S], final alignment
  [B, S])` from the steps' dynamic filters `[B, T, F_d, W_d]` (initial alignment: one-hot at 0)."""
  if jnp.ndim(memory) != 3:
    raise ValueError(f"dca_attention_scan: `memory` must have shape [B, S, h], got "
                     f"{jnp.shape(memory)}")
  B, S = memory.shape[:2]
  if jnp.ndim(dynamic_filters) != 4 or dynamic_filters.shape[0] != B:
    raise ValueError(f"dca_attention_scan: `dynamic_filters` must have shape [B={B}, T, F_d, W_d], "
                     f"got {jnp.shape(dynamic_filters)}")
  alignment = (jnp.zeros((B, S), jnp.float32).at[:, 0].set(1.0) if initial_alignment is None
               else jnp.asarray(initial_alignment, jnp.float32))

  def step(alignment, filters):
    alignment = dca_attention_step(alignment, filters, static_filters=static_filters,
                                   static_proj=static_proj, dynamic_proj=dynamic_proj, bias=bias,
                                   v=v, prior=prior, kv_lengths=kv_lengths,
                                   prior_floor=prior_floor)
    return alignment, alignment

  alignment, alignments = jax.lax.scan(step, alignment, jnp.moveaxis(dynamic_filters, 1, 0))
  alignments = jnp.moveaxis(alignments, 0, 1)
  contexts = jnp.einsum("bts,bsh->bth", alignments, memory.astype(jnp.float32))
  return contexts.astype(memory.dtype), alignments, alignment
