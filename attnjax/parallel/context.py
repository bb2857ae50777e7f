"""Context parallelism: attention over a sequence sharded along T across the `context` mesh axis.

Ring attention (Liu, Zaharia, Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite
Context", arXiv:2310.01889): each of the P devices keeps its queries and passes its key/value chunk
around the ring (`ppermute`); at each of the P steps it attends its queries to the chunk it holds
with the flex core (`return_residuals`: the block's output and log-sum-exp) and folds the partial
state into its running one with `merge_attention_states`, so the result is exactly softmax attention
over the whole sequence. The next chunk's transfer is issued before the current block is computed,
so XLA can overlap communication with compute. The backward is ring attention's own: it keeps only
the device's q, k, v, output and log-sum-exp from the forward and passes the key/value chunks around
the ring again, each with its dK, dV accumulating as it travels, so training memory stays O(T/P) per
device too. Under causal attention a block whose keys all come after its queries (about half of
them) is skipped on that device (`lax.cond` on the positions); other masks skip their empty tiles
inside flex.

`strategy="allgather"` gathers all keys and values once and runs one local call: for short rings,
where one collective beats P − 1 exchanges (its memory is the full K/V per device).

Masks and score mods are written in global positions: `mask_mod(b, n, q_pos, kv_pos)`,
`score_mod(score, b, n, q_pos, kv_pos)`, as for `flex_attention` on the whole sequence; `causal`
and packed documents (`segment_ids [B, T]`, sharded with the tokens) are added to them.

Layouts (`layout`): "contiguous" gives device d the tokens [d·T/P, (d+1)·T/P); under causal
attention the last device then does P blocks of work and the first one. "zigzag" (the load-balanced
causal striping of Llama 3's context-parallel training) cuts T into 2P chunks and gives device d
chunks d and 2P − 1 − d, so every device does the same number of unmasked tiles (`tile_counts`). The
inputs and the output stay in token order, sharded contiguously; inside the mesh each device swaps
its two half-chunks into the zigzag layout and back (two `ppermute`s each way), so no device holds
more than T/P tokens.

The Flax layer (`layer_attention`) runs any mechanism that declares `Mechanism.flex_mods` (softmax
and the flex variants: sliding window, ALiBi, soft-capping, documents, prefix LM) this way when the
mesh set by `jax.set_mesh` has `context` > 1; the model and trainer need only the mesh config.

Shapes: `q [B,T,N,H]`, `k [B,T,K,H]`, `v [B,T,K,h]` (self-attention: T = S) → `[B,T,N,h]`.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attnjax.core import checks
from attnjax.core import flex
from attnjax.core import masks
from attnjax.core.block_mask import BlockMask
from attnjax.core.merge import merge_attention_states
from attnjax.parallel.mesh import BATCH_AXES
from attnjax.registry import Mechanism
from attnjax.typing import Key, Output, Query, Value

__all__ = ["LAYOUTS", "STRATEGIES", "context_parallel_attention", "current_context_size",
           "layer_attention", "layout_positions", "tile_counts"]

LAYOUTS = ("contiguous", "zigzag")
STRATEGIES = ("ring", "allgather")


def layout_positions(T: int, devices: int, layout: str = "zigzag") -> np.ndarray:
  """`[T]` int32: the global position of each slot when the slots are split evenly over `devices`
  in order (device d holds slots [d·T/P, (d+1)·T/P))."""
  if layout not in LAYOUTS:
    raise ValueError(f"context parallelism: `layout` must be one of {LAYOUTS}, got {layout!r}")
  pieces = devices if layout == "contiguous" else 2 * devices
  if T % pieces:
    raise ValueError(f"context parallelism: the sequence length T = {T} must divide into "
                     f"{pieces} equal chunks ({layout} layout over context = {devices} devices)")
  if layout == "contiguous":
    return np.arange(T, dtype=np.int32)
  c = T // pieces
  chunks = [np.arange(i * c, (i + 1) * c) for i in range(pieces)]
  return np.concatenate([np.concatenate([chunks[d], chunks[pieces - 1 - d]])
                         for d in range(devices)]).astype(np.int32)


def tile_counts(T: int, devices: int, *, layout: str = "zigzag", block: int = 128,
                causal: bool = True, window: Optional[int] = None) -> np.ndarray:
  """Per device, the number of (query block, key block) tiles of `block` tokens with at least one
  visible pair under causal (and an optional sliding `window`) attention in the layout: the work
  each device does with tile skipping."""
  pos = layout_positions(T, devices, layout)
  local = T // devices
  if local % block:
    raise ValueError(f"tile_counts: `block` = {block} must divide the per-device length {local}")
  q_pos = pos.reshape(devices, local // block, block)
  counts = np.zeros(devices, np.int64)
  for d in range(devices):
    for qb in q_pos[d]:
      for kb in pos.reshape(-1, block):
        diff = qb[:, None] - kb[None, :]
        seen = np.ones_like(diff, bool)
        if causal:
          seen &= diff >= 0
        if window is not None:
          seen &= np.abs(diff) < window
        counts[d] += bool(seen.any())
  return counts


def _zigzag_exchange(x, axis: str, devices: int, *, forward: bool):
  """Moves `[B, T/P, ...]` shards between the contiguous layout (device d: chunks 2d, 2d + 1 of 2P)
  and the zigzag one (device e: chunks e, 2P − 1 − e) with two `ppermute`s, so no device ever holds
  more than its own T/P tokens. Chunk c < P belongs to zigzag device c, chunk c ≥ P to 2P − 1 − c;
  the even chunks travel in one permutation and the odd ones in the other."""
  owner = lambda c: c if c < devices else 2 * devices - 1 - c  # noqa: E731
  even = [(d, owner(2 * d)) for d in range(devices)]
  odd = [(d, owner(2 * d + 1)) for d in range(devices)]
  half = x.shape[1] // 2
  e = jax.lax.axis_index(axis)
  if forward:
    got_even = jax.lax.ppermute(x[:, :half], axis, even)
    got_odd = jax.lax.ppermute(x[:, half:], axis, odd)
    # Device e holds [chunk e, chunk 2P − 1 − e]: the even one first when e is even.
    return jnp.where(e % 2 == 0, jnp.concatenate([got_even, got_odd], 1),
                     jnp.concatenate([got_odd, got_even], 1))
  first, second = x[:, :half], x[:, half:]
  even_chunk = jnp.where(e % 2 == 0, first, second)
  odd_chunk = jnp.where(e % 2 == 0, second, first)
  back_even = jax.lax.ppermute(even_chunk, axis, [(dst, src) for src, dst in even])
  back_odd = jax.lax.ppermute(odd_chunk, axis, [(dst, src) for src, dst in odd])
  return jnp.concatenate([back_even, back_odd], 1)


def _visible_fn(causal, mask_mod, N):
  """`visible(b, n, q_pos, kv_pos, q_seg, kv_seg)` on broadcast index arrays."""

  def visible(b, n, qp, kp, qs, ks):
    keep = jnp.ones(jnp.broadcast_shapes(jnp.shape(qp), jnp.shape(kp)), bool)
    if causal:
      keep &= qp >= kp
    if qs is not None:
      keep &= qs == ks
    if mask_mod is not None:
      keep &= mask_mod(b, n, qp, kp)
    return keep

  return visible


def _local_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, visible, causal, score_mod, scale,
                     implementation):
  """One block: this device's queries against one key/value chunk, in global positions. Returns the
  block's `(out [B,Tl,N,h] float32, lse [B,Tl,N])`."""
  def seg(s, b, i):
    return None if s is None else s[b, i]

  def mask(b, n, qi, ki):
    return visible(b, n, q_pos[qi], k_pos[ki], seg(q_seg, b, qi), seg(k_seg, b, ki))

  score = None
  if score_mod is not None:
    def score(s, b, n, qi, ki):
      return score_mod(s, b, n, q_pos[qi], k_pos[ki])

  def compute(_):
    out, lse = flex.flex_attention(q, k, v, mask_mod=mask, score_mod=score, scale=scale,
                                   return_residuals=True, implementation=implementation)
    return out.astype(jnp.float32), lse

  def empty(_):
    return (jnp.zeros(q.shape[:3] + (v.shape[3],), jnp.float32),
            jnp.full(q.shape[:3], -jnp.inf, jnp.float32))

  if not causal:
    return compute(None)
  # A block whose every key comes after every query is empty under causal attention: skip it on
  # this device (a bound on positions, O(T/P); other masks skip tiles inside flex).
  any_visible = jnp.max(q_pos) >= jnp.min(k_pos)
  return jax.lax.cond(any_visible, compute, empty, None)


