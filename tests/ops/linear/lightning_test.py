"""Lightning Attention-2 (attnjax/ops/linear/lightning.py): the tiled form equals the plain
recurrence.

Each property is checked against an explicit evaluation of the formula written out here."""


import numpy as np
import pytest

from attnjax.ops import linear as lin
from tests.inputs import qkv
from tests.ops.linear.helpers import assert_rel


@pytest.mark.parametrize("T,chunk", [(29, 8), (64, 16), (50, 64)])
def test_lightning_2_equals_plain_recurrence(T, chunk):
  q, k, v = qkv(T=T, K=4)
  B, _, N, H = q.shape
  lam = np.exp(np.asarray(lin.lightning_decay_rates(N)))
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  expected = np.zeros(v.shape)
  state = np.zeros((B, N, H, v.shape[-1]))
  for t in range(T):   # S_t = λ S_{t-1} + k_t v_tᵀ, o_t = (q_t / √H) S_t
    state = lam[None, :, None, None] * state + np.einsum("bnf,bnh->bnfh", kn[:, t], vn[:, t])
    expected[:, t] = np.einsum("bnf,bnfh->bnh", qn[:, t] * H ** -0.5, state)
  out = lin.lightning_attention_2(q, k, v, chunk_size=chunk, implementation="xla")
  assert_rel(out, expected)
