"""GAT, GATv2 and SuperGAT against per-node numpy loops of their formulas (edge features, self-loops
with the mean fill, concat and mean heads, residual); the same outputs as PyTorch Geometric's
GATConv / GATv2Conv / SuperGATConv on the same weights (moved with from_pyg, and back with to_pyg)
where torch_geometric is installed; and the GATv2 paper's claim: GAT ranks a node's neighbours
the same way for every query node (static attention), GATv2 does not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import graph
from tests import tolerances

V, F, E, D, H, C = 7, 5, 16, 3, 2, 4


def _graph(seed=0):
  rng = np.random.default_rng(seed)
  pairs = [(j, i) for i in range(V) for j in range(V)]
  chosen = rng.choice(len(pairs), E, replace=False)   # self-loops possible: they get replaced
  s, r = np.asarray([pairs[c] for c in chosen], np.int32).T
  return (rng.normal(size=(V, F)).astype(np.float32), s, r,
          rng.normal(size=(E, D)).astype(np.float32))


def _params(layer, seed=1, edges=True):
  nodes, s, r, e = _graph()
  params = layer.init(jax.random.PRNGKey(seed), nodes, s, r, *((e,) if edges else ()))["params"]
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(np.asarray(v) + 0.3 * rng.normal(size=v.shape), jnp.float32)
          for k, v in params.items()}


def _loops(s, r, e):
  """PyG's remove_self_loops + add_self_loops(fill_value='mean'), in numpy."""
  keep = s != r
  s, r, e = s[keep], r[keep], e[keep]
  fill = np.stack([e[r == i].mean(axis=0) if (r == i).any() else np.zeros(e.shape[1])
                   for i in range(V)])
  return (np.concatenate([s, np.arange(V)]), np.concatenate([r, np.arange(V)]),
          np.concatenate([e, fill]))


def _leaky(x, slope=0.2):
  return np.where(x > 0, x, slope * x)