def _ring(q, k, v, q_pos, seg, *, axis, devices, has_seg, common):
  """Ring attention on this device's queries (inside the shard_map), with its own backward: the
  forward keeps only this device's q, k, v, output and log-sum-exp (O(T/P)); the backward passes
  each key/value chunk around the ring again, with its dK, dV accumulating as it travels, so no
  device ever holds more than one foreign chunk."""
  ring = [(i, (i + 1) % devices) for i in range(devices)]

  def block(q, q_pos, q_seg, k_c, v_c, k_pos, k_seg):
    return _local_attention(q, k_c, v_c, q_pos, k_pos, q_seg if has_seg else None,
                            k_seg if has_seg else None, **common)

  # Positions and segment ids are arguments, not closures: a custom VJP may not capture tracers.
  def forward(q, k, v, q_pos, seg):
    def step(carry, _):
      chunk, acc_out, acc_lse = carry
      # Start passing the chunk on before using it, so the transfer can overlap the block. A
      # loop (not P unrolled steps) keeps one chunk in flight.
      following = jax.lax.ppermute(chunk, axis, ring)
      out, lse = block(q, q_pos, seg, *chunk)
      acc_out, acc_lse = merge_attention_states([acc_out, out], [acc_lse, lse],
                                                implementation="xla")
      return (following, acc_out, acc_lse), None

    empty = (jnp.zeros(q.shape[:3] + (v.shape[3],), jnp.float32),
             jnp.full(q.shape[:3], -jnp.inf, jnp.float32))
    # P − 1 steps each pass a chunk on while using it; the last chunk to arrive is used alone.
    (last, acc_out, acc_lse), _ = jax.lax.scan(step, ((k, v, q_pos, seg),) + empty, None,
                                               length=devices - 1)
    out, lse = block(q, q_pos, seg, *last)
    return merge_attention_states([acc_out, out], [acc_lse, lse], implementation="xla")

  @jax.custom_vjp
  def attention(q, k, v, q_pos, seg):
    out, _ = forward(q, k, v, q_pos, seg)
    return out.astype(q.dtype)

  def attention_fwd(q, k, v, q_pos, seg):
    out, lse = forward(q, k, v, q_pos, seg)
    return out.astype(q.dtype), (q, k, v, q_pos, seg, out, lse)

  def attention_bwd(residuals, d_out):
    q, k, v, q_pos, seg, out, lse = residuals
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)                      # D_i = dO_i · O_i
    finite = jnp.isfinite(lse)
    lse_safe = jnp.where(finite, lse, 0.0)

    def block_loss(q, k_c, v_c, k_pos, k_seg):
      # Σ_i Σ_j P_ij (dO_i · v_j − D_i) with P_ij = exp(s_ij − L_i) of the global L: its gradient
      # in (q, k_c, v_c) is this block's share of the attention's (dq, dk, dv).
      o_b, l_b = block(q, q_pos, seg, k_c, v_c, k_pos, k_seg)
      w = jnp.where(finite & jnp.isfinite(l_b), jnp.exp(l_b - lse_safe), 0.0)
      return jnp.sum(w * (jnp.sum(d_out * o_b, axis=-1) - delta))

    grads = jax.grad(block_loss, argnums=(0, 1, 2))

    def step(carry, _):
      (k_c, v_c, k_pos, k_seg), dk_c, dv_c, dq = carry
      g_q, g_k, g_v = grads(q, k_c, v_c, k_pos, k_seg)
      # The chunk and its accumulated gradients move on together; after P moves they are home.
      moved = jax.lax.ppermute(((k_c, v_c, k_pos, k_seg), dk_c + g_k, dv_c + g_v), axis, ring)
      return moved + (dq + g_q,), None

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    (_, dk, dv, dq), _ = jax.lax.scan(
        step, ((k, v, q_pos, seg), zeros(k), zeros(v), zeros(q)), None, length=devices)
    no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731  integer inputs
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), no_grad(q_pos),
            no_grad(seg))

  attention.defvjp(attention_fwd, attention_bwd)
  return attention(q, k, v, q_pos, seg)


