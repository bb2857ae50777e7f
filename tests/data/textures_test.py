"""Odd texture patch: the label is the patch whose grating is turned in one channel (read back from
the pixels by an independent orientation estimate), determinism, balance, disjoint splits, checks."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.data import textures
from tests import tolerances


def _orientation_energy(patch: np.ndarray, period: float, orientations: int) -> np.ndarray:
  """`[orientations]` quadrature energy |Σ (I - mean) e^{i k·r}|² of one `[p, p]` patch per
  orientation: phase-invariant, largest at the grating's orientation."""
  p = patch.shape[0]
  y, x = np.mgrid[0:p, 0:p].astype(np.float64)
  centred = patch - patch.mean()
  energy = []
  for o in range(orientations):
    theta = o * np.pi / orientations
    wave = 2 * np.pi / period * (x * np.cos(theta) + y * np.sin(theta))
    energy.append(abs(np.sum(centred * np.exp(1j * wave))) ** 2)
  return np.array(energy)


def _odd_patches(images: np.ndarray, task: textures.Textures) -> list[int]:
  """Per image, the patch (row-major) whose estimated orientation differs, in some channel, from
  that channel's orientation in most patches."""
  g, p = task.grid, task.patch
  found = []
  for image in images.astype(np.float64):
    est = np.empty((g * g, task.channels), int)
    for i in range(g):
      for j in range(g):
        for c in range(task.channels):
          patch = image[i * p:(i + 1) * p, j * p:(j + 1) * p, c]
          est[i * g + j, c] = np.argmax(_orientation_energy(patch, task.period, task.orientations))
    mode = np.array([np.bincount(est[:, c]).argmax() for c in range(task.channels)])
    odd = np.nonzero((est != mode[None, :]).any(axis=1))[0]
    found.append(int(odd[0]) if len(odd) == 1 else -1)
  return found


@pytest.mark.parametrize("random_orientation", [False, True])
def test_label_is_the_patch_whose_grating_turns_in_one_channel(random_orientation):
  task = textures.Textures(noise=0.0, random_orientation=random_orientation)
  batch = task.batch(0, 24)
  assert batch["inputs"].shape == (24, 18, 18, 3) and batch["inputs"].dtype == np.float32
  assert batch["targets"].dtype == np.int32
  np.testing.assert_array_equal(_odd_patches(batch["inputs"], task), batch["targets"])


def test_odd_patch_differs_in_exactly_one_channel_and_matches_gratings():
  task = textures.Textures(noise=0.0, grid=2, patch=5, channels=4)
  rng = np.random.default_rng(3)
  latents = task.latents(rng, 6)
  np.testing.assert_array_equal(latents["orientation"], np.tile([0, 1, 2, 3], (6, 1)))
  images = task.render(latents, np.zeros((6, 10, 10, 4)))
  for n in range(6):
    for cell in range(4):
      i, j = divmod(cell, 2)
      for c in range(4):
        k = latents["orientation"][n, c]
        if cell == latents["odd"][n] and c == latents["odd_channel"][n]:
          k = (k + 2) % 4  # 90° turned
        contrast = 0.5 + 0.5 * latents["contrast"][n, cell, c] / 3
        phase = 2 * np.pi * latents["phase"][n, cell, c] / 8
        want = np.empty((5, 5))
        for y in range(5):
          for x in range(5):
            wave = 2 * np.pi / 4.0 * ((x - 2) * np.cos(k * np.pi / 4) + (y - 2) * np.sin(
                k * np.pi / 4)) + phase
            want[y, x] = 0.5 + 0.5 * contrast * np.cos(wave)
        np.testing.assert_allclose(images[n, i * 5:(i + 1) * 5, j * 5:(j + 1) * 5, c], want,
                                   **tolerances.output(jnp.float32))


def test_deterministic_and_seeded():
  a, b = textures.Textures(seed=1).batch(5, 16), textures.Textures(seed=1).batch(5, 16)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  c = textures.Textures(seed=2).batch(5, 16)
  assert not np.array_equal(a["inputs"], c["inputs"])
  # Process slices concatenate to the global batch.
  halves = [textures.Textures(seed=1).batch(5, 16, process_index=i, process_count=2)
            for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), a["inputs"])


def test_labels_balanced():
  task = textures.Textures()
  targets = np.concatenate([task.batch(s, 256)["targets"] for s in range(8)])
  counts = np.bincount(targets, minlength=9)
  assert len(counts) == 9
  # 2048 uniform draws over 9 classes: mean 227.6, sd 14.2; ±25% is > 4 sd.
  assert counts.min() > 0.75 * len(targets) / 9 and counts.max() < 1.25 * len(targets) / 9


def test_splits_disjoint():
  task = textures.Textures(noise=0.0)
  train = task.batch(0, 128)["inputs"].reshape(128, -1)
  valid = task.batch(0, 128, split="valid")["inputs"].reshape(128, -1)
  # Noise-free images are their latents: no valid image equals a train image.
  assert not (np.abs(train[:, None, :] - valid[None, :, :]).max(axis=-1) < 1e-6).any()


@pytest.mark.parametrize("field,value", [("orientations", 3), ("grid", 1), ("period", 1.0),
                                         ("noise", -1.0), ("random_orientation", 1)])
def test_bad_config_names_field(field, value):
  with pytest.raises(ValueError, match=field):
    textures.Textures(**{field: value})
