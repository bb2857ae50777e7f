"""Exporting attention for visualization: a JSON-able dict, a self-contained HTML head view, and a
PNG grid of maps.

Vig, "A Multiscale Visualization of Attention in the Transformer Model", arXiv:1906.05714. The head
view draws, for one layer and head, the tokens in two columns with a line from query token t (left)
to key token s (right) whose opacity is w[t, s]; the neuron view shows the query-key products
q_t ⊙ k_s (element-wise, summing to the logit q_t·k_s) behind each weight.

  to_dict(weights, tokens, q=, k=)        [L, N, T, S] -> {"tokens", "weights", ["products"]}
  write_html(path, weights, tokens)       BertViz-like head view: inline JS/CSS, no network
  plot_grid(path, weights, tokens=)       PNG: one layer × head grid of heat maps (matplotlib)
"""

from __future__ import annotations

import html
import json
from typing import Optional, Sequence

import numpy as np

from attnjax import catalog

__all__ = ["plot_grid", "to_dict", "write_html"]


def _maps(weights: np.ndarray) -> np.ndarray:
  w = np.asarray(weights, np.float64)
  if w.ndim == 3:
    w = w[None]
  if w.ndim != 4:
    raise ValueError(f"export: weights must be one example's [L, N, T, S] maps, got {np.shape(weights)}")
  return w


@catalog.serves(193, kind="analysis", name="attnjax.analysis.export.to_dict")
def to_dict(weights: np.ndarray, tokens: Sequence[str], q: Optional[np.ndarray] = None,
            k: Optional[np.ndarray] = None) -> dict:
  """A JSON-able dict of one example's maps (arXiv:1906.05714).

  Args:
    weights: `[L, N, T, S]` (or `[N, T, S]`).
    tokens: the T (= S) token strings.
    q, k: optional `[L, N, T, H]` / `[L, N, S, H]` queries and keys: adds the neuron view's
      `products[l][n][t][s] = q[l, n, t] ⊙ k[l, n, s]` (H numbers summing to the logit).

  Returns:
    `{"tokens": [...], "weights": nested lists [L][N][T][S], "products"?: [L][N][T][S][H]}`.
  """
  w = _maps(weights)
  if len(tokens) != w.shape[-2] or w.shape[-1] != w.shape[-2]:
    raise ValueError(f"export.to_dict: need len(tokens) = T = S, got {len(tokens)} tokens, maps "
                     f"{w.shape}")
  out = {"tokens": [str(t) for t in tokens], "weights": w.tolist()}
  if (q is None) != (k is None):
    raise ValueError("export.to_dict: pass both q and k, or neither")
  if q is not None:
    qa, ka = np.asarray(q, np.float64), np.asarray(k, np.float64)
    if qa.shape[:3] != w.shape[:3] or ka.shape[:2] != w.shape[:2] or qa.shape[-1] != ka.shape[-1]:
      raise ValueError(f"export.to_dict: q must be [L, N, T, H] and k [L, N, S, H] matching weights "
                       f"{w.shape}, got {qa.shape}, {ka.shape}")
    out["products"] = (qa[:, :, :, None, :] * ka[:, :, None, :, :]).tolist()
  return out


_TEMPLATE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>attention head view</title>
<style>body{font-family:sans-serif;margin:16px}svg text{font-size:13px}
select{margin-right:12px}</style></head><body>
<div>Layer <select id="layer"></select> Head <select id="head"></select></div>
<svg id="view" width="600" height="__H__"></svg>
<div id="tokens" style="display:none">__TOKENS__</div>
<script id="data" type="application/json">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
const L = D.weights.length, N = D.weights[0].length, T = D.tokens.length;
const ls = document.getElementById('layer'), hs = document.getElementById('head');
for (let i = 0; i < L; i++) ls.add(new Option(i, i));
for (let i = 0; i < N; i++) hs.add(new Option(i, i));
function draw() {
  const svg = document.getElementById('view'), ns = 'http://www.w3.org/2000/svg';
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const w = D.weights[ls.value][hs.value];
  for (let t = 0; t < T; t++) {
    for (const [x, anchor, side] of [[140, 'end', 0], [460, 'start', 1]]) {
      const e = document.createElementNS(ns, 'text');
      e.setAttribute('x', x); e.setAttribute('y', 20 + 20 * t);
      e.setAttribute('text-anchor', anchor); e.textContent = D.tokens[t]; svg.appendChild(e);
    }
    for (let s = 0; s < T; s++) {
      const l = document.createElementNS(ns, 'line');
      l.setAttribute('x1', 150); l.setAttribute('y1', 16 + 20 * t);
      l.setAttribute('x2', 450); l.setAttribute('y2', 16 + 20 * s);
      l.setAttribute('stroke', 'steelblue'); l.setAttribute('stroke-width', 2);
      l.setAttribute('stroke-opacity', w[t][s]); svg.appendChild(l);
    }
  }
}
ls.onchange = draw; hs.onchange = draw; draw();
</script></body></html>
"""


@catalog.serves(193, kind="analysis", name="attnjax.analysis.export.write_html")
def write_html(path: str, weights: np.ndarray, tokens: Sequence[str]) -> str:
  """Write a self-contained head view (layer/head selectors, tokens left and right, lines with
  opacity w[t, s]; inline JS/CSS, no network) of one example's maps `[L, N, T, T]`
  (arXiv:1906.05714). Returns `path`."""
  data = to_dict(weights, tokens)
  # "</" inside the JSON would end the <script> element early.
  payload = json.dumps(data).replace("</", "<\\/")
  page = (_TEMPLATE.replace("__DATA__", payload)
          .replace("__TOKENS__", html.escape(" ".join(data["tokens"])))
          .replace("__H__", str(30 + 20 * len(data["tokens"]))))
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path


@catalog.serves(193, kind="analysis", name="attnjax.analysis.export.plot_grid")
def plot_grid(path: str, weights: np.ndarray, tokens: Optional[Sequence[str]] = None) -> str:
  """Save a PNG grid (rows: layers, columns: heads) of one example's heat maps `[L, N, T, S]`."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  w = _maps(weights)
  n_l, n_h = w.shape[:2]
  fig, axes = plt.subplots(n_l, n_h, figsize=(1.6 * n_h + 1, 1.6 * n_l + 1), squeeze=False)
  for l in range(n_l):
    for h in range(n_h):
      ax = axes[l, h]
      ax.imshow(w[l, h], vmin=0.0, vmax=1.0, cmap="Blues")
      ax.set_xticks([])
      ax.set_yticks([])
      if l == 0:
        ax.set_title(f"head {h}", fontsize=8)
      if h == 0:
        ax.set_ylabel(f"layer {l}", fontsize=8)
  if tokens is not None:
    fig.suptitle(" ".join(tokens)[:120], fontsize=8)
  fig.savefig(path, dpi=60)
  plt.close(fig)
  return path
