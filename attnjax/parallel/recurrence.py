"""The gated linear recurrence across devices: a sequence sharded along T over the `context` mesh
axis, each device's chunk state handed on as a prefix over devices.

    S_t = G_t ⊙ S_{t-1} + k_t v_tᵀ,   o_t = (scale · q_t) S_t        (`attnjax.core.linear`)

Device d holds tokens [d·T/P, (d+1)·T/P). Its chunk maps an incoming state S to A_d ⊙ S + U_d, with
A_d = Π_t G_t (the product of its gates) and U_d = Σ_t (Π_{s>t} G_s) k_t v_tᵀ (its own keys and
values, decayed to its end), both O(T/P · F·h) to compute. The devices all-gather (A_e, U_e), which are
the size of one state each (not of the sequence), and each forms its incoming state as the prefix
S_in(d) = Σ_{e<d} (Π_{e<f<d} A_f) ⊙ U_e; it then runs the chunked recurrence on its tokens from S_in.
The result equals the single-device recurrence (`gated_linear_attention`, causal), in outputs and,
through autodiff of the gather and the local runs, in gradients.

Packed documents (`segment_ids [B, T]`, sharded with the tokens): the state resets where the id
changes. A chunk with a reset inside passes nothing through (A_d = 0) and contributes only its last
document's tokens to U_d; a state crosses from device d − 1 to d only when d's first token continues
d − 1's last document.

The Flax layer runs its mechanism inside `layer_scope()`: under a mesh with `context` > 1, every
mechanism on `attnjax.core.linear_contract.feature_linear_attention` (Lightning Attention-2, ReGLA,
cosine, FAVOR+, ... : feature maps computed per token, then this recurrence) runs its causal
recurrence over whole sequences here, with no code of its own.

Shapes: `q [B,T,N,F]`, `k [B,T,K,F]`, `v [B,T,K,h]`, `log_decay` None, `[B,T,N]` or `[B,T,N,F]` →
`[B,T,N,h]`.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attnjax.core import checks
from attnjax.core import linear
from attnjax.core import linear_contract
from attnjax.parallel.mesh import BATCH_AXES
from attnjax.typing import Key, Output, Query, Value

__all__ = ["context_parallel_linear_attention", "layer_scope"]

_F32 = jnp.float32


def _heads(x, N):
  """[B,T,K,X] -> [B,N,T,X] float32, K/V heads repeated for GQA."""
  x = jnp.swapaxes(jnp.asarray(x, _F32), 1, 2)
  return jnp.repeat(x, N // x.shape[1], axis=1) if x.shape[1] != N else x


def _chunk_map(k, v, log_decay, run, *, N, F, normalize):
  """`(A [B,N,F], U [B,N,F,h(+1)])`: this chunk maps an incoming state S to A ⊙ S + U."""
  kh, vh = _heads(k, N), _heads(v, N)
  if normalize:
    vh = jnp.concatenate([vh, jnp.ones(vh.shape[:-1] + (1,), _F32)], axis=-1)
  B, _, T, _ = kh.shape
  if log_decay is None:
    lam = jnp.zeros((B, N, T, F), _F32)
  else:
    g = jnp.swapaxes(jnp.maximum(jnp.asarray(log_decay, _F32), linear.LOG_DECAY_FLOOR), 1, 2)
    lam = jnp.broadcast_to(g[..., None] if g.ndim == 3 else g, (B, N, T, F))
  cum = jnp.cumsum(lam, axis=2)                                           # Λ_t (inclusive)
  total = cum[:, :, -1]                                                   # Λ_end [B, N, F]
  # Tokens of the chunk's last document only; a reset inside stops the incoming state.
  last = (run == run[:, -1:])[:, None, :, None]                          # [B, 1, T, 1]
  weight = jnp.where(last, jnp.exp(total[:, :, None] - cum), 0.0)       # Π_{s>t} G_s
  U = jnp.einsum("bntf,bnth->bnfh", weight * kh, vh)
  A = jnp.where((run[:, 0] == run[:, -1])[:, None, None], jnp.exp(total), 0.0)
  return A, U


def context_parallel_linear_attention(q: Query, k: Key, v: Value, *, mesh: Mesh,
                                      axis: str = "context", log_decay=None,
                                      normalize: bool = False, scale: Optional[float] = None,
                                      segment_ids=None, chunk_size: int = 64,
                                      implementation: Optional[str] = "xla") -> Output:
  """The causal gated linear recurrence over a sequence sharded along T (module docstring).
  Arguments as `gated_linear_attention` (causal), plus the `mesh` and its `axis`."""
  op = "context_parallel_linear_attention"
  B, T, S, N, _, F, _ = checks.check_qkv(op, q, k, v)
  if T != S:
    raise ValueError(f"{op}: the causal recurrence needs T == S, got T = {T}, S = {S}")
  if log_decay is not None and jnp.shape(log_decay) not in ((B, T, N), (B, T, N, F)):
    raise ValueError(f"{op}: `log_decay` must be [B,T,N] = {[B, T, N]} or [B,T,N,F] = "
                     f"{[B, T, N, F]}, got shape {list(jnp.shape(log_decay))}")
  if segment_ids is not None:
    checks.check_shape(op, "segment_ids", segment_ids, (B, T), "[B, T]")
  if axis not in mesh.axis_names:
    raise ValueError(f"{op}: the mesh has no axis {axis!r}; its axes are {mesh.axis_names}")
  devices = mesh.shape[axis]
  if T % devices:
    raise ValueError(f"{op}: the sequence length T = {T} must divide over context = {devices} "
                     "devices")
  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  if B % int(np.prod([mesh.shape[a] for a in batch_axes], dtype=int)):
    batch_axes = ()  # a batch that does not split (e.g. an init batch of 1) is replicated
  tokens = P(batch_axes if batch_axes else None, axis)
  has_decay = log_decay is not None
  seg = (jnp.asarray(segment_ids, jnp.int32) if segment_ids is not None
         else jnp.zeros((B, T), jnp.int32))

  def local(q, k, v, ld, seg):
    run = linear.run_index(seg)
    A, U = _chunk_map(k, v, ld if has_decay else None, run, N=N, F=F, normalize=normalize)
    # Every device's map and its edge documents, gathered: one state each, not the sequence.
    A_all = jax.lax.all_gather(A, axis)
    U_all = jax.lax.all_gather(U, axis)
    first_all = jax.lax.all_gather(seg[:, 0], axis)                      # [P, B]
    last_all = jax.lax.all_gather(seg[:, -1], axis)
    states, carried = [], jnp.zeros_like(U)
    for e in range(devices):
      states.append(carried)                                             # the state entering e
      cont = jnp.ones_like(first_all[0], bool) if e == 0 else first_all[e] == last_all[e - 1]
      carried = A_all[e][..., None] * jnp.where(cont[:, None, None, None], carried, 0.0) + U_all[e]
    d = jax.lax.axis_index(axis)
    incoming = jnp.stack(states)[d]
    if devices > 1:
      # The first token continues the previous device's last document, or starts afresh.
      cont = seg[:, 0] == jnp.take(last_all, jnp.maximum(d - 1, 0), axis=0)
      incoming = jnp.where((cont | (d == 0))[:, None, None, None], incoming, 0.0)
    return linear.gated_linear_attention(
        q, k, v, log_decay=ld if has_decay else None, normalize=normalize, causal=True,
        scale=scale, initial_state=incoming, segment_ids=seg, chunk_size=chunk_size,
        implementation=implementation)

  ld_arg = log_decay if has_decay else jnp.zeros((B, T, N), _F32)
  run = jax.shard_map(local, mesh=mesh, in_specs=(tokens,) * 5, out_specs=tokens,
                      check_vma=False)
  return run(q, k, v, ld_arg, seg)


def _sharded_form(qf, kf, v, *, devices, **kwargs):
  if qf.shape[1] % devices:
    return None     # the single-device form runs and XLA partitions it
  return context_parallel_linear_attention(qf, kf, v, mesh=jax.sharding.get_abstract_mesh(),
                                           **kwargs)


def layer_scope():
  """The scope `attnjax.nn.MultiHeadAttention` runs its mechanism in: under a mesh with `context`
  > 1, every feature-mapped linear attention (`attnjax.core.linear_contract`) runs its causal
  recurrence over whole sequences as `context_parallel_linear_attention`; elsewhere it changes
  nothing."""
  mesh = jax.sharding.get_abstract_mesh()
  devices = int(mesh.shape["context"]) if "context" in mesh.axis_names else 1
  form = functools.partial(_sharded_form, devices=devices) if devices > 1 else None
  return linear_contract.sequence_form(form)
