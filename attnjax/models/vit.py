"""Vision Transformer: non-overlapping patches, learned positions, bidirectional blocks, pooling.

    patches = split(image, p)                  [B, H/p · W/p, p·p·C]
    x_0 = patches W_e + b_e + P                W_e: [p·p·C, D] ("patch", "embed"), P: [L, D]
    x_L = Norm(Blocks([cls; x_0]))             (CLS token prepended when pooling == "cls")
    logits = pool(x_L) W + b                   [B, C]

`images [B, H, W, C] float → logits [B, num_classes] float32`; p must divide H and W. The patch
projection is a Dense on flattened patches (the same function as big_vision's stride-p conv).

Mechanisms over a 2-D token grid (neighborhood, window attention: an operator with a `spatial_shape`
keyword) get the patch grid `(H/p, W/p)` as `spatial_shape` unless their kwargs set it; the tokens are
then exactly the patches, so such a layer needs `pooling="mean"` (a CLS token is not on the grid).

Paper: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", arXiv:2010.11929.
"""

from __future__ import annotations

import dataclasses
import inspect

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.models import classifier
from attnjax.nn import blocks


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """`[B, H, W, C] → [B, (H/p)(W/p), p·p·C]`, patches in row-major order."""
  _, height, width, _ = images.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f"patch_size ({patch_size}) must divide the image height and width, got "
                     f"{height}x{width}")
  return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch_size, q=patch_size)


def _takes_grid(mechanism) -> bool:
  mech = mechanism if isinstance(mechanism, registry.Mechanism) else registry.get(mechanism)
  return "spatial_shape" in inspect.signature(mech.fn).parameters


def with_patch_grid(config: blocks.TransformerConfig, grid: tuple[int, int],
                    pooling: str) -> blocks.TransformerConfig:
  """`config` with `spatial_shape=grid` added to the kwargs of every layer whose mechanism takes a
  `spatial_shape` and does not set one. Raises when such a layer would also see a CLS token."""
  kwargs = []
  for i, (mech, kw) in enumerate(zip(config.mechanisms, config.mechanism_kwargs, strict=True)):
    kw = dict(kw)
    if _takes_grid(mech) and kw.get("spatial_shape") is None:
      if pooling != "mean":
        raise ValueError(f"ViT: layer {i}'s mechanism attends over the patch grid (it takes "
                         "`spatial_shape`), so the tokens must be the patches alone: use "
                         "pooling='mean' (a CLS token is not on the grid)")
      kw["spatial_shape"] = tuple(grid)
    kwargs.append(kw)
  return dataclasses.replace(config, mechanism_kwargs=tuple(kwargs))


class ViT(nn.Module):
  """Vision transformer classifier over any registered (non-causal) mechanisms.

  Attributes:
    config: the blocks' `TransformerConfig` (must be non-causal).
    num_classes: C, labels.
    patch_size: p, the side of the square patches.
    pooling: "cls" or "mean".
  """
  config: blocks.TransformerConfig
  num_classes: int
  patch_size: int
  pooling: str = "cls"

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    cfg = self.config
    if jnp.ndim(images) != 4:
      raise ValueError(f"ViT: images must have shape [B, H, W, C], got {jnp.shape(images)}")
    if self.pooling not in classifier.POOLINGS:
      raise ValueError(f"ViT: `pooling` must be one of {classifier.POOLINGS}, "
                       f"got {self.pooling!r}")
    patches = patchify(images.astype(cfg.dtype), self.patch_size)
    x = nn.Dense(cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 kernel_init=blocks.logical(nn.initializers.lecun_normal(), "patch", "embed"),
                 bias_init=blocks.logical(nn.initializers.zeros_init(), "embed"),
                 name="patch_embed")(patches)
    if self.pooling == "cls":
      x = classifier.cls_token(self, x, cfg.param_dtype)
    x = classifier.position_embedding(self, x, cfg.param_dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if cfg.dropout:
      x = nn.Dropout(cfg.dropout)(x, deterministic=not train)
    grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
    cfg = with_patch_grid(cfg, grid, self.pooling)
    x = blocks.Transformer(cfg, name="encoder")(x, train=train)
    return classifier.ClassifierHead(self.num_classes, dtype=cfg.dtype,
                                     param_dtype=cfg.param_dtype,
                                     name="head")(classifier.pool(x, self.pooling))
