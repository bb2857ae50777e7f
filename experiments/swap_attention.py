"""Training-free attention mechanisms inside a pretrained sentence encoder: each replaces every layer's
softmax attention of all-MiniLM-L6-v2 (`attnjax.pretrained`, weights unchanged), and its embeddings
of the probe sentences (attnjax/pretrained/probe.py) are compared with the original's by cosine.

  python -m experiments.swap_attention
  python -m experiments.swap_attention --mechanisms="sliding_window:window=4,sage_attention"

`--mechanisms`: comma-separated `name[:key=value;key=value]` (values parsed as Python literals);
the default list is `DEFAULT`. Prints a markdown table (mean and lowest cosine over the sentences,
and the sentence-level retrieval kept: the share of sentences whose nearest original embedding is
their own); docs/results.md records it.
"""

import ast

import numpy as np
from absl import app
from absl import flags

from attnjax import pretrained
from attnjax.pretrained.probe import PROBE_SENTENCES
from experiments import cli

DEFAULT = ("softmax", "sage_attention", "sage_attention3", "sliding_window:window=16",
           "sliding_window:window=4", "delta_corrected_sliding_window:window=4;num_sinks=1;gamma=8",
           "hip_attention:block_size=8;top_k=2", "moba_attention:block_size=8;top_k=2")
_MECHANISMS = flags.DEFINE_string("mechanisms", ",".join(DEFAULT),
                                  "Comma-separated name[:key=value;key=value] specs.")
_MODEL = flags.DEFINE_string("model", "all-MiniLM-L6-v2", "A model of attnjax.pretrained.MODELS.")


def parse(spec: str) -> tuple[str, dict]:
  """`"name:key=value;key=value"` -> (name, settings)."""
  name, _, rest = spec.strip().partition(":")
  settings = {}
  for item in filter(None, (s.strip() for s in rest.split(";"))):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"--mechanisms: {item!r} in {spec!r} is not key=value")
    try:
      settings[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      settings[key.strip()] = value.strip()
  return name, settings


def compare(encoder, specs, sentences=PROBE_SENTENCES) -> list[dict]:
  """Per spec: mean and lowest cosine to `encoder`'s embeddings, and the retrieval kept."""
  base = encoder.encode(list(sentences))
  rows = []
  for spec in specs:
    name, settings = parse(spec)
    emb = encoder.with_mechanism(name, **settings).encode(list(sentences))
    cos = (emb * base).sum(-1)                           # both L2-normalized
    nearest = np.argmax(emb @ base.T, axis=1)
    rows.append({"mechanism": name, "settings": settings, "mean": float(cos.mean()),
                 "min": float(cos.min()),
                 "retrieval": float(np.mean(nearest == np.arange(len(sentences))))})
  return rows


def markdown(rows) -> str:
  lines = ["| mechanism | settings | mean cosine | lowest cosine | retrieval kept |",
           "| --- | --- | ---: | ---: | ---: |"]
  for r in rows:
    settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults"
    lines.append(f"| `{r['mechanism']}` | {settings} | {r['mean']:.4f} | {r['min']:.4f} | "
                 f"{r['retrieval']:.2f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]} (flags are --name=value)", "error")
  specs = [s for s in _MECHANISMS.value.split(",") if s.strip()]
  try:
    rows = compare(pretrained.load(_MODEL.value), specs)
  except (ValueError, ModuleNotFoundError) as e:
    cli.fail(str(e), "error")
  print(markdown(rows))


if __name__ == "__main__":
  app.run(main)
