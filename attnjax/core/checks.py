"""Input validation shared by the operators: clear errors at entry, naming the argument and the
shape it should have (letters as in `attnjax.typing`)."""

from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np


def check_qkv(op: str, q, k, v) -> tuple[int, int, int, int, int, int, int]:
  """Checks `q: [B,T,N,H]`, `k: [B,S,K,H]`, `v: [B,S,K,h]` with K dividing N; returns
  (B,T,S,N,K,H,h)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if jnp.ndim(x) != 4:
      letters = {"q": "[B, T, N, H]", "k": "[B, S, K, H]", "v": "[B, S, K, h]"}[name]
      raise ValueError(f"{op}: `{name}` must have shape {letters}, got shape {jnp.shape(x)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise TypeError(f"{op}: `{name}` must be floating point, got {jnp.result_type(x)}")
  B, T, N, H = q.shape
  if k.shape[0] != B or k.shape[3] != H:
    raise ValueError(f"{op}: `k` must have shape [B={B}, S, K, H={H}] to match q {q.shape}, "
                     f"got {k.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"{op}: `v` must have shape [B, S, K, h] = [{k.shape[0]}, {k.shape[1]}, "
                     f"{k.shape[2]}, h] to match k {k.shape}, got {v.shape}")
  S, K, h = k.shape[1], k.shape[2], v.shape[3]
  if K == 0 or N % K:
    raise ValueError(f"{op}: the {K} key/value heads of `k` must divide the {N} query heads of `q` "
                     f"(GQA); got q {q.shape}, k {k.shape}")
  if min(B, T, S, N, H, h) == 0:
    raise ValueError(f"{op}: empty input: q {q.shape}, k {k.shape}, v {v.shape}")
  return B, T, S, N, K, H, h


def check_shape(op: str, name: str, x, expected: tuple, letters: str):
  """Raises unless `x.shape == expected` (entries None are free)."""
  shape = jnp.shape(x)
  if len(shape) != len(expected) or any(e is not None and e != s
                                        for e, s in zip(expected, shape, strict=True)):
    want = ", ".join("?" if e is None else str(e) for e in expected)
    raise ValueError(f"{op}: `{name}` must have shape {letters} = [{want}], got {shape}")


def check_broadcastable(op: str, name: str, x, target: tuple, letters: str):
  """Raises unless `x` has `len(target)` dims, each equal to the target's or 1."""
  shape = jnp.shape(x)
  if len(shape) != len(target) or any(s not in (1, t) for s, t in zip(shape, target, strict=True)):
    raise ValueError(f"{op}: `{name}` must be broadcastable to {letters} = {list(target)} "
                     f"(same rank, each dim equal or 1), got shape {shape}")


def is_static_zero(q_offset) -> bool:
  """Whether `q_offset` is the Python / numpy integer 0 (a full forward, known at trace time)."""
  return isinstance(q_offset, (int, np.integer)) and int(q_offset) == 0


def check_implementation(op: str, implementation: Optional[str],
                         choices: Sequence[str] = ("xla", "reference")) -> str:
  """`implementation`, or the first of `choices` when None; an unknown name is a clear error."""
  impl = choices[0] if implementation is None else implementation
  if impl not in choices:
    raise ValueError(f"{op}: unknown implementation {implementation!r}; choose from "
                     f"{list(choices)}")
  return impl


def check_param_shapes(op: str, shapes: dict, params: dict):
  """Raises unless each `params[name]` has shape `shapes[name] = (expected, letters)` (see
  `check_shape`): one check for all the learned arrays an operator takes."""
  for name, (expected, letters) in shapes.items():
    check_shape(op, name, params[name], expected, letters)


def check_paged(op: str, q, k_pages, v_pages, page_table, kv_lengths, q_offset, pages_per_split):
  """Raises ValueError (naming `op` and the argument) unless the arguments of paged attention
  (`attnjax.core.paged_attention`) have the documented shapes and dtypes."""
  for name, x, letters in (("q", q, "[B, T, N, H]"), ("k_pages", k_pages, "[P, page_size, K, H]"),
                           ("v_pages", v_pages, "[P, page_size, K, h]")):
    if jnp.ndim(x) != 4 or 0 in jnp.shape(x):
      raise ValueError(f"{op}: `{name}` must have shape {letters} (no empty axis), got shape "
                       f"{jnp.shape(x)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"{op}: `{name}` must be floating point, got {jnp.result_type(x)}")
  B, _, N, H = q.shape
  P, ps, K = k_pages.shape[:3]
  if k_pages.shape[3] != H or N % K:
    raise ValueError(f"{op}: `k_pages` must have shape [P, page_size, K, H] with H = {H} and K "
                     f"dividing the N = {N} query heads of q {q.shape}, got {k_pages.shape}")
  if v_pages.shape[:3] != (P, ps, K):
    raise ValueError(f"{op}: `v_pages` must have shape [P, page_size, K, h] = [{P}, {ps}, {K}, h] "
                     f"to match k_pages {k_pages.shape}, got {v_pages.shape}")
  check_shape(op, "page_table", page_table, (B, None), "[B, max_pages]")
  check_shape(op, "kv_lengths", kv_lengths, (B,), "[B]")
  for name, x, letters in (("page_table", page_table, "[B, max_pages]"),
                           ("kv_lengths", kv_lengths, "[B]")):
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
      raise ValueError(f"{op}: `{name}` must be an integer array of shape {letters}, got dtype "
                       f"{jnp.result_type(x)}")
  if page_table.shape[1] == 0:
    raise ValueError(f"{op}: `page_table` must have shape [B, max_pages] with max_pages >= 1, got "
                     f"{page_table.shape}")
  if jnp.ndim(q_offset) not in (0, 1) or (jnp.ndim(q_offset) == 1 and jnp.shape(q_offset) != (B,)):
    raise ValueError(f"{op}: `q_offset` must be an int or have shape [B] = [{B}], got shape "
                     f"{jnp.shape(q_offset)}")
  if pages_per_split is not None and int(pages_per_split) < 1:
    raise ValueError(f"{op}: `pages_per_split` must be >= 1, got {pages_per_split}")
