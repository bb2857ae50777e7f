"""Window attention (Swin's W-MSA / SW-MSA) and multi-scale sliding windows (MSWA).

Window attention: tokens on a grid `spatial_shape` (row-major, `attnjax.core.grid`; None = the 1-D
sequence) are tiled by non-overlapping windows of `window_size`, and softmax attention runs inside each
window. A cyclic `shift` gives Swin's shifted windows: roll the map by -shift, partition, mask tokens
of different original regions apart, roll back. On the original coordinates that is the tiling
started at `shift - window` (`attnjax.core.windows`), so the whole computation is one `mask_mod` and
no data moves:

    o_i = Σ_{j ∈ win(i)} softmax_j(scale · q_i·k_j + B[Δ(i, j), n]) v_j
    win_a(c) = (c + (w_a - s_a) mod w_a) // w_a           (per grid axis a; same window on every axis)

`swin_window_attention` adds Swin's learned relative position bias `B = relative_position_bias
[(2C-1)^2, N]`, read at `(Δh + C-1)(2C-1) + (Δw + C-1)` for `Δ = coords(i) - coords(j)`, exactly
Swin's table and index when C equals the window (a larger table serves every window up to C x C; the
Flax layer sizes it from `window_size`, C = its largest side). A 1-D sequence is the grid (1, L).
`window_attention` is the same without the bias (the computation Flash Window Attention fuses,
catalog row 164).

Sides that are not multiples of the window: the last window on that axis is smaller. That is Swin's
padding to a multiple with the padded tokens masked out as keys (Swin's detection code lets them in
as bias-only keys; we do not). Swin also sets shift = 0 and window = side when a side is not larger
than the window; that is the caller's (the stage's) choice here, the operator does what it is asked.
Causal masking applies inside the windows; `q_offset` / `kv_lengths` decode over a KV cache (windows
are fixed by absolute positions); packed 1-D documents restart the tiling at their start.

MSWA (`multi_scale_window_attention`): causal sliding-window attention with a window per head, keys
`[p - w_n + 1, p]` for query head n at position p (non-causal: `|p - j| < w_n`, the library's
meaning of a window). `window=w` gives the paper's MSWA-h allocation: the heads in four equal groups
with windows w/4, w/2, w, 2w (head n in group floor(4n / N)); `head_windows` sets them freely. The
paper's layer-wise allocation (MSWA-l: larger windows in deeper layers) is a per-layer setting:
`TransformerConfig.mechanism_kwargs` holds one dict per layer (tested in
tests/ops/local/window_test.py); `ModelConfig` keys kwargs by mechanism name, so it has one per name.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`; self-attention (T == S, or a
query block over a KV cache).
Papers: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
arXiv:2103.14030; Zhang, "Flash Window Attention: speedup the attention computation for Swin
Transformer", arXiv:2501.06480; Xu et al., "MSWA: Refining Local Attention with Multi-Scale Window
Attention", arXiv:2501.01039.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import windows
from attnjax.core.relative import query_position
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["window_attention", "swin_window_attention", "multi_scale_window_attention",
           "mswa_head_windows", "SWIN_BIAS_WINDOW"]

# Swin's window size: the default of `swin_window_attention`, whose bias table the Flax layer sizes
# from the mechanism's `window_size` setting (C = its largest side).
SWIN_BIAS_WINDOW = 7

BiasTable = Float[Array, "R N"]


def window_attention(q: Query, k: Key, v: Value, *, window_size=7, shift=0,
                     spatial_shape: Optional[Sequence[int]] = None,
                     relative_position_bias: Optional[BiasTable] = None, causal: bool = False,
                     segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                     scale: Optional[float] = None, implementation: Optional[str] = None) -> Output:
  """Window attention (Swin W-MSA, shifted with `shift`): softmax inside non-overlapping windows.

  `window_size` and `shift`: an int or one per grid axis; `spatial_shape`: the grid of the S key
  tokens (None: 1-D). `relative_position_bias` `[(2C-1)^2, N]`: Swin's learned bias (optional).
  """
  op = "window_attention"
  B, T, S, N, _, _, _ = checks.check_qkv(op, q, k, v)
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                segment_ids=segment_ids)
  shape, window, shifts = windows.window_settings(op, spatial_shape, S, window_size, shift)
  starts = None
  if segment_ids is not None:
    if len(shape) > 1:
      raise ValueError(f"{op}: `segment_ids` (packed documents) are for 1-D sequences, not a grid "
                       f"{shape}")
    starts = contract.document_bounds(segment_ids, B, S)[0]
  score_mod = None
  if relative_position_bias is not None:
    if len(shape) > 2:
      raise ValueError(f"{op}: Swin's relative position bias is for 1-D or 2-D grids, got {shape}")
    c = windows.bias_table_window(op, relative_position_bias, N)
    if max(window) > c:
      raise ValueError(f"{op}: `relative_position_bias` covers windows up to {c} x {c}; "
                       f"window_size is {window_size!r}")
    # Offsets inside one window do not depend on where a packed document starts.
    score_mod = windows.relative_bias_mod(jnp.asarray(relative_position_bias, jnp.float32), shape,
                                          offset=q_offset)
  mask_mod = windows.window_mask(shape, window, shifts, offset=q_offset, starts=starts)
  return contract.flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation, mask_mod=mask_mod,
                                     score_mod=score_mod)


def swin_window_attention(q: Query, k: Key, v: Value, *, relative_position_bias: BiasTable,
                          window_size=7, shift=0, spatial_shape: Optional[Sequence[int]] = None,
                          causal: bool = False, segment_ids=None, q_offset=0,
                          kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                          implementation: Optional[str] = None) -> Output:
  """Swin's (shifted) window attention with its learned relative position bias `[(2C-1)^2, N]`."""
  return window_attention(q, k, v, window_size=window_size, shift=shift, spatial_shape=spatial_shape,
                          relative_position_bias=relative_position_bias, causal=causal,
                          segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
                          scale=scale, implementation=implementation)


