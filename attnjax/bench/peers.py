"""The attention implementations a benchmark case compares, each built for one shape and mask.

Peers:
  xla, reference, cpu_flash
                  attnjax `flex_attention` with that implementation (`cpu_flash`: the fused C++
                  kernel, the CPU default).
  jax_nn          `jax.nn.dot_product_attention(implementation="xla")` (is_causal,
                  local_window_size, or a dense boolean mask for documents).
  GPU peers (reported as skipped, with the reason, where the default backend is not a GPU):
  pallas_triton   attnjax `flex_attention(implementation="pallas_triton")` (the Pallas kernels
                  compiled through Triton).
  pallas_mosaic_gpu
                  attnjax `flex_attention(implementation="pallas_mosaic_gpu")` (the Hopper forward
                  through Mosaic GPU, the Triton backward).
  jax_nn_cudnn    `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN's flash attention;
                  bf16 / fp16; masks as jax_nn).
  torch_sdpa      `torch.nn.functional.scaled_dot_product_attention` (is_causal or a dense mask).
  torch_flex      `torch.nn.attention.flex_attention.flex_attention` under `torch.compile`, with a
                  `create_block_mask` built outside the timed step (the FlexAttention usage).
  linear_xla, linear_parallel, linear_reference
                  attnjax `gated_linear_attention` with that implementation (chunked / quadratic /
                  `lax.scan`), q and k through elu+1, a per-head scalar decay per step (the
                  Lightning-2 rates, as a traced `[B, T, N]` argument, i.e. data-dependent gates);
                  masks `causal` or `none` (non-causal `φ(Q)(φ(K)ᵀV)`).
  linear_xla_channel, linear_reference_channel
                  the same with one gate per key channel (GLA's `[B, T, N, H]` log decay,
                  log σ(x)/16 for x ~ N(0, 1), a traced argument).
  mech:<name>     any registered mechanism by name (its fastest path: the first of its
                  `implementations` when that is its own, e.g. "gathered"; automatic dispatch
                  when it is "xla" or "reference"), with the case's
                  `kwargs` (from the config's `mechanism_kwargs[peer]`); masks `causal` and `none`
                  (`causal=True / False`). A `spatial_shape` of "square" ("cube") becomes the square
                  (cubic) grid of T tokens, e.g. (128, 128) at T = 16384.

Masks (names as in configs): `none`, `causal`, `window<W>` (causal, each query sees its last W keys,
itself included: attnjax `sliding_window(W - 1, 0)`, jax.nn `local_window_size=(W - 1, 0)`) and
`documents<L>` (packed documents of about L tokens, causal within each document, from segment ids).

Every builder returns the same thing for a mode: `fwd` computes the output; `fwd+bwd` computes the
output and the gradients of `<out, dout>` with respect to q, k and v. A case with `K < N` has K
key/value heads (GQA) for the peers that take them (flex, jax.nn).

`attention_flops(case)` counts FLOPs in the FlashAttention convention: 4·B·N·T·S·H for the forward
(two matmuls), times the fraction of (query, key) pairs the mask keeps (1/2 for causal, as in the
FlashAttention papers; the exact pair count for windows and documents), and 3.5× that for
forward+backward (the backward is 2.5× the forward).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import feature_maps
from attnjax.core import flex
from attnjax.core import masks
from attnjax.core.linear import gated_linear_attention

CHANNEL_SUFFIX = "_channel"     # a linear peer with a per-channel gate
LINEAR_PEERS = ("linear_xla", "linear_parallel", "linear_reference", "linear_xla_channel",
                "linear_reference_channel")
GPU_PEERS = ("pallas_triton", "pallas_mosaic_gpu", "jax_nn_cudnn")
JAX_PEERS = ("xla", "reference", "cpu_flash", "jax_nn") + LINEAR_PEERS + GPU_PEERS
TORCH_PEERS = ("torch_sdpa", "torch_flex")
PEERS = JAX_PEERS + TORCH_PEERS
MECHANISM_PREFIX = "mech:"
MODES = ("fwd", "fwd+bwd")
PEER_LABELS = {"xla": "attnjax xla", "reference": "attnjax reference", "jax_nn": "jax.nn",
               "cpu_flash": "attnjax cpu_flash", "pallas_triton": "attnjax pallas_triton",
               "pallas_mosaic_gpu": "attnjax pallas_mosaic_gpu", "jax_nn_cudnn": "jax.nn cudnn",
               "torch_sdpa": "torch sdpa", "torch_flex": "torch flex",
               "linear_xla": "linear xla (chunked)", "linear_parallel": "linear parallel",
               "linear_reference": "linear reference (scan)",
               "linear_xla_channel": "linear xla (chunked), per-channel gate",
               "linear_reference_channel": "linear reference (scan), per-channel gate"}


def is_mechanism_peer(peer: str) -> bool:
  """Whether `peer` names a registered mechanism (`mech:<name>`)."""
  return peer.startswith(MECHANISM_PREFIX)


def is_jax_peer(peer: str) -> bool:
  """Whether `peer` runs in JAX (built by `build_jax`)."""
  return peer in JAX_PEERS or is_mechanism_peer(peer)


def label(peer: str) -> str:
  """The peer's column name in tables and plots."""
  return PEER_LABELS.get(peer, peer[len(MECHANISM_PREFIX):] if is_mechanism_peer(peer) else peer)


