"""Lexicon-conditioned attention: attention scores conditioned on external per-token lexicon features
by concatenation, feature-based gating or an affine (FiLM) transform; the values stay unconditioned.

With f_j ∈ R^F the lexicon features of key token j (`lexicon [B,S,F]`), per key/value head:

    concat:  s_ij = scale · [q_i; u_n]·[k_j; f_j] = scale · (q_i·k_j + u_n·f_j)     u `[N, F]`
    gate:    s_ij = scale · q_i·(σ(f_j W_g + b_g) ⊙ k_j)                            W_g `[F, K, H]`
    film:    s_ij = scale · q_i·((f_j W_s + b_s) ⊙ k_j + f_j W_t)                   W_s, W_t `[F, K, H]`
    o_i = Σ_j softmax_j(s_ij) v_j

The paper conditions an RNN's sentence-level self-attention: energies e_j = w·c_j of a learned vector w
over the conditioned states c_j ([h_j; f_j], σ(W f_j + b) ⊙ h_j, or (W_s f_j + b_s) ⊙ h_j + W_t f_j +
b_t), a softmax over the sentence, and the representation Σ_j a_j h_j of the *unconditioned* states
(the authors' code, github.com/mourga/affective-attention, `modules/models.py`, `AffectiveAttention`).
Here the key k_j takes the place of h_j and the query q_i that of w (a single learned query and k = v
= h reproduce the paper exactly), so the lexicon steers where each head looks, not what it reads. In
concat the query's extra F coordinates u_n are a learned vector per head, as the paper's w_f.
Gating with zero weights gives the constant gate σ(b_g): keys scaled by σ(b_g), i.e. unconditioned
attention at scale · σ(b_g) (at b_g = 0 the logits are halved; they equal softmax's only as b_g → ∞);
FiLM with W_s = W_t = 0, b_s = 1, b_t = 0 (its initialization here) and concat with u = 0 are exactly
softmax attention. FiLM's shift has no bias here: a shift b_t common to every key adds q_i·b_t to
every logit of row i, which the softmax removes (the paper's b_t has no effect on its weights either).
Not included: the code's `non_linear_affine` (tanh of the FiLM output).

Every method is a change of the keys or an additive per-key bias (a flex `score_mod`), so every flex
path serves it and decoding over a KV cache (features cached beside the keys) equals the full forward.
The registry shapes F as `LEXICON_FEATURES` (the layer's `lexicon` input and the learned arrays); a
direct call accepts any F.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `lexicon [B,S,F]` → `[B,T,N,h]`.
Paper: Margatina, Baziotis and Potamianos, "Attention-based Conditioning Methods for External
Knowledge Integration", arXiv:1906.03674 (ACL 2019).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import param_tables
from attnjax.core.contract import flex_with_contract
from attnjax.registry import Mechanism, TokenInput, example_params, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["lexicon_conditioned_attention", "LEXICON_FEATURES", "METHODS", "LEXICON_TABLES"]

METHODS = ("concat", "gate", "film")
# F, the number of lexicon features per token, for the registry (the Flax layer's `lexicon` input and
# its learned arrays). An operator call takes any F.
LEXICON_FEATURES = 8
Lexicon = Float[Array, "B S F"]

_init = jax.nn.initializers
# A Linear layer's scale on the F inputs (the authors' nn.Linear on the features).
_kernel_init = _init.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2))
_query_init = _init.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)
_kernel = lambda N, K, H, h, F=LEXICON_FEATURES: (F, K, H)
_bias = lambda N, K, H, h, F=LEXICON_FEATURES: (K, H)
# (name, shape(N, K, H, h, F=), letters, init) per method (see `attnjax.core.param_tables`). FiLM starts
# at the identity (b_s = 1, the kernels 0), so it starts as softmax attention.
LEXICON_TABLES = {
    "concat": (("lexicon_query", lambda N, K, H, h, F=LEXICON_FEATURES: (N, F), "[N, F]",
                _query_init),),
    "gate": (("lexicon_gate_kernel", _kernel, "[F, K, H]", _kernel_init),
             ("lexicon_gate_bias", _bias, "[K, H]", _init.zeros)),
    "film": (("lexicon_scale_kernel", _kernel, "[F, K, H]", _init.zeros),
             ("lexicon_scale_bias", _bias, "[K, H]", _init.ones),
             ("lexicon_shift_kernel", _kernel, "[F, K, H]", _init.zeros)),
}


def lexicon_conditioned_attention(
    q: Query, k: Key, v: Value, *, lexicon: Lexicon, method: str = "gate",
    lexicon_query: Optional[jax.Array] = None, lexicon_gate_kernel: Optional[jax.Array] = None,
    lexicon_gate_bias: Optional[jax.Array] = None, lexicon_scale_kernel: Optional[jax.Array] = None,
    lexicon_scale_bias: Optional[jax.Array] = None, lexicon_shift_kernel: Optional[jax.Array] = None,
    causal: bool = False, segment_ids=None,
    q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
    implementation: Optional[str] = None) -> Output:
  """Lexicon-conditioned attention (see the module docstring): scores conditioned on per-key lexicon
  features by concatenation, a feature-based gate or FiLM; the values unconditioned."""
  op = "lexicon_conditioned_attention"
  B, _, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  if method not in METHODS:
    raise ValueError(f"{op}: `method` must be one of {METHODS}, got {method!r}")
  if jnp.ndim(lexicon) != 3 or jnp.shape(lexicon)[:2] != (B, S):
    raise ValueError(f"{op}: `lexicon` must have shape [B, S, F] = [{B}, {S}, F], got "
                     f"{jnp.shape(lexicon)}")
  F = lexicon.shape[-1]
  given = dict(lexicon_query=lexicon_query, lexicon_gate_kernel=lexicon_gate_kernel,
               lexicon_gate_bias=lexicon_gate_bias, lexicon_scale_kernel=lexicon_scale_kernel,
               lexicon_scale_bias=lexicon_scale_bias, lexicon_shift_kernel=lexicon_shift_kernel)
  table = LEXICON_TABLES[method]
  missing = [row[0] for row in table if given[row[0]] is None]
  if missing:
    raise ValueError(f"{op}: method {method!r} needs the learned arrays {missing}")
  params = {row[0]: given[row[0]] for row in table}
  param_tables.check_table(op, table, params, N=N, K=K, H=H, h=h, F=F)
  f = lexicon.astype(jnp.float32)
  p = {name: x.astype(jnp.float32) for name, x in params.items()}
  call = lambda k_, **kw: flex_with_contract(op, q, k_, v, causal=causal, segment_ids=segment_ids,
                                             q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                             implementation=implementation, **kw)
  if method == "concat":
    # The query's F extra coordinates u_n against the key's features: a per-key bias per head.
    bias = jnp.einsum("bsf,nf->bsn", f, p["lexicon_query"])
    scale_ = H ** -0.5 if scale is None else scale
    return call(k, score_mod=lambda s, b, n, qi, ki: s + scale_ * bias[b, jnp.clip(ki, 0, S - 1), n])
  linear = lambda kernel: jnp.einsum("bsf,fkh->bskh", f, p[kernel])
  kf = k.astype(jnp.float32)
  if method == "gate":
    kc = jax.nn.sigmoid(linear("lexicon_gate_kernel") + p["lexicon_gate_bias"]) * kf
  else:
    kc = ((linear("lexicon_scale_kernel") + p["lexicon_scale_bias"]) * kf
          + linear("lexicon_shift_kernel"))
  return call(kc.astype(k.dtype)).astype(q.dtype)


def _register(name: str, method: str):
  table = LEXICON_TABLES[method]
  register(Mechanism(
      name=name, fn=lexicon_conditioned_attention, family="softmax-variant", seeds=(69,),
      paper="Attention-based Conditioning Methods for External Knowledge Integration",
      arxiv="1906.03674", params=param_tables.param_specs(table),
      token_inputs=(TokenInput("lexicon", side="kv", kind="given",
                               shape=lambda N, K, H: (LEXICON_FEATURES,)),),
      defaults={"method": method},
      example=lambda *, N, K, H, h: {"method": method, **example_params(
          param_tables.param_specs(table, h=h), N=N, K=K, H=H, perturb=0.5)}))


# The paper's three conditioning methods; feature-based gating is the one it finds best across tasks.
_register("lexicon_conditioned_attention", "gate")
_register("lexicon_film_attention", "film")
_register("lexicon_concat_attention", "concat")
