"""PyTorch peers for the benchmark: `scaled_dot_product_attention` and `flex_attention` on the same
case, when torch is installed (extra `bench`). Timed with the same warm-up / median protocol; memory is
not reported for torch (it has no compiled memory analysis on CPU)."""

from __future__ import annotations

import statistics
import time

from attnjax.bench.cases import Case


def available() -> bool:
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def _inputs(case: Case, backward: bool):
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(0)
  dtype = getattr(torch, case.dtype)
  # torch attention takes [B, N, T, H].
  make = lambda: torch.randn(case.B, case.N, case.T, case.H, generator=gen, dtype=dtype,
                             requires_grad=backward)
  return make(), make(), make()


def sdpa_fn(case: Case):
  import torch  # pylint: disable=import-outside-toplevel
  F = torch.nn.functional
  if case.mask == "none":
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
  if case.mask == "causal":
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
  mask = torch.from_numpy(case.dense_mask().copy())
  return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def flex_fn(case: Case):
  import torch  # pylint: disable=import-outside-toplevel
  try:
    from torch.nn.attention import flex_attention as fa  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise NotImplementedError(f"torch flex_attention unavailable: {e}") from e
  seg = torch.from_numpy(case.segment_ids()[0].copy())
  mods = {
      "none": None,
      "causal": lambda b, h, q, kv: q >= kv,
      "window": lambda b, h, q, kv: (q >= kv) & (q - kv < case.window),
      "documents": lambda b, h, q, kv: (q >= kv) & (seg[q] == seg[kv]),
  }
  mask_mod = mods[case.mask]
  block_mask = None if mask_mod is None else fa.create_block_mask(
      mask_mod, None, None, case.T, case.T, device="cpu")
  compiled = torch.compile(fa.flex_attention)
  return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


PROVIDERS = {"torch_sdpa": sdpa_fn, "torch_flex": flex_fn}


def measure(provider: str, case: Case, mode: str, *, repeats: int, warmup: int) -> dict:
  """Median wall time of `repeats` runs after `warmup` runs; raises NotImplementedError if unusable."""
  if not available():
    raise NotImplementedError("torch is not installed (pip install -e .[bench])")
  import torch  # pylint: disable=import-outside-toplevel
  backward = mode == "fwd_bwd"
  fn = PROVIDERS[provider](case)
  q, k, v = _inputs(case, backward)
  dout = torch.randn(case.B, case.N, case.T, case.H, dtype=q.dtype)

  def run():
    out = fn(q, k, v)
    if backward:
      torch.autograd.grad(out, (q, k, v), dout)

  try:
    for _ in range(warmup):
      run()
  except Exception as e:  # pylint: disable=broad-except
    raise NotImplementedError(f"{provider} failed: {type(e).__name__}: {str(e)[:200]}") from e
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return dict(time_s=statistics.median(times))