class CaseSkipped(Exception):
  """A peer cannot run a case (unsupported mode, missing package); the message says why."""


@dataclasses.dataclass(frozen=True)
class Case:
  """One measurement: a peer on a mask, sequence length and mode."""
  peer: str
  mask: str
  T: int
  mode: str = "fwd+bwd"
  B: int = 1
  N: int = 8
  H: int = 64
  dtype: str = "float32"
  warmup: int = 1
  repeats: int = 5
  seed: int = 0
  max_T: Optional[int] = None      # compile and analyse, but do not run, when T exceeds this
  kwargs: tuple = ()               # a mechanism peer's keyword arguments, as sorted (name, value)
  K: Optional[int] = None          # key/value heads (GQA when < N); None: N

  @property
  def kv_heads(self) -> int:
    return self.N if self.K is None else self.K

  def __post_init__(self):
    if self.peer not in PEERS and not is_mechanism_peer(self.peer):
      raise ValueError(f"Case: unknown peer {self.peer!r}; expected one of {PEERS} or "
                       f"'{MECHANISM_PREFIX}<registered name>'")
    if self.mode not in MODES:
      raise ValueError(f"Case: unknown mode {self.mode!r}; expected one of {MODES}")
    parse_mask(self.mask)
    if self.K is not None and (self.K < 1 or self.N % self.K):
      raise ValueError(f"Case: K={self.K} key/value heads must divide N={self.N}")


def parse_mask(name: str) -> tuple[str, Optional[int]]:
  """`"window256"` → `("window", 256)`; `"none"`, `"causal"` → `(name, None)`."""
  if name in ("none", "causal"):
    return name, None
  match = re.fullmatch(r"(window|documents)(\d+)", name)
  if match is None or int(match.group(2)) <= 0:
    raise ValueError(f"unknown mask {name!r}: expected none, causal, window<W> or documents<L>")
  return match.group(1), int(match.group(2))


def document_segment_ids(B: int, T: int, doc_len: int, seed: int = 0) -> np.ndarray:
  """`[B, T]` int32 segment ids of packed documents whose lengths are uniform in
  `[doc_len / 2, 3 doc_len / 2]` (mean `doc_len`); the last document of a row is cut at T."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(B):
    lengths = []
    while sum(lengths) < T:
      lengths.append(int(rng.integers(max(1, doc_len // 2), doc_len + doc_len // 2 + 1)))
    rows.append(np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)[:T])
  return np.stack(rows)


def attention_flops(case: Case) -> float:
  """FLOPs of one step of `case` in the FlashAttention convention (module docstring)."""
  kind, param = parse_mask(case.mask)
  pairs = float(case.T) * case.T
  if kind == "causal":
    kept = 0.5 * pairs
  elif kind == "window":
    w = min(param, case.T)
    kept = w * case.T - w * (w - 1) / 2
  elif kind == "documents":
    seg = document_segment_ids(case.B, case.T, param, case.seed)
    kept = float(np.mean([sum(n * (n + 1) / 2 for n in np.bincount(row)) for row in seg]))
  else:
    kept = pairs
  forward = 4.0 * case.B * case.N * kept * case.H
  return forward * (3.5 if case.mode == "fwd+bwd" else 1.0)


def _inputs(case: Case):
  """q, dout `[B, T, N, H]`, k, v `[B, T, K, H]` (numpy, the case's dtype) and segment ids (or
  None)."""
  rng = np.random.default_rng(case.seed)
  shape = (case.B, case.T, case.N, case.H)
  kv_shape = (case.B, case.T, case.kv_heads, case.H)
  q, k, v, do = (rng.standard_normal(s, dtype=np.float32).astype(case.dtype)
                 for s in (shape, kv_shape, kv_shape, shape))
  kind, param = parse_mask(case.mask)
  seg = document_segment_ids(case.B, case.T, param, case.seed) if kind == "documents" else None
  return q, k, v, do, seg


# --------------------------------------------------------------------------------------------------
# JAX peers


def _attnjax_mask_mod(kind: str, param: Optional[int], seg):
  if kind == "none":
    return None
  if kind == "causal":
    return masks.causal()
  if kind == "window":
    return masks.sliding_window(param - 1, 0)
  return masks.and_masks(masks.causal(), masks.document(seg))


def _linear_attention(peer: str, kind: str) -> Callable:
  """`attend(q, k, v, log_decay) -> out`: the gated linear recurrence with implementation `peer`."""
  if kind not in ("causal", "none"):
    raise CaseSkipped(f"{peer} runs the causal and none masks only, not {kind!r}")
  implementation = peer[len("linear_"):].removesuffix(CHANNEL_SUFFIX)

  def attend(q, k, v, log_decay):
    causal = kind == "causal"
    return gated_linear_attention(
        feature_maps.elu_plus_one(q), feature_maps.elu_plus_one(k), v,
        log_decay=log_decay if causal else None, causal=causal, implementation=implementation)
  return attend


def _grid(value, T: int):
  """A mechanism's `spatial_shape` setting at length T ("square" / "cube": the grid of T tokens)."""
  if value not in ("square", "cube"):
    return value
  dims = 2 if value == "square" else 3
  side = round(T ** (1 / dims))
  if side ** dims != T:
    raise CaseSkipped(f"T={T} is not a {value} grid")
  return (side,) * dims


