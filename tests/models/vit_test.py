"""ViT: patch extraction order, the patch projection equals a stride-p convolution, output shapes
for CLS and mean pooling, and the patch-size check."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attnjax import models
from attnjax.data.base import TaskSpec
from attnjax.models import vit
from tests import tolerances

B, H, W, CH, C = 2, 8, 8, 1, 10
SPEC = TaskSpec(name="toy_img", kind="classify", input_shape=(H, W, CH), input_dtype="float32",
                vocab_size=0, num_classes=C, seq_len=H * W)
TOL = tolerances.output(jnp.float32)


def _model(**overrides):
  config = dict(arch="vit", width=32, depth=2, num_heads=4, mlp_dim=64, mechanism="softmax",
                pooling="cls", patch_size=2)
  return models.build_model(ml_collections.ConfigDict({**config, **overrides}), SPEC)


def _images(shape=(B, H, W, CH)):
  return jax.random.uniform(jax.random.PRNGKey(0), shape, jnp.float32)


def test_patchify_order():
  images = _images((1, 4, 6, 3))
  patches = vit.patchify(images, 2)
  chex.assert_shape(patches, (1, 2 * 3, 2 * 2 * 3))
  for i in range(2):
    for j in range(3):
      np.testing.assert_array_equal(patches[0, i * 3 + j],
                                    images[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1))
  with pytest.raises(ValueError, match="patch_size"):
    vit.patchify(images, 4)


@pytest.mark.parametrize("pooling,patch_size", [("cls", 2), ("mean", 4)])
def test_shapes(pooling, patch_size):
  model = _model(pooling=pooling, patch_size=patch_size)
  images = _images()
  variables, logits = jax.jit(lambda x: (lambda v: (v, model.apply(v, x)))(
      model.init(jax.random.PRNGKey(1), x)))(images)
  chex.assert_shape(logits, (B, C))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  params = nn.unbox(variables)["params"]
  num_patches = (H // patch_size) * (W // patch_size)
  chex.assert_shape(params["pos_embed"], (num_patches + (pooling == "cls"), 32))
  chex.assert_shape(params["patch_embed"]["kernel"], (patch_size * patch_size * CH, 32))
  if pooling == "cls":
    # The patch projection is a stride-p convolution with the same kernel.
    kernel = params["patch_embed"]["kernel"].reshape(patch_size, patch_size, CH, 32)
    conv = jax.lax.conv_general_dilated(images, kernel, (patch_size, patch_size), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    patches = vit.patchify(images, patch_size) @ params["patch_embed"]["kernel"]
    chex.assert_trees_all_close(patches, conv.reshape(B, -1, 32), **TOL)


def test_grid_mechanisms_get_the_patch_grid():
  """A mechanism over a 2-D token grid receives the patch grid (4 x 4 here) as `spatial_shape`, and its
  learned relative bias is sized from it ([N, 2k-1, 2k-1]); with a CLS token it is a clear error."""
  model = _model(pooling="mean", mechanism="neighborhood_attention_rpb",
                 mechanism_kwargs={"kernel_size": 3})
  variables = model.init(jax.random.PRNGKey(1), _images())
  rpb = variables["params"]["encoder"]["layer_0"]["attention"]["rpb"]
  chex.assert_shape(rpb, (4, 5, 5))
  chex.assert_shape(model.apply(variables, _images()), (B, C))
  with pytest.raises(ValueError, match="pooling='mean'"):
    _model(pooling="cls", mechanism="neighborhood_attention",
           mechanism_kwargs={"kernel_size": 3}).init(jax.random.PRNGKey(1), _images())
