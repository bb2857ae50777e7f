"""Tasks over data that ships with the installed software; nothing is downloaded.

- `digits`: scikit-learn's handwritten digits (1797 images of 8x8 pixels, `sklearn.datasets.
  load_digits`, bundled inside the package), as images or as pixel-token sequences.
- `lm_bytes`: byte-level language modelling over the files of a local directory, by default the
  installed Python standard library's own `.py` sources.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
import sysconfig
import zlib
from typing import Optional

import numpy as np

from attnjax.data import base

# Pixel intensities of sklearn's digits are integers 0..16.
_DIGIT_LEVELS = 17


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  (slow import, only when used)
  digits = datasets.load_digits()
  return digits.images.astype(np.int32), digits.target.astype(np.int32)


def _epoch_indices(seed: int, split: str, pool: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """Examples at global positions of an endless stream that visits `pool` once per epoch, in a fresh
  order each epoch (a pure function of seed, split and the epoch number)."""
  epochs, offsets = np.divmod(positions, len(pool))
  out = np.empty(len(positions), np.int64)
  for epoch in np.unique(epochs):
    order = base.make_rng(seed, split, int(epoch)).permutation(len(pool))
    here = epochs == epoch
    out[here] = pool[order[offsets[here]]]
  return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Digits:
  """Handwritten digits classification (10 classes) from `sklearn.datasets.load_digits`.

  `representation="image"`: inputs `[8, 8, 1]` float32 in [0, 1] (intensity / 16), for a ViT.
  `representation="pixels"`: inputs `[64]` int32 tokens 0..16 (raster order, vocabulary 17), for a
  sequence model, like LRA's pixel-sequence image task.
  The valid split is a fixed `valid_fraction` of the examples chosen by `split_seed` (independent of
  `seed`, so changing the training seed never moves examples between splits); each split is visited
  once per epoch, in a fresh order per epoch.
  """
  name = "digits"
  seed: int = 0
  representation: str = "image"
  valid_fraction: float = 0.2
  split_seed: int = 0

  def __post_init__(self):
    base.check_int("seed", self.seed, minimum=0)
    base.check_int("split_seed", self.split_seed, minimum=0)
    if self.representation not in ("image", "pixels"):
      raise base.config_error("representation", self.representation,
                              "must be 'image' or 'pixels'")
    base.check_float("valid_fraction", self.valid_fraction, low=0.0, high=1.0, low_open=True,
                     high_open=True)

  @property
  def spec(self) -> base.TaskSpec:
    if self.representation == "image":
      return base.TaskSpec(name=self.name, kind="classify", input_shape=(8, 8, 1),
                           input_dtype="float32", vocab_size=0, num_classes=10, seq_len=64)
    return base.TaskSpec(name=self.name, kind="classify", input_shape=(64,), input_dtype="int32",
                         vocab_size=_DIGIT_LEVELS, num_classes=10, seq_len=64)

  def split_indices(self, split: str) -> np.ndarray:
    """Sorted indices into `load_digits()` of the examples in `split`."""
    num = len(_load_digits()[1])
    order = np.random.default_rng(self.split_seed).permutation(num)
    num_valid = max(1, int(round(self.valid_fraction * num)))
    return np.sort(order[:num_valid] if split == "valid" else order[num_valid:])

  def batch(self, step: int, batch_size: int, *, split: str = "train", process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    rows = base.check_batch_args(step, batch_size, split, process_index, process_count)
    images, labels = _load_digits()
    positions = operator.index(step) * batch_size + np.arange(batch_size)[rows]
    index = _epoch_indices(self.seed, split, self.split_indices(split), positions)
    if self.representation == "image":
      inputs = (images[index] / (_DIGIT_LEVELS - 1)).astype(np.float32)[..., None]
    else:
      inputs = images[index].reshape(len(index), 64)
    return {"inputs": inputs, "targets": labels[index],
            "weights": np.ones(len(index), np.float32)}


def default_corpus_dir() -> str:
  """The installed Python standard library (`sysconfig.get_paths()["stdlib"]`)."""
  return sysconfig.get_paths()["stdlib"]


# Directories never read: installed third-party packages live inside some stdlib trees.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def _split_of(relative_path: str, valid_fraction: float) -> str:
  # crc32 of the path, not hash(): stable across processes, machines and Python versions.
  bucket = zlib.crc32(relative_path.encode("utf-8", "surrogateescape")) / 2.0**32
  return "valid" if bucket < valid_fraction else "train"


@dataclasses.dataclass(frozen=True)
class _Corpus:
  """One split's files: relative paths, absolute paths and window-start counts."""
  relative_paths: tuple[str, ...]
  paths: tuple[str, ...]
  cumulative_starts: np.ndarray  # [files]: number of window starts in files 0..i.


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMBytes:
  """Byte-level language modelling (vocabulary 256) over the files of a local directory.

  Files whose names end with `suffix` under `data_dir` (default: the Python standard library; the
  directories `site-packages`, `dist-packages` and `__pycache__` are skipped) are split by file: a
  file is in valid when the crc32 of its relative path, as a fraction of 2^32, is below
  `valid_fraction`. Each example is a window of `seq_len + 1` bytes at a position drawn uniformly
  among all windows of the split (files shorter than a window are left out), from
  `step_rng(seed, split, step)`; inputs are its first `seq_len` bytes, targets the last `seq_len`,
  every weight 1. Files are read lazily, one window at a time, so only the bytes of this process's
  rows are read.
  """
  name = "lm_bytes"
  seed: int = 0
  seq_len: int = 128
  data_dir: Optional[str] = None
  suffix: str = ".py"
  valid_fraction: float = 0.05
  _corpora: dict = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    base.check_int("seed", self.seed, minimum=0)
    base.check_int("seq_len", self.seq_len, minimum=1)
    base.check_float("valid_fraction", self.valid_fraction, low=0.0, high=1.0, low_open=True,
                     high_open=True)
    if not isinstance(self.suffix, str):
      raise base.config_error("suffix", self.suffix, "must be a string such as '.py'")
    root = self.corpus_dir
    if not isinstance(root, str) or not os.path.isdir(root):
      raise base.config_error("data_dir", self.data_dir, f"{root!r} is not a readable directory")
    corpora = self._index(root)
    for split, corpus in corpora.items():
      if not corpus.paths:
        raise base.config_error(
            "data_dir", self.data_dir,
            f"the {split} split of {root!r} has no '{self.suffix}' file of at least seq_len + 1 = "
            f"{self.seq_len + 1} bytes (change data_dir, suffix, seq_len or valid_fraction)")
    object.__setattr__(self, "_corpora", corpora)

  @property
  def corpus_dir(self) -> str:
    return default_corpus_dir() if self.data_dir is None else self.data_dir

  @property
  def spec(self) -> base.TaskSpec:
    return base.TaskSpec(name=self.name, kind="lm", input_shape=(self.seq_len,),
                         input_dtype="int32", vocab_size=256, num_classes=256,
                         seq_len=self.seq_len)

  def files(self, split: str) -> tuple[str, ...]:
    """Paths, relative to the corpus directory, of the files in `split`."""
    return self._corpora[split].relative_paths

  def _index(self, root: str) -> dict[str, _Corpus]:
    found = {split: [] for split in base.SPLITS}
    window = self.seq_len + 1
    for directory, subdirs, names in os.walk(root):
      subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS)
      for file_name in sorted(names):
        if not file_name.endswith(self.suffix):
          continue
        path = os.path.join(directory, file_name)
        if not os.path.isfile(path):
          continue
        relative = os.path.relpath(path, root)
        size = os.path.getsize(path)
        if size >= window:
          found[_split_of(relative, self.valid_fraction)].append((relative, path, size))
    corpora = {}
    for split, entries in found.items():
      entries.sort()
      starts = np.array([size - window + 1 for _, _, size in entries], np.int64)
      corpora[split] = _Corpus(relative_paths=tuple(e[0] for e in entries),
                               paths=tuple(e[1] for e in entries),
                               cumulative_starts=np.cumsum(starts))
    return corpora

  def batch(self, step: int, batch_size: int, *, split: str = "train", process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    rows = base.check_batch_args(step, batch_size, split, process_index, process_count)
    corpus = self._corpora[split]
    # Draw every row's window for the global batch (cheap), then read only this process's rows.
    draws = base.step_rng(self.seed, split, step).integers(
        0, corpus.cumulative_starts[-1], size=batch_size)[rows]
    file_ids = np.searchsorted(corpus.cumulative_starts, draws, side="right")
    previous = np.concatenate([[0], corpus.cumulative_starts])[file_ids]
    window = self.seq_len + 1
    data = np.empty((len(draws), window), np.uint8)
    for row, (file_id, offset) in enumerate(zip(file_ids, draws - previous, strict=True)):
      with open(corpus.paths[file_id], "rb") as f:
        f.seek(int(offset))
        chunk = f.read(window)
      if len(chunk) != window:
        raise RuntimeError(f"{corpus.paths[file_id]} changed size since the corpus was indexed")
      data[row] = np.frombuffer(chunk, np.uint8)
    data = data.astype(np.int32)
    return {"inputs": data[:, :-1], "targets": data[:, 1:],
            "weights": np.ones((len(draws), self.seq_len), np.float32)}