def _np_layer(p, nodes, s, r, e, version, concat=True):
  """Per node i and head h: scores of the edges into i, softmax, weighted sum of messages."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = nodes.astype(np.float64)
  s, r, e = _loops(s, r, e.astype(np.float64))
  if version == "gat":
    xs = xd = (x @ p["lin"]).reshape(V, H, C)
  else:
    xs = (x @ p["lin_l"] + p["lin_l_bias"]).reshape(V, H, C)
    xd = (x @ p["lin_r"] + p["lin_r_bias"]).reshape(V, H, C)
  ef = (e @ p["lin_edge"]).reshape(-1, H, C)
  out = np.zeros((V, H, C))
  for i in range(V):
    for h in range(H):
      idx = np.flatnonzero(r == i)
      if version == "gat":
        sc = np.asarray([_leaky(p["att_src"][h] @ xs[s[k], h] + p["att_dst"][h] @ xd[i, h]
                                + p["att_edge"][h] @ ef[k, h]) for k in idx])
      else:
        sc = np.asarray([p["att"][h] @ _leaky(xs[s[k], h] + xd[i, h] + ef[k, h]) for k in idx])
      a = np.exp(sc - sc.max())
      a /= a.sum()
      out[i, h] = sum(a_k * xs[s[k], h] for a_k, k in zip(a, idx, strict=True))
  out = out.reshape(V, H * C) if concat else out.mean(axis=1)
  return out + p["bias"]


@pytest.mark.parametrize("version", ["gat", "gatv2"])
@pytest.mark.parametrize("concat", [True, False])
def test_layer_matches_numpy_loop(version, concat):
  cls = graph.GATConv if version == "gat" else graph.GATv2Conv
  layer = cls(out_channels=C, heads=H, edge_dim=D, concat=concat)
  params = _params(layer)
  nodes, s, r, e = _graph()
  got = jax.jit(lambda p: layer.apply({"params": p}, nodes, s, r, e))(params)
  np.testing.assert_allclose(got, _np_layer(params, nodes, s, r, e, version, concat),
                             **tolerances.OUTPUT[jnp.float32])


def test_residual_dropout_and_errors():
  nodes, s, r, e = _graph()
  layer = graph.GATConv(out_channels=C, heads=H, edge_dim=D, residual=True, dropout=0.5)
  params = _params(layer)
  plain = graph.GATConv(out_channels=C, heads=H, edge_dim=D).apply(
      {"params": {k: v for k, v in params.items() if k != "res"}}, nodes, s, r, e)
  y = layer.apply({"params": params}, nodes, s, r, e)
  np.testing.assert_allclose(y, plain + nodes @ params["res"], **tolerances.OUTPUT[jnp.float32])
  dropped = layer.apply({"params": params}, nodes, s, r, e, train=True,
                        rngs={"dropout": jax.random.PRNGKey(3)})
  assert tolerances.rel_rms(dropped, y) > tolerances.CHANGED_REL_RMS
  with pytest.raises(ValueError, match="att_src"):
    graph.gat_layer(nodes, s, r, lin=params["lin"], att_src=params["att_src"][:1],
                    att_dst=params["att_dst"])
  with pytest.raises(ValueError, match="receivers"):
    graph.gat_layer(nodes, s, r[:-1], lin=params["lin"], att_src=params["att_src"],
                    att_dst=params["att_dst"])


def _np_supergat(p, nodes, s, r, kind):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = (nodes.astype(np.float64) @ p["lin"]).reshape(V, H, C)
  s, r, _ = _loops(s, r, np.zeros((len(s), 1)))
  out = np.zeros((V, H, C))
  for i in range(V):
    for h in range(H):
      idx = np.flatnonzero(r == i)
      dots = np.asarray([x[i, h] @ x[s[k], h] for k in idx])
      if kind == "SD":
        sc = dots / np.sqrt(C)
      else:
        sc = np.asarray([(p["att_l"][h] @ x[s[k], h] + p["att_r"][h] @ x[i, h]) for k in idx])
        sc = sc / (1 + np.exp(-dots))
      a = np.exp(_leaky(sc) - _leaky(sc).max())
      out[i, h] = (a / a.sum()) @ x[s[idx], h]
  return out.reshape(V, H * C) + p["bias"]


@pytest.mark.parametrize("kind", ["MX", "SD"])
def test_supergat_matches_numpy_loop(kind):
  layer = graph.SuperGATConv(out_channels=C, heads=H, attention_type=kind)
  nodes, s, r, _ = _graph()
  params = _params(layer, edges=False)
  got = layer.apply({"params": params}, nodes, s, r)
  np.testing.assert_allclose(got, _np_supergat(params, nodes, s, r, kind),
                             **tolerances.OUTPUT[jnp.float32])


def test_static_attention_of_gat_and_dynamic_of_gatv2():
  """Complete bipartite graphs, 6 keys -> 5 queries, 5 random draws of features and weights: under
  GAT the keys' order by attention is the same at every query in every draw (Theorem 1 of
  arXiv:2105.14491, static attention); under GATv2 it differs between queries in most draws."""
  keys, queries = 6, 5
  s = np.repeat(np.arange(keys), queries).astype(np.int32)
  r = np.tile(np.arange(keys, keys + queries), keys).astype(np.int32)
  dynamic = {"gat": 0, "gatv2": 0}
  for seed in range(5):
    nodes = np.random.default_rng(seed).normal(size=(keys + queries, F)).astype(np.float32)
    for version, fn, cls in [("gat", graph.gat_layer, graph.GATConv),
                             ("gatv2", graph.gatv2_layer, graph.GATv2Conv)]:
      params = cls(out_channels=8, heads=1, add_self_loops=False).init(
          jax.random.PRNGKey(seed), nodes, s, r)["params"]
      _, (_, rr, alpha) = fn(nodes, s, r, add_self_loops=False, return_attention=True, **params)
      a = np.zeros((queries, keys))
      a[np.asarray(rr) - keys, s] = np.asarray(alpha)[:, 0]
      order = np.argsort(-a, axis=1)
      dynamic[version] += int((order != order[0]).any())
  assert dynamic["gat"] == 0 and dynamic["gatv2"] >= 3, dynamic


def test_pyg_layers_give_the_same_outputs_and_weights_move_both_ways():
  torch = pytest.importorskip("torch")
  pyg = pytest.importorskip("torch_geometric.nn")
  nodes, s, r, e = _graph()
  edge_index = torch.from_numpy(np.stack([s, r]).astype(np.int64))
  cases = [(pyg.GATConv(F, C, heads=H, edge_dim=D), graph.GATConv(out_channels=C, heads=H,
                                                                   edge_dim=D), True),
           (pyg.GATv2Conv(F, C, heads=H, edge_dim=D, concat=False),
            graph.GATv2Conv(out_channels=C, heads=H, edge_dim=D, concat=False), True),
           (pyg.GATv2Conv(F, C, heads=H, share_weights=True),
            graph.GATv2Conv(out_channels=C, heads=H, share_weights=True), False),
           (pyg.SuperGATConv(F, C, heads=H, attention_type="SD"),
            graph.SuperGATConv(out_channels=C, heads=H, attention_type="SD"), False)]
  for theirs, ours, with_edges in cases:
    theirs.eval()
    torch.manual_seed(0)
    for p in theirs.parameters():   # PyG zero-initializes biases: move every weight
      torch.nn.init.normal_(p, std=0.5)
    args = (torch.from_numpy(nodes), edge_index) + ((torch.from_numpy(e),) if with_edges else ())
    want = theirs(*args).detach().numpy()
    params = graph.from_pyg(theirs.state_dict())
    got = ours.apply({"params": params}, nodes, s, r, *((e,) if with_edges else ()))
    np.testing.assert_allclose(got, want, **tolerances.OUTPUT[jnp.float32])
    back = {k: torch.from_numpy(np.array(v)) for k, v in graph.to_pyg(params).items()}
    theirs.load_state_dict(back)
    np.testing.assert_allclose(theirs(*args).detach().numpy(), want,
                               **tolerances.OUTPUT[jnp.float32])