def mswa_head_windows(window: int, num_heads: int) -> tuple[int, ...]:
  """MSWA-h's allocation: head n gets `(w/4, w/2, w, 2w)[floor(4n / N)]` (at least 1)."""
  scales = (0.25, 0.5, 1.0, 2.0)
  return tuple(max(1, int(window * scales[4 * n // num_heads])) for n in range(num_heads))


def multi_scale_window_attention(q: Query, k: Key, v: Value, *, window: Optional[int] = None,
                                 head_windows: Optional[Sequence[int]] = None, causal: bool = False,
                                 segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                                 scale: Optional[float] = None,
                                 implementation: Optional[str] = None) -> Output:
  """MSWA: sliding-window attention with a window per head (`head_windows`, or MSWA-h from `window`).

  Query head n at position p sees keys `[p - w_n + 1, p]` (causal) or `|p - j| < w_n`.
  """
  op = "multi_scale_window_attention"
  B, T, S, N, _, _, _ = checks.check_qkv(op, q, k, v)
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                segment_ids=segment_ids)
  if (window is None) == (head_windows is None):
    raise ValueError(f"{op}: pass exactly one of `window` (MSWA-h allocation) and `head_windows` "
                     f"(one int per query head, N = {N})")
  if head_windows is None:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
      raise ValueError(f"{op}: `window` must be an int >= 1, got {window!r}")
    head_windows = mswa_head_windows(int(window), N)
  head_windows = tuple(head_windows)
  if (len(head_windows) != N or any(isinstance(w, bool) or not isinstance(w, (int, np.integer))
                                    or w < 1 for w in head_windows)):
    raise ValueError(f"{op}: `head_windows` must be N = {N} ints >= 1 (one per query head), got "
                     f"{head_windows!r}")
  widths = jnp.asarray(np.asarray(head_windows, np.int32))

  def mask_mod(b, n, q_idx, kv_idx):
    distance = query_position(q_offset, b, q_idx) - kv_idx
    return jnp.abs(distance) < widths[n]

  return contract.flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation, mask_mod=mask_mod)


def _mswa_state_size(T, N, K, H, h, kw):
  # Decoding keeps, per key/value head, the last max(w_n) keys of the query heads reading it (the
  # whole cache when no window is set yet: the call must then give one).
  if not kw.get("head_windows") and kw.get("window") is None:
    return T * K * (H + h)
  widths = kw.get("head_windows") or mswa_head_windows(kw["window"], N)
  group = N // K
  return sum(max(min(w, T) for w in widths[g * group:(g + 1) * group]) for g in range(K)) * (H + h)


_SELF = frozenset({"self", "causal_self"})
_SWIN = dict(paper="Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
             arxiv="2103.14030")


def _bias_shape(N, K, H, window_size=SWIN_BIAS_WINDOW):
  del K, H
  side = max(window_size) if isinstance(window_size, (tuple, list)) else window_size
  return ((2 * side - 1) ** 2, N)


SWIN_PARAMS = (ParamSpec("relative_position_bias", _bias_shape,
                         jax.nn.initializers.truncated_normal(0.02), settings=("window_size",)),)


def _swin_example(*, N, K, H):
  # A table for windows up to 4 x 4 ([49, N]); perturbed so its rows differ visibly.
  settings = {"window_size": 4, "shift": 2}
  return {**settings, **example_params(SWIN_PARAMS, N=N, K=K, H=H, perturb=0.5, settings=settings)}


register(Mechanism(
    name="window_attention", fn=window_attention, family="local-window", seeds=(164,), **_SWIN,
    patterns=_SELF, complexity="O(T·w)", example={"window_size": 4, "shift": 2}))
register(Mechanism(
    name="swin_window_attention", fn=swin_window_attention, family="local-window", seeds=(164,),
    **_SWIN, patterns=_SELF, complexity="O(T·w)", params=SWIN_PARAMS, example=_swin_example))
register(Mechanism(
    name="multi_scale_window_attention", fn=multi_scale_window_attention, family="local-window",
    seeds=(175,), paper="MSWA: Refining Local Attention with Multi-Scale Window Attention",
    arxiv="2501.01039", patterns=_SELF, complexity="O(T·max w_n)", example={"window": 4},
    state_size=_mswa_state_size))
