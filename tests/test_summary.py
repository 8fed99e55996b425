"""summarize / totals count stored against dense parameters."""

import jax
import jax.numpy as jnp
import numpy as np

import dynadiag_jax as dd
from dynadiag_jax import pattern
from tests.test_allocation import Tower


def test_totals_and_table():
  x = jnp.ones((2, 8, 40))
  sp = {"up": 0.9, "mid": 0.8}
  model = Tower(dd.LayerFactory.from_dict(sp, backend="dense"))
  v = model.init(jax.random.PRNGKey(0), x)
  t = dd.totals(model, v, x)
  kd = (pattern.num_kept(40, 300, 0.9) * 40 + 2 * pattern.num_kept(300, 300, 0.8) * 300)
  dense_k = 300 * 64 + 64 * 17
  bias = 300 * 3 + 64 + 17
  assert t["stored_params"] == kd + dense_k + bias
  assert t["dense_params"] == 40 * 300 + 2 * 300 * 300 + dense_k + bias
  assert abs(t["sparsity"] - (1 - kd / (40 * 300 + 2 * 300 * 300))) < 1e-12
  table = dd.summarize(model, v, x)
  assert "sub/mid" in table and "40x300" in table and f"{t['stored_params']:,}" in table
  frozen, _ = dd.freeze(v)
  t2 = dd.totals(model, frozen, x)
  assert (t2["stored_params"], t2["dense_params"]) == (t["stored_params"], t["dense_params"])
  assert "frozen" in dd.summarize(model, frozen, x)


def test_summary_reports_inputs_and_outputs_no_kept_diagonal_touches():
  """8x32 at K = 2 adjacent diagonals: each covers the 8 inputs and 8 of the 32 outputs."""
  layer = dd.DiagDense(32, sparsity=0.95)
  x = jnp.ones((1, 8))
  v = layer.init(jax.random.PRNGKey(0), x)
  alpha = np.zeros(32, np.float32)
  alpha[[5, 6]] = 1.0  # the top-2: offsets 5 and 6 cover outputs 5..13
  v["params"]["alpha"] = jnp.asarray(alpha)
  calls = dd.linear_calls(layer, v, x)
  assert dd.summary.unconnected(v, calls[0]) == (0, 32 - 9)
  frozen, _ = dd.freeze(v)
  assert dd.summary.unconnected(frozen, dd.linear_calls(layer, frozen, x)[0]) == (0, 23)
  table = dd.summarize(layer, frozen, x)
  assert "unconnected in / out" in table and "0 / 23" in table
  wide = dd.DiagDense(8, sparsity=0.0)  # every diagonal: nothing unconnected
  vw = wide.init(jax.random.PRNGKey(0), jnp.ones((1, 32)))
  assert dd.summary.unconnected(vw, dd.linear_calls(wide, vw, jnp.ones((1, 32)))[0]) == (0, 0)