def context_parallel_attention(q: Query, k: Key, v: Value, *, mesh: Mesh, axis: str = "context",
                               causal: bool = False, segment_ids=None,
                               mask_mod: Optional[Callable] = None,
                               score_mod: Optional[Callable] = None,
                               block_mask: Optional[BlockMask] = None, scale: Optional[float] = None,
                               layout: str = "zigzag", strategy: str = "ring",
                               implementation: Optional[str] = "xla") -> Output:
  """Softmax attention of a sequence sharded along T over the mesh axis `axis` (module docstring).

  Args:
    q, k, v: `[B, T, N, H]`, `[B, T, K, H]`, `[B, T, K, h]` (self-attention), K dividing N.
    mesh: the device mesh; its `axis` (size P) splits T, and its batch axes ("data", "fsdp") B
      (when B divides over them; otherwise every device of a context ring holds the whole batch).
    causal, segment_ids `[B, T]`: as the operator contract. mask_mod, score_mod: in global
      positions (`flex_attention`'s signatures with q_idx, kv_idx the tokens' positions).
    block_mask: a static `BlockMask` over the whole sequence (`create_block_mask` with T = S);
      its tiles must align with the devices' chunks (T/P tokens, T/2P in the zigzag layout).
    scale: multiplies q·k (default H ** -0.5). layout: "zigzag" or "contiguous".
    strategy: "ring" (K/V passed around the ring) or "allgather" (gathered once).
    implementation: the flex implementation each device runs ("xla" by default).
  """
  op = "context_parallel_attention"
  B, T, S, N, _, H, _ = checks.check_qkv(op, q, k, v)
  if T != S:
    raise ValueError(f"{op}: self-attention only (queries and keys share the sharded sequence), "
                     f"got T = {T}, S = {S}")
  if axis not in mesh.axis_names:
    raise ValueError(f"{op}: the mesh has no axis {axis!r}; its axes are {mesh.axis_names}")
  if strategy not in STRATEGIES:
    raise ValueError(f"{op}: `strategy` must be one of {STRATEGIES}, got {strategy!r}")
  devices = mesh.shape[axis]
  pos = layout_positions(T, devices, layout)           # raises when T does not divide
  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  if B % int(np.prod([mesh.shape[a] for a in batch_axes], dtype=int)):
    batch_axes = ()  # a batch that does not split (e.g. an init batch of 1) is replicated
  if block_mask is not None:
    _check_block_mask(op, block_mask, T, devices, layout)
    mask_mod = masks.combine_masks(mask_mod, block_mask.as_mask_mod())
    if block_mask.kv_num_blocks.shape[0] > 1:
      batch_axes = ()  # its tiles are indexed by the global batch row
  if segment_ids is not None:
    checks.check_shape(op, "segment_ids", segment_ids, (B, T), "[B, T]")
  scale = H ** -0.5 if scale is None else scale
  batch = batch_axes if batch_axes else None
  tokens = P(batch, axis)
  visible = _visible_fn(causal, mask_mod, N)
  has_seg = segment_ids is not None

  def local(q, k, v, q_pos, seg):
    if layout == "zigzag" and devices > 1:
      q, k, v, seg = (_zigzag_exchange(x, axis, devices, forward=True) for x in (q, k, v, seg))
      out = attend(q, k, v, q_pos, seg)
      return _zigzag_exchange(out, axis, devices, forward=False)
    return attend(q, k, v, q_pos, seg)

  def attend(q, k, v, q_pos, seg):
    q_seg = seg if has_seg else None
    common = dict(visible=visible, causal=causal, score_mod=score_mod, scale=scale,
                  implementation=implementation)
    if strategy == "allgather" or devices == 1:
      gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)  # noqa: E731
      k_all, v_all, k_pos = gather(k), gather(v), jax.lax.all_gather(q_pos, axis, tiled=True)
      k_seg = gather(seg) if has_seg else None
      out, _ = _local_attention(q, k_all, v_all, q_pos, k_pos, q_seg, k_seg, **common)
      return out.astype(q.dtype)
    return _ring(q, k, v, q_pos, seg, axis=axis, devices=devices, has_seg=has_seg, common=common)

  seg_arg = jnp.asarray(segment_ids) if has_seg else jnp.zeros((B, T), jnp.int32)
  run = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, P(axis), tokens),
                      out_specs=tokens, check_vma=False)
  # The tokens stay in their order and sharding; inside the mesh each device swaps chunks into the
  # layout (`pos` gives each layout slot its global position) and back.
  return run(q, k, v, jnp.asarray(pos), seg_arg)