def _mechanism_attention(case: Case, kind: str) -> Callable:
  """`attend(q, k, v, seg) -> out`: a registered mechanism on the causal or none mask, with its
  learned arrays at their initial values and its per-token inputs zero (before their activation)."""
  from attnjax import registry  # pylint: disable=import-outside-toplevel
  mech = registry.get(case.peer[len(MECHANISM_PREFIX):])
  if kind not in ("causal", "none"):
    raise CaseSkipped(f"{case.peer} runs the causal and none masks only, not {kind!r}")
  kwargs = dict(case.kwargs)
  if "spatial_shape" in kwargs:
    kwargs["spatial_shape"] = _grid(kwargs["spatial_shape"], case.T)
  if mech.implementations[0] not in ("reference", "xla"):
    # A path of its own listed first (the registry lists them fastest first, e.g. "gathered"). With
    # "xla" first it runs on its primitive, whose automatic dispatch takes the platform's fastest
    # (cpu_flash on a CPU, the Pallas kernels on a GPU); never the dense reference.
    kwargs.setdefault("implementation", mech.implementations[0])
  settings = {**mech.defaults, **kwargs}
  arrays = {name: jnp.asarray(x) for name, x in registry.example_params(
      mech.params, N=case.N, K=case.N, H=case.H, settings=settings).items()}
  for spec in mech.token_inputs:
    x = jnp.zeros((case.B, case.T) + tuple(spec.shape(case.N, case.N, case.H)),
                  {"float": jnp.float32, "bool": bool, "int": jnp.int32}[spec.dtype])
    arrays[spec.name] = spec.activation(x) if spec.activation is not None else x

  def attend(q, k, v, seg):
    del seg
    return mech(q, k, v, causal=kind == "causal", **kwargs, **arrays)
  return attend


def _jax_attention(peer: str, kind: str, param: Optional[int]) -> Callable:
  """`attend(q, k, v, seg) -> out` for a JAX peer (seg is None unless the mask is documents)."""
  if is_mechanism_peer(peer):
    raise ValueError("mechanism peers are built by build_jax (they need the case's sizes)")
  if peer in LINEAR_PEERS:
    return _linear_attention(peer, kind)
  if peer in GPU_PEERS and jax.default_backend() != "gpu":
    raise CaseSkipped(f"{peer} needs a GPU (default backend: {jax.default_backend()})")
  if peer in ("xla", "reference", "cpu_flash", "pallas_triton", "pallas_mosaic_gpu"):
    def attend(q, k, v, seg):
      return flex.flex_attention(q, k, v, mask_mod=_attnjax_mask_mod(kind, param, seg),
                                 implementation=peer)
    return attend
  implementation = "cudnn" if peer == "jax_nn_cudnn" else "xla"

  def attend(q, k, v, seg):
    kwargs = {}
    if kind == "causal":
      kwargs["is_causal"] = True
    elif kind == "window":
      kwargs["local_window_size"] = (param - 1, 0)
    elif kind == "documents":
      kwargs["is_causal"] = True
      kwargs["mask"] = seg[:, None, :, None] == seg[:, None, None, :]   # [B, 1, T, S]
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
  return attend


