"""Tests of attnjax.analysis.export."""

import json
import os
import subprocess

import numpy as np
import pytest

from attnjax.analysis import export

CHROMIUM = "/usr/bin/chromium"
TOKENS = ["[CLS]", "the", "cat", "</script>", "[SEP]"]


def _maps():
  rng = np.random.default_rng(0)
  return rng.dirichlet(np.ones(5), size=(2, 3, 5))  # [L=2, N=3, T=5, S=5]


def test_dict_and_products():
  w = _maps()
  rng = np.random.default_rng(1)
  q, k = rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(2, 3, 5, 4))
  d = export.to_dict(w, TOKENS, q=q, k=k)
  json.dumps(d)
  np.testing.assert_allclose(np.array(d["weights"]), w)
  prod = np.array(d["products"])
  assert prod.shape == (2, 3, 5, 5, 4)
  np.testing.assert_allclose(prod.sum(-1), np.einsum("lnth,lnsh->lnts", q, k))
  with pytest.raises(ValueError, match="tokens"):
    export.to_dict(w, TOKENS[:3])


def test_html_has_tokens_and_data(tmp_path):
  path = export.write_html(str(tmp_path / "view.html"), _maps(), TOKENS)
  page = open(path, encoding="utf-8").read()
  assert "cat" in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")
  assert page.count("</script>") == 2  # the token "</script>" is escaped in the data
  start = page.index('type="application/json">') + len('type="application/json">')
  data = json.loads(page[start:page.index("</script>", start)])
  assert data["tokens"] == TOKENS
  np.testing.assert_allclose(np.array(data["weights"]), _maps())


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="/usr/bin/chromium not installed")
def test_html_renders_in_headless_chromium(tmp_path):
  path = export.write_html(str(tmp_path / "view.html"), _maps(), TOKENS)
  shot = tmp_path / "shot.png"
  subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", f"--screenshot={shot}", "--window-size=1000,800",
                  f"file://{path}"], check=True, timeout=60, capture_output=True)
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  img = matplotlib.image.imread(str(shot))[..., :3]
  # The lines are drawn by the page's script in steelblue over white: bluish pixels prove the
  # script ran on the embedded data (text alone is grey).
  bluish = (img[..., 2] - img[..., 0]) > 0.15
  assert bluish.sum() > 100, "no attention lines were drawn"


def test_png_grid(tmp_path):
  path = export.plot_grid(str(tmp_path / "grid.png"), _maps(), TOKENS)
  with open(path, "rb") as f:
    head = f.read(8)
  assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000