def _check_block_mask(op, block_mask, T, devices, layout):
  """A block mask over the whole sequence, known before tracing, whose tiles fall inside chunks."""
  if not isinstance(block_mask, BlockMask) or not block_mask.is_static:
    raise ValueError(f"{op}: `block_mask` must be a static BlockMask (create_block_mask of a mask "
                     "that reads no traced values); pass a traced mask as `mask_mod`")
  if tuple(block_mask.seq_lengths) != (T, T):
    raise ValueError(f"{op}: `block_mask` was built for (T, S) = {tuple(block_mask.seq_lengths)}, "
                     f"the sequence has T = S = {T}")
  chunk = T // devices // (2 if layout == "zigzag" and devices > 1 else 1)
  bq, bk = block_mask.block_size
  if chunk % bq or chunk % bk:
    raise ValueError(f"{op}: the block mask's tiles ({bq}, {bk}) do not align with the shards: "
                     f"each chunk holds {chunk} tokens (T = {T} over {devices} devices, {layout} "
                     f"layout); build it with block sizes that divide {chunk}")


def current_context_size(axis: str = "context") -> int:
  """The size of `axis` in the mesh set by `jax.set_mesh` (the trainer sets it), 1 without one."""
  mesh = jax.sharding.get_abstract_mesh()
  return int(mesh.shape[axis]) if axis in mesh.axis_names else 1


