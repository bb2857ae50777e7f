"""Odd texture patch: a generated image task that needs channel and spatial selection.

An image is a `grid x grid` array of square patches of `patch` pixels, with `channels` channels.
Every patch holds, in every channel c, a sinusoidal grating

    I(y, x) = 1/2 + 1/2 · a · cos(2π/λ · (x cos θ + y sin θ) + φ) + ε,   ε ~ N(0, noise²)

(period λ = `period` pixels, (y, x) the pixel's offset from the patch centre). The orientation θ of
channel c is one of `orientations` angles k·π/orientations, shared by all patches, except in one
patch (the odd one) and one channel (the odd channel, drawn per image), where the grating is turned
by 90° (k + orientations/2). The shared orientation of channel c is k = c mod orientations, or, with
`random_orientation`, drawn per image and channel: then the odd patch is only defined against the
others (a comparison across the whole image, a much harder task). The contrast a (one of 4 levels
in [1/2, 1]) and the phase φ (one of 8) are drawn per patch and channel, so no pixel value and no
channel mean tells the odd patch apart: only the orientation in one channel among several does. The
label is the odd patch's index (row-major), `grid²` balanced classes.

The model has to select the channel that carries the difference (it changes from image to image)
and the location, which is what channel (SE, ECA) and spatial (BAM, CBAM, PSA) attention modules
claim to do; the task compares them in `configs/cnn_textures.py`.

Determinism and splits follow `attnjax.data.base`: batch `step` comes from `step_rng(seed, split,
step)`, and an example belongs to the valid split when the hash of its integer latents (odd patch,
odd channel, orientations, contrast and phase levels) falls in the valid bucket, so train and valid
never share a latent image (only the noise is drawn outside the latents). numpy only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attnjax.data import base

__all__ = ["Textures", "grating"]

# Contrast and phase levels per patch and channel (integers in the latents that decide the split).
CONTRAST_LEVELS = 4
PHASE_LEVELS = 8


def grating(size: int, theta, phase, contrast, period: float) -> np.ndarray:
  """Gratings `1/2 + 1/2 · a · cos(2π/λ (x cos θ + y sin θ) + φ)` on a `size x size` patch, over
  the broadcast shape of `theta`, `phase`, `contrast`: `[..., size, size]` float64."""
  offsets = np.arange(size) - (size - 1) / 2
  y, x = offsets[:, None], offsets[None, :]
  theta, phase, contrast = (np.asarray(a, np.float64)[..., None, None]
                            for a in (theta, phase, contrast))
  wave = 2 * np.pi / period * (x * np.cos(theta) + y * np.sin(theta)) + phase
  return 0.5 + 0.5 * contrast * np.cos(wave)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Textures(base.GeneratedTask):
  """Find the odd texture patch (module docstring): inputs `[grid·patch, grid·patch, channels]`
  float32, targets `[b]` int32 in [0, grid²)."""
  name = "textures"
  grid: int = 3
  patch: int = 6
  channels: int = 3
  orientations: int = 4
  period: float = 4.0
  noise: float = 0.2
  random_orientation: bool = False

  def __post_init__(self):
    super().__post_init__()
    base.check_int("grid", self.grid, minimum=2, maximum=16)
    base.check_int("patch", self.patch, minimum=3, maximum=64)
    base.check_int("channels", self.channels, minimum=1, maximum=64)
    base.check_int("orientations", self.orientations, minimum=2, maximum=16)
    if self.orientations % 2:
      raise base.config_error("orientations", self.orientations,
                              "must be even (the odd patch turns its grating by 90°)")
    base.check_float("period", self.period, low=2.0, high=float(self.patch))
    base.check_float("noise", self.noise, low=0.0, high=10.0)
    base.check_bool("random_orientation", self.random_orientation)

  @property
  def spec(self) -> base.TaskSpec:
    side = self.grid * self.patch
    return base.TaskSpec(name=self.name, kind="classify", input_shape=(side, side, self.channels),
                         input_dtype="float32", vocab_size=0, num_classes=self.grid**2,
                         seq_len=side * side)

  def latents(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """`n` images' integer latents: odd `[n]`, odd_channel `[n]`, orientation `[n, C]` (the
    common one), contrast and phase levels `[n, grid², C]`."""
    g2, c = self.grid**2, self.channels
    if self.random_orientation:
      orientation = rng.integers(0, self.orientations, (n, c))
    else:
      orientation = np.broadcast_to(np.arange(c) % self.orientations, (n, c)).copy()
    return {"odd": rng.integers(0, g2, n), "odd_channel": rng.integers(0, c, n),
            "orientation": orientation,
            "contrast": rng.integers(0, CONTRAST_LEVELS, (n, g2, c)),
            "phase": rng.integers(0, PHASE_LEVELS, (n, g2, c))}

  def render(self, latents: dict[str, np.ndarray], noise: np.ndarray) -> np.ndarray:
    """Images `[n, grid·patch, grid·patch, C]` float32 from the latents and unit noise (same
    shape)."""
    n, g, p = len(latents["odd"]), self.grid, self.patch
    rows = np.arange(n)
    # Orientation index per patch and channel: the common one, turned by half a turn of the index
    # circle (90°) at the odd patch's odd channel.
    k = np.repeat(latents["orientation"][:, None, :], g * g, axis=1)
    k[rows, latents["odd"], latents["odd_channel"]] += self.orientations // 2
    theta = (k % self.orientations) * np.pi / self.orientations
    contrast = 0.5 + 0.5 * latents["contrast"] / (CONTRAST_LEVELS - 1)
    phase = 2 * np.pi * latents["phase"] / PHASE_LEVELS
    patches = grating(p, theta, phase, contrast, self.period)  # [n, g², C, p, p]
    images = patches.reshape(n, g, g, -1, p, p).transpose(0, 1, 4, 2, 5, 3)
    images = images.reshape(n, g * p, g * p, -1) + self.noise * noise
    return images.astype(np.float32)

  def draw(self, rng, n):
    latents = self.latents(rng, n)
    side = self.grid * self.patch
    images = self.render(latents, rng.standard_normal((n, side, side, self.channels)))
    key = np.concatenate([latents["odd"][:, None], latents["odd_channel"][:, None],
                          latents["orientation"], latents["contrast"].reshape(n, -1),
                          latents["phase"].reshape(n, -1)], axis=1)
    return {"inputs": images, "targets": latents["odd"].astype(np.int32),
            "weights": np.ones(n, np.float32), "key": key}

  def batch(self, step: int, batch_size: int, *, split: str = "train", process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    # GeneratedTask.batch hashes the inputs as integers; float images would all hash alike, so the
    # split is decided by the integer latents ("key") instead.
    rows = base.check_batch_args(step, batch_size, split, process_index, process_count)
    rng = base.step_rng(self.seed, split, step)
    want_valid = split == "valid"
    keep_rate = 1 / base.VALID_BUCKETS if want_valid else 1 - 1 / base.VALID_BUCKETS
    parts, have = [], 0
    while have < batch_size:
      drawn = self.draw(rng, int((batch_size - have) / keep_rate * 1.15) + 8)
      keep = base.in_valid_split(drawn.pop("key")) == want_valid
      parts.append({k: v[keep] for k, v in drawn.items()})
      have += int(keep.sum())
    return {k: np.concatenate([p[k] for p in parts])[:batch_size][rows] for k in parts[0]}
