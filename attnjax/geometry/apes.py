"""APES: attention-based point cloud edge sampling. A point set is downsampled to the M points whose
attention is most distinctive: the points on edges and corners of the shape.

Wu, Zheng, Zhou, Zhang, Lin, Shen, Wang, Chen, "Attention-based Point Cloud Edge Sampling",
arXiv:2302.14673 (CVPR 2023). Features x [N, C] per point; the authors' code (JunweiZheng93/APES,
`apes/models/utils/layers.py`) is followed exactly:

  local  (neighbour-to-point attention): the K nearest neighbours j of point i in feature space
         (i itself included), d_ij = x_j - x_i,
           a_i = softmax_j( (x_i W_q)·(d_ij W_k) / sqrt(C) )                    [N, K]
           score_i = std_j(a_ij)                 (population std: the paper's "sharp" rows are
                                                  edges, flat rows interior points)
           out_m = Σ_j a_{i_m j} (d_{i_m j} W_v)  for the M points of highest score
  global (point-to-point attention):
           A = softmax_j( (x_i W_q)·(x_j W_k) / sqrt(C) )                       [N, N]
           score_j = Σ_i A_ij                    (the attention point j receives)
           out_m = Σ_j A_{i_m j} (x_j W_v)       for the M points of highest score

Shapes: `x [B, N, C]`, `query`, `key`, `value` `[C, C]` → `[B, M, C]` (and the chosen indices `[B, M]`
with `return_indices`). The selection (top-M) carries no gradient; the outputs do.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.typing import Array, Float, Int

__all__ = ["APESDownsample", "MODES", "apes_downsample", "knn_indices"]

MODES = ("local", "global")
Points = Float[Array, "B N C"]
Sampled = Float[Array, "B M C"]
Kernel = Float[Array, "C C"]
Neighbours = Int[Array, "B N K"]


def knn_indices(x: Points, k: int) -> Neighbours:
  """The `k` nearest points of each point by squared Euclidean distance of the features (the point
  itself first: distance 0), `[B, N, k]`."""
  sq = jnp.sum(x * x, axis=-1)
  dist = sq[:, :, None] - 2.0 * jnp.einsum("bnc,bmc->bnm", x, x) + sq[:, None, :]
  return jax.lax.top_k(-dist, k)[1]


def apes_downsample(x: Points, *, query: Kernel, key: Kernel, value: Kernel, num_points: int,
                    mode: str = "local", num_neighbors: int = 32,
                    return_indices: bool = False):
  """APES edge sampling (module docstring): the `num_points` (M) points of highest attention
  score and their attention outputs, `[B, N, C] -> [B, M, C]`; `mode` "local" (N2P, K =
  `num_neighbors`) or "global" (P2P)."""
  op = "apes_downsample"
  if jnp.ndim(x) != 3:
    raise ValueError(f"{op}: `x` must be [B, N, C], got shape {jnp.shape(x)}")
  b, n, c = x.shape
  for name, w in (("query", query), ("key", key), ("value", value)):
    if jnp.shape(w) != (c, c):
      raise ValueError(f"{op}: `{name}` must be [C, C] = [{c}, {c}], got shape {jnp.shape(w)}")
  if mode not in MODES:
    raise ValueError(f"{op}: `mode` must be one of {MODES}, got {mode!r}")
  if not 1 <= num_points <= n:
    raise ValueError(f"{op}: `num_points` must be in [1, N] = [1, {n}], got {num_points}")
  f = x.astype(jnp.float32)
  wq, wk, wv = (jnp.asarray(w, jnp.float32) for w in (query, key, value))
  q = f @ wq
  rows = jnp.arange(b)[:, None]
  if mode == "local":
    if not 1 <= num_neighbors <= n:
      raise ValueError(f"{op}: `num_neighbors` must be in [1, N] = [1, {n}], got {num_neighbors}")
    idx = knn_indices(jax.lax.stop_gradient(f), num_neighbors)               # [B, N, K]
    diff = f[rows[:, :, None], idx] - f[:, :, None, :]                        # [B, N, K, C]
    att = jax.nn.softmax(jnp.einsum("bnc,bnkc->bnk", q, diff @ wk) / jnp.sqrt(jnp.float32(c)),
                         axis=-1)
    score = jnp.std(att, axis=-1)
    chosen = jax.lax.top_k(jax.lax.stop_gradient(score), num_points)[1]      # [B, M]
    out = jnp.einsum("bmk,bmkc->bmc", att[rows, chosen], (diff @ wv)[rows, chosen])
  else:
    att = jax.nn.softmax(jnp.einsum("bnc,bmc->bnm", q, f @ wk) / jnp.sqrt(jnp.float32(c)), axis=-1)
    score = jnp.sum(att, axis=1)
    chosen = jax.lax.top_k(jax.lax.stop_gradient(score), num_points)[1]
    out = jnp.einsum("bmn,bnc->bmc", att[rows, chosen], f @ wv)
  out = out.astype(x.dtype)
  return (out, chosen) if return_indices else out


class APESDownsample(nn.Module):
  """Creates APES's bias-free 1x1 projections (PyTorch's Conv default initializer, as the
  authors' `nn.Conv1d/2d(..., bias=False)`) and calls `apes_downsample`. `num_points` None: N / 2."""
  num_points: Optional[int] = None
  mode: str = "local"
  num_neighbors: int = 32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Points) -> Sampled:
    c = x.shape[-1]
    # Conv with kernel 1: uniform in ±1/sqrt(fan_in), fan_in = C.
    bound = 1.0 / jnp.sqrt(c)
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
    weights = {name: self.param(name, init, (c, c), self.param_dtype)
               for name in ("query", "key", "value")}
    m = self.num_points or max(x.shape[1] // 2, 1)
    return apes_downsample(x, **weights, num_points=m, mode=self.mode,
                           num_neighbors=min(self.num_neighbors, x.shape[1]))


modules.register_module(modules.Module(
    name="apes_downsample", fn=apes_downsample, linen=APESDownsample, kind="points",
    family="geometric", seeds=(180,), paper="Attention-based Point Cloud Edge Sampling",
    arxiv="2302.14673", keeps_shape=False,
    out_shape=lambda s, st: (s[0], st.get("num_points") or max(s[1] // 2, 1), s[2]),
    example={"num_points": 8, "num_neighbors": 6}))
