"""Shipped data: sklearn digits, and the byte corpus (a made-up directory and the real stdlib)."""

import os

import numpy as np
import pytest
from sklearn import datasets

from attnjax.data import shipped


@pytest.fixture(scope="module")
def digits():
  loaded = datasets.load_digits()
  return loaded.images, loaded.target


def test_digits_images_are_sklearn_pixels_in_unit_range(digits):
  images, labels = digits
  task = shipped.Digits()
  batch = task.batch(0, 64)
  assert batch["inputs"].min() >= 0.0 and batch["inputs"].max() <= 1.0
  assert batch["inputs"].max() == 1.0
  assert ((0 <= batch["targets"]) & (batch["targets"] <= 9)).all()
  assert len(np.unique(batch["targets"])) > 5
  for image, label in zip(batch["inputs"], batch["targets"], strict=True):
    (matches,) = np.nonzero(np.all(np.isclose(images / 16.0, image[..., 0]), axis=(1, 2)))
    assert len(matches) and label in labels[matches]


def test_digits_splits_are_disjoint_and_each_epoch_visits_its_split_once(digits):
  task = shipped.Digits(valid_fraction=0.25)
  train, valid = task.split_indices("train"), task.split_indices("valid")
  assert not set(train) & set(valid)
  assert len(train) + len(valid) == len(digits[1])
  assert abs(len(valid) - 0.25 * len(digits[1])) <= 1
  np.testing.assert_array_equal(valid, shipped.Digits(valid_fraction=0.25, seed=5).split_indices(
      "valid"))  # The split does not move with the training seed.
  # Valid has 449 examples: 15 batches of 30 cover 450 positions, so epoch 0 exactly once.
  images, _ = digits
  seen = np.concatenate([task.batch(s, 30, split="valid")["inputs"] for s in range(15)])[:449]
  flat = (images / 16.0).reshape(len(images), -1)
  found = [np.nonzero(np.all(np.isclose(flat, x.reshape(-1)), axis=1))[0] for x in seen]
  assert all(set(f) <= set(valid) for f in found)
  assert len({tuple(x.reshape(-1)) for x in seen}) == len({tuple(flat[i]) for i in valid})


def test_digits_pixel_tokens_match_the_images():
  tokens = shipped.Digits(representation="pixels").batch(4, 16)
  images = shipped.Digits(representation="image").batch(4, 16)
  assert tokens["inputs"].dtype == np.int32 and tokens["inputs"].shape == (16, 64)
  assert tokens["inputs"].min() >= 0 and tokens["inputs"].max() <= 16
  np.testing.assert_array_equal(tokens["inputs"], np.round(images["inputs"] * 16).reshape(16, 64))
  np.testing.assert_array_equal(tokens["targets"], images["targets"])


@pytest.fixture()
def corpus(tmp_path):
  """40 files of distinct bytes, plus files the corpus must skip."""
  rng = np.random.default_rng(0)
  contents = {}
  for i in range(40):
    relative = os.path.join(f"pkg{i % 3}", f"module_{i}.py")
    os.makedirs(tmp_path / f"pkg{i % 3}", exist_ok=True)
    body = bytes(rng.integers(0, 256, size=int(rng.integers(50, 400)), dtype=np.uint8))
    (tmp_path / relative).write_bytes(body)
    contents[relative] = body
  (tmp_path / "short.py").write_bytes(b"x = 1\n")
  (tmp_path / "notes.txt").write_bytes(b"t" * 500)
  os.makedirs(tmp_path / "site-packages")
  (tmp_path / "site-packages" / "third_party.py").write_bytes(b"s" * 500)
  return tmp_path, contents


def test_lm_bytes_windows_come_from_their_split_files(corpus):
  root, contents = corpus
  task = shipped.LMBytes(data_dir=str(root), seq_len=24, valid_fraction=0.3)
  train, valid = set(task.files("train")), set(task.files("valid"))
  assert train and valid and not train & valid
  assert train | valid == set(contents)  # short.py, notes.txt and site-packages/ are left out.
  for split, files in (("train", train), ("valid", valid)):
    batch = task.batch(0, 32, split=split)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    np.testing.assert_array_equal(batch["weights"], 1.0)
    for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
      window = bytes(np.concatenate([inputs, targets[-1:]]).astype(np.uint8))
      assert any(window in contents[f] for f in files)


def test_lm_bytes_split_of_a_file_is_fixed_by_its_path(corpus):
  root, _ = corpus
  first = shipped.LMBytes(data_dir=str(root), seq_len=24, valid_fraction=0.3)
  again = shipped.LMBytes(data_dir=str(root), seq_len=24, valid_fraction=0.3, seed=9)
  assert first.files("valid") == again.files("valid")


def test_lm_bytes_empty_split_raises_naming_data_dir(tmp_path):
  (tmp_path / "only.py").write_bytes(b"a" * 100)
  with pytest.raises(ValueError, match="`data_dir`"):
    shipped.LMBytes(data_dir=str(tmp_path), seq_len=16)


def test_lm_bytes_default_corpus_is_the_standard_library():
  task = shipped.LMBytes(seq_len=64)
  train, valid = set(task.files("train")), set(task.files("valid"))
  assert len(train) > 100 and len(valid) > 10 and not train & valid
  assert "os.py" in train | valid
  assert not any("site-packages" in f.split(os.sep) for f in train | valid)
  batch = task.batch(0, 8, split="valid")
  root = shipped.default_corpus_dir()
  sources = [open(os.path.join(root, f), "rb").read() for f in sorted(valid)]
  for inputs in batch["inputs"]:
    assert any(bytes(inputs.astype(np.uint8)) in src for src in sources)
