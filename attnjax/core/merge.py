"""Exact merging of attention computed over disjoint key sets.

If o_i = Σ_{j∈P_i} f(s_j) v_j / D_i with lse_i = log D_i over disjoint key sets P_1..P_m, then attention
over their union is

    lse = log Σ_i exp(lse_i),      o = Σ_i exp(lse_i - lse) · o_i

(the associative online-softmax reduction behind split-K decoding, ring attention and cascade
inference). A part with lse_i = -inf (no visible key) contributes nothing; if every part is empty the
result is zeros with lse = -inf.

Implementations (`implementation=`, `core.implementations.dispatch`): `"jax_triton"` (a Triton kernel
called through jax-triton, `kernels/jax_triton_merge.py`; listed for "gpu" only, and raising
`NotImplementedError` where triton / jax-triton are not installed, so automatic dispatch falls back)
and `"xla"` (the formula above in jnp; the default on a CPU).

Papers: Sanovar et al., "Lean Attention", arXiv:2405.10480; Ye et al., "FlashInfer", arXiv:2501.01005.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from attnjax.core.implementations import dispatch
from attnjax.kernels import jax_triton_merge


def merge_attention_states(outs: Sequence[jax.Array] | jax.Array, lses: Sequence[jax.Array] | jax.Array,
                           *, implementation: Optional[str] = None):
  """Merges partial attention states.

  Args:
    outs: m arrays `[..., h]` (e.g. `[B, T, N, h]`), or one array stacked on a leading axis
      `[m, ..., h]`.
    lses: m matching arrays `[...]` (e.g. `[B, T, N]`), or stacked `[m, ...]`.
    implementation: "jax_triton" (GPU) or "xla"; None takes the first that serves the platform.

  Returns:
    `(out [..., h] in the dtype of outs, lse [...] float32)`.
  """
  outs = jnp.stack(outs) if isinstance(outs, (list, tuple)) else outs
  lses = jnp.stack(lses) if isinstance(lses, (list, tuple)) else lses
  if outs.shape[:-1] != lses.shape:
    raise ValueError(f"merge_attention_states: `outs` must have shape [m, ..., h] matching `lses` "
                     f"[m, ...]; got outs {outs.shape}, lses {lses.shape}")
  return dispatch("merge_attention_states", _IMPLEMENTATIONS, implementation, outs, lses)


def _xla_merge(outs: jax.Array, lses: jax.Array):
  """The merge in jnp on stacked `outs [m, ..., h]`, `lses [m, ...]`."""
  lses = lses.astype(jnp.float32)
  m = jnp.max(lses, axis=0)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  weights = jnp.exp(lses - m_safe)                       # 0 for empty parts
  total = jnp.sum(weights, axis=0)
  empty = total == 0
  lse = jnp.where(empty, -jnp.inf, m_safe + jnp.log(jnp.where(empty, 1.0, total)))
  w = weights / jnp.where(empty, 1.0, total)
  out = jnp.sum(w[..., None] * outs.astype(jnp.float32), axis=0)
  return out.astype(outs.dtype), lse


def _jax_triton_merge(outs: jax.Array, lses: jax.Array):
  return jax_triton_merge.merge(outs, lses, xla_merge=_xla_merge)


_IMPLEMENTATIONS = (
    ("jax_triton", _jax_triton_merge, ("gpu",)),
    ("xla", _xla_merge, ()),
)