def build_jax(case: Case) -> tuple[Callable, tuple]:
  """(fn, args) for a JAX peer: `jax.jit(fn).lower(*args)` compiles the case.

  Segment ids are an argument (traced), as in training on packed data: attnjax then builds its block
  mask inside the compiled function and jax.nn its dense mask, both from the same ids.
  """
  kind, param = parse_mask(case.mask)
  attend = (_mechanism_attention(case, kind) if is_mechanism_peer(case.peer)
            else _jax_attention(case.peer, kind, param))
  q, k, v, do, seg = _inputs(case)
  qkv = tuple(jnp.asarray(x) for x in (q, k, v))
  extra = () if seg is None else (jnp.asarray(seg),)
  if case.peer.endswith(CHANNEL_SUFFIX):   # per-channel gates, in place of segment ids
    x = jax.random.normal(jax.random.PRNGKey(case.seed + 1), (case.B, case.T, case.N, case.H))
    extra = (jax.nn.log_sigmoid(x) / 16,)
  elif case.peer in LINEAR_PEERS:   # the gates, in place of segment ids
    rates = -masks.alibi_slopes(case.N)
    extra = (jnp.broadcast_to(rates, (case.B, case.T, case.N)).astype(jnp.float32),)

  if case.mode == "fwd":
    def fn(q, k, v, *rest):
      return attend(q, k, v, rest[0] if rest else None)
    return fn, qkv + extra

  def fn_bwd(q, k, v, do, *rest):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, rest[0] if rest else None), q, k, v)
    return (out,) + vjp(do)
  return fn_bwd, qkv + (jnp.asarray(do),) + extra


# --------------------------------------------------------------------------------------------------
# PyTorch peers


def torch_available() -> bool:
  """Whether PyTorch (the optional `bench` extra) can be imported."""
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


@dataclasses.dataclass
class TorchCase:
  """A built PyTorch case: `step()` runs it once (synchronously, on CPU)."""
  step: Callable[[], None]
  argument_bytes: int
  output_bytes: int


def build_torch(case: Case) -> TorchCase:
  """The PyTorch step for a case; raises `CaseSkipped` when torch cannot run it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CaseSkipped(f"torch not importable: {e}") from e
  kind, param = parse_mask(case.mask)
  backward = case.mode == "fwd+bwd"
  if case.peer == "torch_flex" and backward:
    raise CaseSkipped(f"torch {torch.__version__} flex_attention has no CPU backward")
  q, k, v, do, seg = _inputs(case)
  # torch's layout is [B, N, T, H].
  to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 1, 2)))
  q, k, v, do = (to_torch(x) for x in (q, k, v, do))
  for x in (q, k, v):
    x.requires_grad_(backward)
  argument_bytes = sum(x.numel() * x.element_size() for x in ((q, k, v, do) if backward else
                                                               (q, k, v)))
  output_bytes = argument_bytes if backward else q.numel() * q.element_size()
  seg_t = None if seg is None else torch.from_numpy(seg)

  if case.peer == "torch_sdpa":
    kwargs = {}
    if kind == "causal":
      kwargs["is_causal"] = True
    elif kind != "none":
      qi = torch.arange(case.T)[:, None]
      ki = torch.arange(case.T)[None, :]
      dense = (qi >= ki) & ((qi - ki < param) if kind == "window" else True)
      if kind == "documents":
        dense = dense & (seg_t[:, None, :, None] == seg_t[:, None, None, :])
      kwargs["attn_mask"] = dense
      argument_bytes += dense.numel()
    attend = lambda: F.scaled_dot_product_attention(q, k, v, **kwargs)
  else:
    from torch.nn.attention import flex_attention as tflex  # pylint: disable=g-import-not-at-top
    if kind == "none":
      mod = None
    elif kind == "causal":
      mod = lambda b, h, qi, ki: qi >= ki
    elif kind == "window":
      mod = lambda b, h, qi, ki: (qi >= ki) & (qi - ki < param)
    else:
      mod = lambda b, h, qi, ki: (qi >= ki) & (seg_t[b, qi] == seg_t[b, ki])
    block_mask = None
    if mod is not None:
      block_mask = tflex.create_block_mask(mod, case.B if kind == "documents" else None, None,
                                           case.T, case.T, device="cpu")
    # A fresh compile per case: dynamo's recompile limit would otherwise fall back to eager.
    torch._dynamo.reset()  # pylint: disable=protected-access
    compiled = torch.compile(tflex.flex_attention, dynamic=False)
    attend = lambda: compiled(q, k, v, block_mask=block_mask)

  def step():
    if backward:
      for x in (q, k, v):
        x.grad = None
      attend().backward(do)
    else:
      with torch.no_grad():
        attend()

  return TorchCase(step, argument_bytes, output_bytes)
