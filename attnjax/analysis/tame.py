"""T-TAME: a trainable attention head that explains a frozen image classifier in one forward pass.

Ntrougkas, Gkalelis, Mezaris, "T-TAME: Trainable Attention Mechanism for Explaining Convolutional
Networks and Vision Transformers", arXiv:2403.04523, built on their "TAME: Attention Mechanism Based
Feature Fusion for Generating Explanation Maps of Convolutional Neural Networks", arXiv:2301.07407.

Feature maps `F_l: [B, H_l, W_l, C_l]` of L layers of a frozen classifier f go through one branch
each, are upsampled to the largest map (H, W) (capped at 56 as the authors do), concatenated and
fused into one map per class:

  G_l = ReLU(BN_l(conv1x1_l(F_l)) + F_l)                  C_l -> C_l channels, skip connection
  C   = conv1x1_fuse(concat_l bilinear_{H x W}(G_l))      Σ_l C_l -> num_classes
  A   = sigmoid(C)                                        [B, H, W, num_classes], in (0, 1)

Training keeps f frozen and fits the head alone. With y the class f predicts for x (or a given
label) and A_y the map of that class:

  L = λ3 · CE(f(x ⊙ up(A_y)), y) + λ2 · mean((A_y + ε)^λ4) + λ1 · TV(A_y)
  TV(A) = (Σ |A[i+1, j] - A[i, j]|² + Σ |A[i, j+1] - A[i, j]|² + β Σ_border A²) / (2 B)

Vision transformers (T-TAME's extension): a layer's output `[B, 1 + h·w, C]` is split into the
class token `t_cls` and the patch tokens, which are laid out on their `h x w` grid (row-major) and
multiplied channel-wise by the class token, `F_l[i, j] = t_patch(i, j) ⊙ t_cls` (the authors' code,
IDT-ITI/T-TAME, uses the last three blocks of ViT-B/16); the head is then the CNN one. `TokenGrid`
does this and its variants (class token dropped, or no class token in a mean-pooled ViT), and
`feature_maps` applies it to every `[B, N, C]` output.

with up the bilinear resize to the input's size (half-pixel centres), λ1 = 0.01, λ2 = 2, λ3 = 1.5,
λ4 = 0.3, ε = 5e-4 and the border weight β = 0.3 (the authors' values). The area and variation
terms read each example's own map A_y, as the paper's equations (the authors' code evaluates them
on the maps of every label of the batch for each image). After training,
`explain` gives the map of a class from one forward pass of f and the head.

  feature_maps(model, variables, images, layers)   frozen features of named layers + logits
  TokenGrid(class_token, grid)                     a transformer layer's tokens -> a feature map
  TameHead(num_classes)                            the head: features -> A [B, H, W, num_classes]
  area_loss, variation_loss, masked_logits         the objective's terms
  objective(head, head_variables, model, ...)      (L, terms) for a batch
  make_train_step(head, model, layers, tx)         one jitted optimizer step on the head alone
  explain(head, head_variables, model, ...)        the map of a class [B, H_img, W_img]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from attnjax import catalog
from attnjax.core import initializers
from attnjax.typing import Array, Float, Int

__all__ = ["CLASS_TOKEN", "LossWeights", "TameHead", "TokenGrid", "area_loss", "explain",
           "feature_maps", "make_train_step", "masked_logits", "objective", "upsample",
           "variation_loss"]

Images = Float[Array, "B H_img W_img C_img"]
Tokens = Float[Array, "B N C_l"]
FeatureMap = Float[Array, "B H_l W_l C_l"]
ClassMaps = Float[Array, "B H W num_classes"]
Maps = Float[Array, "B H W"]
SmallMaps = Float[Array, "B h w K"]
ResizedMaps = Float[Array, "B H W K"]
Scalar = Float[Array, ""]
Labels = Int[Array, "B"]
Logits = Float[Array, "B num_classes"]


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """The objective's weights and exponents (module docstring), the authors' values by default."""
  variation: float = 0.01   # λ1
  area: float = 2.0         # λ2
  cross_entropy: float = 1.5  # λ3
  area_power: float = 0.3   # λ4: < 1 pushes small mask values to exactly 0 (a sparse map)
  area_eps: float = 5e-4    # keeps the gradient of (A + ε)^λ4 finite at A = 0
  border: float = 0.3       # β: weight of the squared map on its border in TV


CLASS_TOKEN = ("multiply", "drop", "none")


@dataclasses.dataclass(frozen=True)
class TokenGrid:
  """How the tokens `[B, N, C]` of a transformer layer become a feature map `[B, h, w, C]`.

  Attributes:
    class_token: "multiply": the tokens are `[cls; patches]`, each patch token multiplied
      channel-wise by the class token (T-TAME's ViT path, module docstring); "drop": `[cls; patches]`
      with the class token discarded (TAME's CNN head applied to a ViT as is); "none": the tokens
      are the patches alone (a ViT with mean pooling).
    grid: `(h, w)` of the patches, row-major; None: a square grid, `h = w = sqrt(#patches)`.
  """
  class_token: str = "multiply"
  grid: Optional[tuple[int, int]] = None

  def __call__(self, tokens: Tokens) -> FeatureMap:
    if self.class_token not in CLASS_TOKEN:
      raise ValueError(f"TokenGrid: class_token must be one of {CLASS_TOKEN}, got "
                       f"{self.class_token!r}")
    if jnp.ndim(tokens) != 3:
      raise ValueError(f"TokenGrid: tokens must be [B, N, C], got {jnp.shape(tokens)}")
    cls, patches = (None, tokens) if self.class_token == "none" else (tokens[:, :1], tokens[:, 1:])
    n = patches.shape[1]
    grid = self.grid
    if grid is None:
      side = math.isqrt(n)
      grid = (side, side)
    if grid[0] * grid[1] != n:
      lead = "" if cls is None else "1 class token + "
      raise ValueError(f"TokenGrid: tokens [B, N, C] must be {lead}h*w patches with grid (h, w) = "
                       f"{self.grid or 'square'}, got N = {tokens.shape[1]}; pass grid")
    if self.class_token == "multiply":
      patches = patches * cls
    return patches.reshape(patches.shape[0], grid[0], grid[1], patches.shape[-1])


def _check_layers(layers: Sequence[str]) -> tuple[str, ...]:
  layers = tuple(layers)
  if not layers or not all(isinstance(n, str) and n for n in layers):
    raise ValueError(f"tame.feature_maps: layers must be a non-empty sequence of module paths "
                     f"(e.g. 'stage0_block0'), got {layers}")
  return layers


def feature_maps(model: nn.Module, variables: Any, images: Images, layers: Sequence[str], *,
                 tokens: TokenGrid = TokenGrid()) -> tuple[list[FeatureMap], Logits]:
  """The outputs of the submodules `layers` (module paths, "/"-joined, e.g. "stage1_block0", or
  "encoder/layer_3" in a ViT) of `model` on `images`, in the order given, and the model's logits,
  from one forward pass (Flax `capture_intermediates`; the model needs no change). A layer whose
  output is tokens `[B, N, C]` gives the feature map `tokens(output)` (`TokenGrid`).

  Raises:
    ValueError: naming the layers that did not run or whose output is not `[B, H, W, C]`.
  """
  layers = _check_layers(layers)
  wanted = frozenset(layers)
  logits, state = model.apply(
      variables, images, mutable=["intermediates"],
      capture_intermediates=lambda mdl, name: name == "__call__" and "/".join(mdl.path) in wanted)
  found = {}
  for layer in layers:
    node = state["intermediates"]
    for part in layer.split("/"):
      node = node.get(part, {}) if hasattr(node, "get") else {}
    if "__call__" in node:
      found[layer] = node["__call__"][0]
  missing = [n for n in layers if n not in found]
  if missing:
    raise ValueError(f"tame.feature_maps: layers {missing} are not submodules of "
                     f"{type(model).__name__} that ran (paths like 'stage0_block0')")
  maps = [tokens(found[n]) if jnp.ndim(found[n]) == 3 else found[n] for n in layers]
  bad = [(n, tuple(m.shape)) for n, m in zip(layers, maps, strict=True) if m.ndim != 4
         or m.shape[0] != images.shape[0]]
  if bad:
    raise ValueError(f"tame.feature_maps: each layer's output must be [B, H, W, C] (or tokens "
                     f"[B, N, C]) with B = {images.shape[0]}, got {bad}")
  return maps, logits


def upsample(maps: SmallMaps, size: tuple[int, int]) -> ResizedMaps:
  """Bilinear resize with half-pixel centres and edge clamping (PyTorch's `interpolate(...,
  mode="bilinear", align_corners=False)`, which the authors use), no antialiasing."""
  b, _, _, k = maps.shape
  return jax.image.resize(maps, (b, int(size[0]), int(size[1]), k), "bilinear", antialias=False)


@catalog.serves(9, kind="analysis", name="attnjax.analysis.tame.TameHead")
class TameHead(nn.Module):
  """The T-TAME attention head: feature maps -> class explanation maps (module docstring).

  Attributes:
    num_classes: maps produced (one per class of the explained model).
    max_size: the maps' side is at most this (the authors' 56).
    momentum, epsilon: BatchNorm's running-average momentum (Flax convention: PyTorch's 0.1 is
      0.9) and epsilon, as PyTorch's defaults.

  `__call__(features, *, train=False, return_logits=False)`: `features` a list of `[B, H_l, W_l,
  C_l]`; returns A `[B, H, W, num_classes]` in (0, 1) (and the pre-sigmoid C with
  `return_logits`). With `train=True` BatchNorm uses the batch's statistics and updates its running
  averages (pass `mutable=["batch_stats"]`); otherwise the running averages (each example alone).
  """
  num_classes: int
  max_size: int = 56
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, features: Sequence[FeatureMap], *, train: bool = False,
               return_logits: bool = False) -> ClassMaps | tuple[ClassMaps, ClassMaps]:
    features = list(features)
    if not features or any(jnp.ndim(f) != 4 for f in features) or len(
        {f.shape[0] for f in features}) != 1:
      raise ValueError(f"TameHead: features must be a non-empty list of [B, H_l, W_l, C_l] maps "
                       f"with one B, got shapes {[jnp.shape(f) for f in features]}")
    if self.num_classes < 1:
      raise ValueError(f"TameHead: num_classes must be >= 1, got {self.num_classes}")
    size = (min(max(f.shape[1] for f in features), self.max_size),
            min(max(f.shape[2] for f in features), self.max_size))
    branches = []
    for l, f in enumerate(features):
      f = f.astype(jnp.float32)
      c = f.shape[-1]
      # 1x1 convolution keeping the channels, PyTorch's default initializer as the authors' code.
      g = nn.Conv(c, (1, 1), use_bias=True, kernel_init=initializers.torch_uniform(c),
                  bias_init=initializers.torch_uniform(c), name=f"branch{l}_conv")(f)
      g = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon,
                       name=f"branch{l}_norm")(g)
      branches.append(upsample(nn.relu(g + f), size))
    fused = jnp.concatenate(branches, axis=-1)
    fan_in = fused.shape[-1]
    logits = nn.Conv(self.num_classes, (1, 1), use_bias=True,
                     kernel_init=initializers.torch_uniform(fan_in),
                     bias_init=initializers.torch_uniform(fan_in), name="fuser")(fused)
    maps = jax.nn.sigmoid(logits)
    return (maps, logits) if return_logits else maps



def _check_maps(name: str, maps: Maps) -> Maps:
  if jnp.ndim(maps) != 3:
    raise ValueError(f"tame.{name}: maps must be one map per example [B, H, W], got shape "
                     f"{jnp.shape(maps)}")
  return maps.astype(jnp.float32)


def area_loss(maps: Maps, *, power: float = 0.3, eps: float = 5e-4) -> Scalar:
  """`mean((A + ε)^λ4)` over examples and pixels of `maps: [B, H, W]` (λ4 = `power` < 1 favours
  maps with few non-zero pixels; arXiv:2301.07407)."""
  return jnp.mean((_check_maps("area_loss", maps) + eps) ** power)


def variation_loss(maps: Maps, *, power: float = 2.0, border: float = 0.3) -> Scalar:
  """Total variation of `maps: [B, H, W]` with a border penalty, per example (arXiv:2301.07407):
  `(Σ |ΔA|^p along H + Σ |ΔA|^p along W + β Σ (A^p on the first/last row and column)) / (p B)`,
  p = `power`, β = `border` (a corner is counted on both its row and its column)."""
  a = _check_maps("variation_loss", maps)
  total = (jnp.sum(jnp.abs(a[:, 1:, :] - a[:, :-1, :]) ** power)
           + jnp.sum(jnp.abs(a[:, :, 1:] - a[:, :, :-1]) ** power))
  if border > 0:
    total += border * (jnp.sum(a[:, 0, :] ** power) + jnp.sum(a[:, -1, :] ** power)
                       + jnp.sum(a[:, :, 0] ** power) + jnp.sum(a[:, :, -1] ** power))
  return total / (power * a.shape[0])


def masked_logits(model: nn.Module, variables: Any, images: Images, maps: Maps) -> Logits:
  """The frozen model's logits on `images ⊙ up(maps)`: each example's map `[B, H, W]` resized
  bilinearly to the image and multiplied into every channel (the masking of arXiv:2403.04523)."""
  maps = _check_maps("masked_logits", maps)
  if jnp.ndim(images) != 4 or images.shape[0] != maps.shape[0]:
    raise ValueError(f"tame.masked_logits: images must be [B, H_img, W_img, C] with B = "
                     f"{maps.shape[0]} (the maps' batch), got {jnp.shape(images)}")
  mask = upsample(maps[..., None], images.shape[1:3])
  return model.apply(variables, (images * mask).astype(images.dtype))


def _select(class_maps: ClassMaps, labels: Labels) -> Maps:
  return jnp.take_along_axis(class_maps, labels[:, None, None, None], axis=-1)[..., 0]


@catalog.serves(9, kind="analysis", name="attnjax.analysis.tame.objective")
def objective(head: TameHead, head_variables: Any, model: nn.Module, model_variables: Any,
              images: Images, layers: Sequence[str], labels: Optional[Labels] = None, *,
              train: bool = True, weights: LossWeights = LossWeights(),
              tokens: TokenGrid = TokenGrid()) -> tuple[Any, dict]:
  """T-TAME's training loss on a batch (module docstring) and its terms.

  Args:
    head, head_variables: the `TameHead` and its variables ({"params", "batch_stats"}).
    model, model_variables: the frozen classifier; no gradient reaches its variables (they are
      constants here), while the gradient flows through its forward pass to the mask.
    images: `[B, H_img, W_img, C]`.
    layers: the module paths whose outputs feed the head (`feature_maps`).
    labels: `[B]` classes whose maps are trained; None: the model's prediction on the clean input
      (the authors' choice: the map explains the model's decision).
    train: BatchNorm on batch statistics (and its running averages updated) or on running ones.
    weights: λ1..λ4, ε, β.
    tokens: how token outputs become feature maps (a ViT's layers; `TokenGrid`).

  Returns:
    `(L, terms)`: terms has "cross_entropy", "area", "variation" (each already weighted), "labels",
    and "batch_stats" (the updated running averages when `train`, else the given ones).
  """
  frozen = jax.lax.stop_gradient(model_variables)
  features, logits = feature_maps(model, frozen, images, layers, tokens=tokens)
  if labels is None:
    labels = jnp.argmax(logits, axis=-1)
  labels = jnp.asarray(labels, jnp.int32)
  if labels.shape != (images.shape[0],):
    raise ValueError(f"tame.objective: labels must be [B] = [{images.shape[0]}], got "
                     f"{labels.shape}")
  if train:
    class_maps, updates = head.apply(head_variables, features, train=True,
                                     mutable=["batch_stats"])
    batch_stats = updates["batch_stats"]
  else:
    class_maps = head.apply(head_variables, features)
    batch_stats = head_variables.get("batch_stats", {})
  chosen = _select(class_maps, labels)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      masked_logits(model, frozen, images, chosen), labels).mean()
  terms = {"cross_entropy": weights.cross_entropy * ce,
           "area": weights.area * area_loss(chosen, power=weights.area_power,
                                            eps=weights.area_eps),
           "variation": weights.variation * variation_loss(chosen, border=weights.border)}
  loss = terms["cross_entropy"] + terms["area"] + terms["variation"]
  return loss, {**terms, "labels": labels, "batch_stats": batch_stats}


def make_train_step(head: TameHead, model: nn.Module, layers: Sequence[str],
                    tx: optax.GradientTransformation, *, weights: LossWeights = LossWeights(),
                    tokens: TokenGrid = TokenGrid()) -> Callable[..., tuple[Any, Any, Any]]:
  """A jitted `step(head_variables, opt_state, model_variables, images, labels=None) ->
  (head_variables, opt_state, loss)`: one `tx` update of the head's params (the frozen model's
  variables are only read) and its BatchNorm running averages. `opt_state = tx.init(
  head_variables["params"])`."""
  layers = _check_layers(layers)

  @jax.jit
  def step(head_variables, opt_state, model_variables, images, labels=None):
    def loss_fn(params):
      return objective(head, {**head_variables, "params": params}, model, model_variables, images,
                       layers, labels, train=True, weights=weights, tokens=tokens)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(head_variables["params"])
    updates, opt_state = tx.update(grads, opt_state, head_variables["params"])
    params = optax.apply_updates(head_variables["params"], updates)
    return {**head_variables, "params": params, "batch_stats": terms["batch_stats"]}, opt_state, loss

  return step


@catalog.serves(9, kind="analysis", name="attnjax.analysis.tame.explain")
def explain(head: TameHead, head_variables: Any, model: nn.Module, model_variables: Any,
            images: Images, layers: Sequence[str], class_index: Optional[Any] = None, *,
            at_input_size: bool = True, tokens: TokenGrid = TokenGrid()) -> Maps:
  """The explanation map of a class, from one forward pass of the frozen model and the head.

  Args:
    class_index: an int or `[B]` classes; None: the class the model predicts for each image.
    at_input_size: resize the map to the image (`[B, H_img, W_img]`, as used for masking) or keep
      the head's resolution.
    tokens: how token outputs become feature maps (a ViT's layers; `TokenGrid`).

  Returns:
    float32 `[B, H, W]` in (0, 1).
  """
  if isinstance(class_index, int) and not 0 <= class_index < head.num_classes:
    raise ValueError(f"tame.explain: class_index must be in [0, {head.num_classes}), got "
                     f"{class_index}")
  features, logits = feature_maps(model, model_variables, images, layers, tokens=tokens)
  if class_index is None:
    labels = jnp.argmax(logits, axis=-1)
  else:
    labels = jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), (images.shape[0],))
  maps = _select(head.apply(head_variables, features), labels)
  if at_input_size:
    maps = upsample(maps[..., None], images.shape[1:3])[..., 0]
  return maps
