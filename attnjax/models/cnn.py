"""A small ResNet-style CNN with a registered attention module in every residual block.

    x_0 = ReLU(GN(conv3x3(image)))                             stem, widths[0] channels, stride 1
    per block of stage s (width w_s; stride 2 for the first block of stages s > 0, else 1):
      u = ReLU(GN(conv3x3_stride(x)));  v = GN(conv3x3(u))
      v = A(v)                                                 the attention module (None: identity)
      x = ReLU(v + shortcut(x))        shortcut: identity, or GN(conv1x1_stride(x)) on a shape change
    logits = Dense(GAP(x_L))                                   [B, num_classes] float32

`images [B, H, W, C] float -> logits [B, num_classes] float32`. The attention module A (a
feature-map module of `attnjax.modules`, by name) sits after the block's second convolution and
before the residual add, where squeeze-and-excitation (Hu et al., "Squeeze-and-Excitation
Networks", arXiv:1709.01507), ECA (Wang et al., "ECA-Net", arXiv:1910.03151) and CBAM (Woo et al.,
"CBAM: Convolutional Block Attention Module", arXiv:1807.06521) put it, so comparing modules in this
network is those papers' protocol. The blocks are the basic blocks of He et al., "Deep Residual
Learning for Image Recognition" (arXiv:1512.03385), with group normalization (Wu and He, "Group
Normalization", arXiv:1803.08494) in place of batch normalization: the trainer keeps no batch
statistics, and GN's output does not depend on the other examples of the batch.

`budget_widths` finds the widths (one multiplier on every stage, each width rounded to a multiple)
whose parameter count is closest to a budget, so that models with different modules compare at
equal parameter counts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.typing import Array, Float

__all__ = ["BasicBlock", "ResNetCNN", "budget_widths", "check_attention_module", "cnn_param_count",
           "linen_settings", "stage_strides"]

Images = Float[Array, "B H W C"]
Logits = Float[Array, "B num_classes"]
# Group normalization's group count: as in Wu and He's default (32 groups) scaled down to our widths;
# a width not divisible by 8 uses the largest common divisor.
_GROUPS = 8


def stage_strides(num_stages: int) -> tuple[int, ...]:
  """Stride of each stage's first block: 1 for the first stage, 2 for every later one."""
  return tuple(1 if s == 0 else 2 for s in range(num_stages))


def check_attention_module(name: str, where: str = "attention_module") -> modules.Module:
  """The registered feature-map module `name`, checked to fit in a residual block (it takes only
  x, keeps x's shape).

  Raises:
    ValueError: naming `where`; an unknown name lists the registered feature-map modules.
  """
  try:
    record = modules.get_module(name)
  except ValueError as e:
    names = [m.name for m in modules.list_modules(kind="feature_map")]
    raise ValueError(f"{where}: {e}; the registered feature-map modules are {names}") from None
  if record.kind != "feature_map":
    raise ValueError(f"{where}: module {name!r} acts on {record.kind!r} inputs; a CNN block needs a "
                     "'feature_map' module ([B, H, W, C])")
  if not record.keeps_shape or record.extra_inputs:
    raise ValueError(f"{where}: module {name!r} must map x [B, H, W, C] alone to x's shape to sit in "
                     "a residual block (it changes the shape or takes extra inputs)")
  return record


def linen_settings(record: modules.Module) -> frozenset[str]:
  """The attribute names of a module's Linen class that config may set (not parent / name)."""
  return frozenset(f.name for f in dataclasses.fields(record.linen) if f.init) - {"parent", "name"}


def _norm(width: int, dtype, param_dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=math.gcd(width, _GROUPS), dtype=dtype, param_dtype=param_dtype,
                      name=name)


def _conv(width: int, kernel: int, stride: int, dtype, param_dtype, name: str) -> nn.Conv:
  # He-normal (fan-out) as torchvision's ResNet initializes its convolutions; no bias before a norm.
  return nn.Conv(width, (kernel, kernel), strides=(stride, stride), padding="SAME", use_bias=False,
                 kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                 dtype=dtype, param_dtype=param_dtype, name=name)


class BasicBlock(nn.Module):
  """One residual basic block with the attention module before the residual add (module
  docstring)."""
  width: int
  stride: int
  attention_module: Optional[str] = None
  attention_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dt, pdt = self.dtype, self.param_dtype
    y = nn.relu(_norm(self.width, dt, pdt, "norm1")(
        _conv(self.width, 3, self.stride, dt, pdt, "conv1")(x)))
    y = _norm(self.width, dt, pdt, "norm2")(_conv(self.width, 3, 1, dt, pdt, "conv2")(y))
    if self.attention_module is not None:
      record = check_attention_module(self.attention_module)
      kwargs = dict(self.attention_kwargs)
      if "param_dtype" in linen_settings(record):
        kwargs.setdefault("param_dtype", pdt)
      y = record.linen(**kwargs, name="attention")(y)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.width:
      shortcut = _norm(self.width, dt, pdt, "shortcut_norm")(
          _conv(self.width, 1, self.stride, dt, pdt, "shortcut_conv")(x))
    return nn.relu(y.astype(dt) + shortcut.astype(dt))