# Keywords every form takes besides its mechanism's own (`Mechanism.flex_mods`).
_FORM_KEYWORDS = frozenset({"scale", "implementation"})


def layer_attention(mech: Mechanism, q: Query, k: Key, v: Value, *, causal: bool, segment_ids,
                    kwargs: dict) -> Optional[Output]:
  """What `attnjax.nn.MultiHeadAttention` runs for a self-attention over the whole sequence when the
  current mesh has `context` > 1: mechanism `mech` as context-parallel flex attention (zigzag ring)
  under its `flex_mods`. None when the mesh has no context axis, the mechanism has no such form, the
  call has keywords the form does not take or traced ones (learned settings), or T does not divide
  over the devices; the layer then runs the mechanism itself (feature-mapped linear attention
  through `recurrence.layer_scope`) and XLA partitions it."""
  devices = current_context_size()
  if devices <= 1 or mech.flex_mods is None:
    return None
  if isinstance(segment_ids, (tuple, list)) or q.shape[1] != k.shape[1] or q.shape[1] % devices:
    return None
  given = {key: x for key, x in kwargs.items() if x is not None}
  if set(given) - mech.flex_mods_keywords - _FORM_KEYWORDS or any(
      isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(given)):
    return None
  mods = mech.flex_mods_for(causal, q.shape[2], given)
  if mods is None:
    return None
  layout = "zigzag" if q.shape[1] % (2 * devices) == 0 else "contiguous"
  return context_parallel_attention(
      q, k, v, mesh=jax.sharding.get_abstract_mesh(), causal=mods.get("causal", causal),
      segment_ids=segment_ids, mask_mod=mods.get("mask_mod"), score_mod=mods.get("score_mod"),
      scale=given.get("scale"), layout=layout, implementation=given.get("implementation") or "xla")
