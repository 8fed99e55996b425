"""The optax chain touches alpha only: l1, no decay, frozen after freeze_step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dynadiag_jax import optim


def _params(rng):
  return {"l": {"alpha": jnp.asarray(rng.normal(size=6), jnp.float32),
                "values": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=4), jnp.float32)},
          "d": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}}


def test_masks_by_name(rng):
  p = _params(rng)
  assert optim.alpha_mask(p) == {"l": {"alpha": True, "values": False, "bias": False},
                                 "d": {"kernel": False}}
  assert optim.decay_mask(p) == {"l": {"alpha": False, "values": True, "bias": False},
                                 "d": {"kernel": True}}


def test_l1_on_alpha_only(rng):
  p = _params(rng)
  g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), p)
  base = optax.sgd(1.0)
  tx = optim.wrap(base, l1=0.3)
  u, _ = tx.update(g, tx.init(p), p)
  u0, _ = base.update(g, base.init(p), p)
  chex.assert_trees_all_close(u["l"]["alpha"], u0["l"]["alpha"] - 0.3 * jnp.sign(p["l"]["alpha"]))
  for path in (("l", "values"), ("l", "bias"), ("d", "kernel")):
    chex.assert_trees_all_close(u[path[0]][path[1]], u0[path[0]][path[1]])


def test_adamw_with_decay_mask_never_decays_alpha(rng):
  p = _params(rng)
  zero = jax.tree.map(jnp.zeros_like, p)
  tx = optim.wrap(optax.adamw(0.1, weight_decay=0.5, mask=optim.decay_mask))
  u, _ = tx.update(zero, tx.init(p), p)
  chex.assert_trees_all_close(u["l"]["alpha"], jnp.zeros(6))
  chex.assert_trees_all_close(u["l"]["values"], -0.1 * 0.5 * p["l"]["values"])


def test_wrap_without_l1_is_the_transform_itself():
  tx = optax.adam(0.1)
  assert optim.wrap(tx) is tx


def test_alpha_lr_scales_alpha_updates_only(rng):
  p = _params(rng)
  g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), p)
  base = optax.adam(0.1)
  u0, _ = base.update(g, base.init(p), p)
  tx = optim.wrap(base, l1=0.3, alpha_lr=10.0)
  u, _ = tx.update(g, tx.init(p), p)
  g1 = {**g, "l": {**g["l"], "alpha": g["l"]["alpha"] + 0.3 * jnp.sign(p["l"]["alpha"])}}
  u1, _ = base.update(g1, base.init(p), p)
  chex.assert_trees_all_close(u["l"]["alpha"], 10.0 * u1["l"]["alpha"], rtol=1e-6)
  chex.assert_trees_all_close((u["l"]["values"], u["d"]), (u0["l"]["values"], u0["d"]))
  frozen = {"l": {k: v for k, v in p["l"].items() if k != "alpha"}, "d": p["d"]}  # no alpha
  fg = jax.tree.map(jnp.ones_like, frozen)
  uf, _ = tx.update(fg, tx.init(frozen), frozen)
  chex.assert_trees_all_close(uf, base.update(fg, base.init(frozen), frozen)[0])
  with pytest.raises(ValueError, match="alpha_lr"):
    optim.wrap(base, alpha_lr=0.0)


def test_select_every_applies_the_sum_of_alpha_updates_every_n_steps(rng):
  p = _params(rng)
  base = optax.adam(0.1)
  tx, ref = optim.wrap(base, alpha_lr=2.0, select_every=3), optim.wrap(base, alpha_lr=2.0)
  st, st_ref = tx.init(p), ref.init(p)
  held = jnp.zeros(6)
  for i in range(6):
    g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), p)
    u, st = tx.update(g, st, p)
    u_ref, st_ref = ref.update(g, st_ref, p)
    held = held + u_ref["l"]["alpha"]
    if i % 3 == 2:  # the sum of the window's (scaled Adam) updates, then nothing held
      chex.assert_trees_all_close(u["l"]["alpha"], held, rtol=1e-5, atol=1e-7)
      held = jnp.zeros(6)
    else:
      chex.assert_trees_all_close(u["l"]["alpha"], jnp.zeros(6))
    chex.assert_trees_all_close((u["l"]["values"], u["d"]), (u_ref["l"]["values"], u_ref["d"]))
  for bad in (0, 2.5):
    with pytest.raises(ValueError, match="select_every"):
      optim.wrap(base, select_every=bad)


def test_alpha_update_layer_steps_alpha_by_its_layer_normalized_gradient(rng):
  p = _params(rng)
  base = optax.adam(0.1)
  tx = optim.wrap(base, alpha_update="layer", lr=0.5, alpha_lr=2.0)
  st = tx.init(p)
  g1, g2 = (jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), p)
            for _ in range(2))
  u1, st = tx.update(g1, st, p)
  u2, st = tx.update(g2, st, p)
  n = lambda g: g / np.sqrt(np.mean(np.square(np.asarray(g))))
  a1, a2 = n(g1["l"]["alpha"]), n(g2["l"]["alpha"])
  chex.assert_trees_all_close(u1["l"]["alpha"], -0.5 * 2.0 * a1, rtol=1e-5)
  chex.assert_trees_all_close(u2["l"]["alpha"], -0.5 * 2.0 * (0.9 * a1 + a2), rtol=1e-5)
  # every other leaf as base alone (Adam's state sees no alpha)
  r1, rst = base.update(g1, base.init(p), p)
  r2, _ = base.update(g2, rst, p)
  chex.assert_trees_all_close((u2["l"]["values"], u2["d"]), (r2["l"]["values"], r2["d"]))
  with pytest.raises(ValueError, match="alpha_update"):
    optim.wrap(base, alpha_update="sgd", lr=0.1)
  with pytest.raises(ValueError, match="needs the learning rate"):
    optim.wrap(base, alpha_update="layer")


def test_select_after_zeroes_alpha_updates_while_adam_state_accumulates(rng):
  p = _params(rng)
  base = optax.adam(0.1)
  tx, ref = optim.wrap(base, select_after=2), base
  st, st_ref = tx.init(p), ref.init(p)
  for i in range(4):
    g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), p)
    u, st = tx.update(g, st, p)
    u_ref, st_ref = ref.update(g, st_ref, p)
    want = jnp.zeros(6) if i < 2 else u_ref["l"]["alpha"]  # step 2 on: Adam's, with its history
    chex.assert_trees_all_close(u["l"]["alpha"], want, rtol=1e-6)
    chex.assert_trees_all_close((u["l"]["values"], u["d"]), (u_ref["l"]["values"], u_ref["d"]))
  with pytest.raises(ValueError, match="select_after"):
    optim.wrap(base, select_after=-1)


def test_hold_zeroes_alpha_updates_of_the_named_layers_only(rng):
  p = {**_params(rng), "attn_out": {"alpha": jnp.ones(5), "values": jnp.ones((5, 3))}}
  assert optim.held_alpha_mask(("attn_out",))(p) == {
      "l": {"alpha": False, "values": False, "bias": False}, "d": {"kernel": False},
      "attn_out": {"alpha": True, "values": False}}
  base = optax.adam(0.1)
  tx = optim.wrap(base, hold=("attn_out",))
  st, st_ref = tx.init(p), base.init(p)
  g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), p)
  u, _ = tx.update(g, st, p)
  u_ref, _ = base.update(g, st_ref, p)
  chex.assert_trees_all_close(u["attn_out"]["alpha"], jnp.zeros(5))
  assert float(jnp.abs(u_ref["attn_out"]["alpha"]).min()) > 0  # the hold is what zeroes it
  chex.assert_trees_all_close((u["l"], u["d"], u["attn_out"]["values"]),
                              (u_ref["l"], u_ref["d"], u_ref["attn_out"]["values"]))
  for bad in ("attn_out", ("",), (3,)):
    with pytest.raises(ValueError, match="hold"):
      optim.wrap(base, hold=bad)


def _top(a, k):
  return set(np.argsort(-np.asarray(a, np.float64), kind="stable")[:k].tolist())


@pytest.mark.parametrize("max_swaps", [1, 2])
def test_limit_swaps_lets_at_most_n_diagonals_enter_the_top_k(rng, max_swaps):
  p, s = 40, 0.8  # K = 8
  k = 8
  tx = optim.limit_swaps(max_swaps, {"l": s})
  limited = 0
  for _ in range(30):
    a = jnp.asarray(rng.normal(size=p), jnp.float32)
    u = jnp.asarray(rng.normal(size=p) * rng.choice([0.01, 0.3, 3.0]), jnp.float32)
    params, upd = {"l": {"alpha": a, "values": jnp.ones((p, 3))}}, {"l": {"alpha": u, "values": u[:, None] * jnp.ones(3)}}
    out, _ = tx.update(upd, tx.init(params), params)
    new = optax.apply_updates(params, out)["l"]["alpha"]
    before, free, got = _top(a, k), _top(a + u, k), _top(new, k)
    entered = sorted(free - before, key=lambda i: -float((a + u)[i]))
    assert len(got - before) == min(len(entered), max_swaps)
    assert got - before == set(entered[:max_swaps])  # the strongest entrants first
    left = sorted(before - free, key=lambda i: float((a + u)[i]))
    assert before - got == set(left[:len(got - before)])  # against the weakest kept
    kept = np.asarray(sorted(got))
    np.testing.assert_array_equal(np.asarray(new)[kept], np.asarray(a + u)[kept])
    chex.assert_trees_all_close(out["l"]["values"], upd["l"]["values"])  # alpha only
    if len(entered) <= max_swaps:  # within the limit: alpha's update passes unchanged
      np.testing.assert_array_equal(np.asarray(out["l"]["alpha"]), np.asarray(u))
    limited += len(entered) > max_swaps
  assert limited > 5  # the draws exercised the cap, not only free updates


def test_limit_swaps_through_wrap_and_its_errors(rng):
  p = {"l": {"alpha": jnp.asarray(rng.normal(size=10), jnp.float32)}}
  with pytest.raises(ValueError, match="sparsity"):
    optim.wrap(optax.sgd(1.0), max_swaps=1)
  for bad in (-1, 1.5):
    with pytest.raises(ValueError, match="max_swaps"):
      optim.wrap(optax.sgd(1.0), max_swaps=bad, sparsity={"l": 0.5})
  tx = optim.wrap(optax.sgd(1.0), max_swaps=1, sparsity={"other": 0.5})
  with pytest.raises(ValueError, match="no sparsity for layer 'l'"):
    tx.update(p, tx.init(p), p)
  tx = optim.wrap(optax.sgd(1.0), max_swaps=1, sparsity={"l": 0.5})  # K = 5
  g = {"l": {"alpha": -jnp.asarray(rng.normal(size=10) * 10, jnp.float32)}}
  new = optax.apply_updates(p, tx.update(g, tx.init(p), p)[0])["l"]["alpha"]
  assert len(_top(new, 5) - _top(p["l"]["alpha"], 5)) <= 1
  tx4 = optim.limit_swaps(1, {"l": 0.5})  # P = 4, K = 2: a tie at the boundary goes as top_k's
  a = {"l": {"alpha": jnp.asarray([0.1, 0.5, 0.4, 0.0])}}
  u = {"l": {"alpha": jnp.asarray([0.3, 0.0, 0.0, 0.0])}}  # 0.4 ties 0.4: the lower index 0 enters
  new = optax.apply_updates(a, tx4.update(u, tx4.init(a), a)[0])["l"]["alpha"]
  assert _top(new, 2) == {0, 1}
  tied = {"l": {"alpha": jnp.full(10, 0.1)}}  # a held layer (zero update) among ties: no change
  zero = {"l": {"alpha": jnp.zeros(10)}}
  np.testing.assert_array_equal(tx.update(zero, tx.init(tied), tied)[0]["l"]["alpha"], 0.0)