class ResNetCNN(nn.Module):
  """ResNet-style image classifier with an optional attention module per block (module docstring).

  Attributes:
    num_classes: labels.
    widths: channels of each stage (the stem has widths[0]).
    blocks: basic blocks per stage (same length as widths).
    attention_module: registry name of a feature-map module (`attnjax.list_modules("feature_map")`)
      inserted in every block, or None.
    attention_kwargs: the module's Linen settings.
    dropout: dropout rate before the classifier, active with `train=True` and a "dropout" rng.
    dtype, param_dtype: compute and parameter dtypes.
  """
  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  blocks: Sequence[int] = (1, 1, 1)
  attention_module: Optional[str] = None
  attention_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Images, *, train: bool = False) -> Logits:
    if jnp.ndim(images) != 4:
      raise ValueError(f"ResNetCNN: images must have shape [B, H, W, C], got {jnp.shape(images)}")
    if len(self.widths) != len(self.blocks) or not self.widths:
      raise ValueError(f"ResNetCNN: widths {tuple(self.widths)} and blocks {tuple(self.blocks)} must "
                       "have one entry per stage (at least one)")
    dt, pdt = self.dtype, self.param_dtype
    x = images.astype(dt)
    x = nn.relu(_norm(self.widths[0], dt, pdt, "stem_norm")(
        _conv(self.widths[0], 3, 1, dt, pdt, "stem_conv")(x)))
    for s, (width, num_blocks, stride) in enumerate(zip(
        self.widths, self.blocks, stage_strides(len(self.widths)), strict=True)):
      for b in range(num_blocks):
        x = BasicBlock(width, stride if b == 0 else 1, self.attention_module,
                       flax.core.FrozenDict(self.attention_kwargs), dtype=dt, param_dtype=pdt,
                       name=f"stage{s}_block{b}")(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.dropout:
      x = nn.Dropout(self.dropout)(x, deterministic=not train)
    logits = nn.Dense(self.num_classes, dtype=dt, param_dtype=pdt, name="head")(x.astype(dt))
    return logits.astype(jnp.float32)


def cnn_param_count(input_shape: Sequence[int], num_classes: int, widths: Sequence[int],
                    blocks: Sequence[int], attention_module: Optional[str] = None,
                    attention_kwargs: Optional[Mapping[str, Any]] = None) -> int:
  """Parameters of `ResNetCNN` on one `[H, W, C]` input, counted abstractly (nothing allocated)."""
  model = ResNetCNN(num_classes=num_classes, widths=tuple(widths), blocks=tuple(blocks),
                    attention_module=attention_module,
                    attention_kwargs=flax.core.FrozenDict(attention_kwargs or {}))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, *input_shape), jnp.float32)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"])))


def _scaled(widths: Sequence[int], scale: float, multiple: int) -> tuple[int, ...]:
  return tuple(max(multiple, multiple * round(w * scale / multiple)) for w in widths)


def budget_widths(budget: int, input_shape: Sequence[int], num_classes: int,
                  widths: Sequence[int], blocks: Sequence[int],
                  attention_module: Optional[str] = None,
                  attention_kwargs: Optional[Mapping[str, Any]] = None, *, multiple: int = 4,
                  max_steps: int = 24) -> tuple[tuple[int, ...], int]:
  """`(widths', params)`: `widths` times one multiplier (each rounded to a multiple of `multiple`)
  whose parameter count is closest to `budget` (bisection on the multiplier: the count grows with
  it); returns the widths and their count.

  Raises:
    ValueError: naming the argument, for a budget < 1 or a multiple < 1.
  """
  if budget < 1:
    raise ValueError(f"budget_widths: `budget` must be a positive parameter count, got {budget}")
  if multiple < 1:
    raise ValueError(f"budget_widths: `multiple` must be >= 1, got {multiple}")
  counts: dict[tuple[int, ...], int] = {}

  def count(scale: float) -> tuple[tuple[int, ...], int]:
    candidate = _scaled(widths, scale, multiple)
    if candidate not in counts:
      counts[candidate] = cnn_param_count(input_shape, num_classes, candidate, blocks,
                                          attention_module, attention_kwargs)
    return candidate, counts[candidate]

  low, high = 1.0, 1.0
  while count(low)[1] > budget and low > 1e-3:
    low /= 2
  while count(high)[1] < budget and high < 1e3:
    high *= 2
  for _ in range(max_steps):
    mid = math.sqrt(low * high)
    if count(mid)[1] < budget:
      low = mid
    else:
      high = mid
    if _scaled(widths, low, multiple) == _scaled(widths, high, multiple):
      break
  best = min(counts, key=lambda w: (abs(counts[w] - budget), w))
  return best, counts[best]
