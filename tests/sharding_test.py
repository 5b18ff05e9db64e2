"""Sharded training math equals single-device math, and parameters really are sharded.

Each family (GPT, BERT with its MLM head, T5 v1.1) computes a padded mean token
cross-entropy and its parameter gradients twice: (a) plain `jit` on one device, and
(b) on a (data=2, fsdp=2, tensor=2) mesh of the 8 fake CPU devices from conftest, with
the SAME weights placed by `llmjax.sharding.logical_sharding`, a batch split over
("data", "fsdp"), and activation constraints active (`jax.set_mesh` + `RULES`).
Losses and every gradient leaf must agree; parameter and gradient shardings are checked.

Speed (2 CPU cores): unrolled models use one layer (sharding does not depend on depth),
and weights are drawn with numpy from `eval_shape` shapes instead of compiling `init`;
the scanned GPT (two layers) covers `init` compiled straight into sharded parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax import layers
from llmjax import sharding as sh
from llmjax.models import Bert, BertConfig, GPT, GPTConfig, T5, T5Config

B, T, S = 8, 16, 12  # batch (divisible by data*fsdp = 4), decoder/GPT length, T5 encoder length
ATOL = RTOL = 1e-5

# --------------------------------------------------------------------------- helpers


def _segments(key, batch: int, length: int) -> jax.Array:
  """Segment ids [batch, length]: 1 for real tokens, trailing 0s for padding (row 0 is full)."""
  lengths = jax.random.randint(key, (batch,), length // 2, length + 1).at[0].set(length)
  return (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.int32)


def _xent(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> jax.Array:
  """Mean token cross-entropy over the positions with non-zero weight."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  weights_BT = weights_BT.astype(jnp.float32)
  return jnp.sum(nll_BT * weights_BT) / jnp.maximum(jnp.sum(weights_BT), 1.0)


@dataclasses.dataclass
class Family:
  """A model, its inputs, and how to turn (params, batch) into logits."""

  model: nn.Module
  batch: dict[str, jax.Array]  # model inputs plus "targets" and "weights"
  init_args: tuple[jax.Array, ...]
  logits: Callable[[nn.Module, Any, dict[str, jax.Array]], jax.Array]
  # path in params -> expected PartitionSpec on the (2, 2, 2) mesh
  expected_specs: dict[tuple[str, ...], P]
  embedding: tuple[str, ...]  # path of the [V, D] token table


def _gpt(scan_layers: bool = False) -> Family:
  cfg = GPTConfig.from_size("tiny", dropout_rate=0.0, scan_layers=scan_layers,
                            num_layers=2 if scan_layers else 1)
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  seg = _segments(k1, B, T)
  batch = dict(tokens=jax.random.randint(k2, (B, T), 0, cfg.vocab_size) * seg,
               segment_ids=seg, targets=jax.random.randint(k3, (B, T), 0, cfg.vocab_size),
               weights=seg)
  logits = lambda m, p, b: m.apply({"params": p}, b["tokens"], b["segment_ids"])
  layer = ("layers",) if scan_layers else ("layers_0",)
  lead = (None,) if scan_layers else ()  # the stacked "layers" axis stays unsharded
  specs = {
      ("wte", "embedding"): P("tensor", "fsdp"),
      ("wpe", "embedding"): P(None, "fsdp"),
      ("ln_f", "scale"): P("fsdp"),
      layer + ("attn", "query_kernel"): P(*lead, "fsdp", "tensor", None),
      layer + ("attn", "query_bias"): P(*lead, "tensor", None),
      layer + ("attn", "key_kernel"): P(*lead, "fsdp", "tensor", None),
      layer + ("attn", "out_kernel"): P(*lead, "tensor", None, "fsdp"),
      layer + ("attn", "out_bias"): P(*lead, "fsdp"),
      layer + ("mlp", "wi", "kernel"): P(*lead, "fsdp", "tensor"),
      layer + ("mlp", "wi", "bias"): P(*lead, "tensor"),
      layer + ("mlp", "wo", "kernel"): P(*lead, "tensor", "fsdp"),
      layer + ("ln_1", "scale"): P(*lead, "fsdp"),
  }
  return Family(GPT(cfg), batch, (batch["tokens"],), logits, specs, ("wte", "embedding"))


def _bert() -> Family:
  cfg = BertConfig.from_size("tiny", dropout_rate=0.0, head="mlm", num_layers=1)
  k1, k2, k3, k4 = jax.random.split(jax.random.key(2), 4)
  seg = _segments(k1, B, T)
  types = jnp.broadcast_to((jnp.arange(T) >= T // 2).astype(jnp.int32), (B, T)) * seg
  masked = jax.random.bernoulli(k4, 0.5, (B, T)).astype(jnp.int32).at[:, 0].set(1)
  batch = dict(tokens=jax.random.randint(k2, (B, T), 0, cfg.vocab_size) * seg,
               segment_ids=seg, token_types=types,
               targets=jax.random.randint(k3, (B, T), 0, cfg.vocab_size),
               weights=seg * masked)  # MLM-style: only some real positions carry loss
  logits = lambda m, p, b: m.apply({"params": p}, b["tokens"], b["segment_ids"],
                                   b["token_types"])
  layer = ("encoder", "layers_0")
  specs = {
      ("token_embed", "embedding"): P("tensor", "fsdp"),
      ("position_embed", "embedding"): P(None, "fsdp"),
      ("type_embed", "embedding"): P(None, "fsdp"),
      ("mlm_bias",): P("tensor"),
      ("mlm_dense", "kernel"): P("fsdp", None),  # output unsplit: see models/bert.py
      ("mlm_dense", "bias"): P(None),
      layer + ("attn", "query_kernel"): P("fsdp", "tensor", None),
      layer + ("attn", "value_kernel"): P("fsdp", "tensor", None),
      layer + ("mlp", "wi", "kernel"): P("fsdp", "tensor"),
      layer + ("mlp", "wo", "kernel"): P("tensor", "fsdp"),
      layer + ("mlp_ln", "bias"): P("fsdp"),
  }
  return Family(Bert(cfg), batch, (batch["tokens"],), logits, specs, ("token_embed", "embedding"))


def _t5() -> Family:
  cfg = T5Config.from_size("v1_1-tiny", dropout_rate=0.0, num_layers=1)
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(3), 5)
  enc_seg, dec_seg = _segments(k1, B, S), _segments(k2, B, T)
  batch = dict(enc_tokens=jax.random.randint(k3, (B, S), 0, cfg.vocab_size) * enc_seg,
               dec_tokens=jax.random.randint(k4, (B, T), 0, cfg.vocab_size) * dec_seg,
               enc_seg=enc_seg, dec_seg=dec_seg,
               targets=jax.random.randint(k5, (B, T), 0, cfg.vocab_size), weights=dec_seg)
  logits = lambda m, p, b: m.apply({"params": p}, b["enc_tokens"], b["dec_tokens"],
                                   b["enc_seg"], b["dec_seg"])
  dec = ("decoder", "layers_0")
  specs = {
      ("token_embed", "embedding"): P("tensor", "fsdp"),
      ("lm_head",): P("fsdp", "tensor"),
      ("encoder", "relpos_bias", "embedding"): P(None, "tensor"),
      ("encoder", "layers_0", "self_attn", "query_kernel"): P("fsdp", "tensor", None),
      dec + ("cross_attn", "value_kernel"): P("fsdp", "tensor", None),
      dec + ("cross_attn", "out_kernel"): P("tensor", None, "fsdp"),
      dec + ("mlp", "wi_0", "kernel"): P("fsdp", "tensor"),
      dec + ("mlp", "wi_1", "kernel"): P("fsdp", "tensor"),
      dec + ("mlp", "wo", "kernel"): P("tensor", "fsdp"),
      ("decoder", "final_norm", "scale"): P("fsdp"),
  }
  return Family(T5(cfg), batch, (batch["enc_tokens"], batch["dec_tokens"]), logits, specs,
                ("token_embed", "embedding"))


def _loss_and_grad(fam: Family):
  def loss(params, batch):
    return _xent(fam.logits(fam.model, params, batch), batch["targets"], batch["weights"])
  return jax.value_and_grad(loss)


def _random_weights(abstract_params, seed: int = 0):
  """Unboxed float32 weights for an `eval_shape(init)` tree, without compiling `init`."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    if getattr(path[-1], "key", None) == "scale":  # norm scales around 1
      return jnp.asarray(1.0 + 0.1 * x)
    return jnp.asarray(0.1 * x)

  return jax.tree_util.tree_map_with_path(one, nn.meta.unbox(abstract_params))


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _mismatches(actual, expected) -> list[str]:
  """Leaves of two same-structured trees that differ by more than ATOL + RTOL * |expected|."""
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
  assert tree_a == tree_e
  bad = []
  for (path, a), (_, e) in zip(flat_a, flat_e):
    a, e = np.asarray(a), np.asarray(e)
    if not np.allclose(a, e, rtol=RTOL, atol=ATOL):
      bad.append(f"{jax.tree_util.keystr(path)}: max |diff| {np.abs(a - e).max():.2e}, "
                 f"max |expected| {np.abs(e).max():.2e}")
  return bad


_SINGLE = {}


def _check_sharded_matches_single(fam: Family, mesh, params, shardings):
  """Runs (a) and (b), checks layouts and returns the gradient mismatches (b) vs (a)."""
  # (a) one device, no mesh, no rules (shared by tests of the same config and weights).
  key = (fam.model.cfg, tuple(np.asarray(x).tobytes() for x in jax.tree.leaves(params)))
  if key not in _SINGLE:
    _SINGLE[key] = jax.jit(_loss_and_grad(fam))(params, fam.batch)
  loss_a, grads_a = _SINGLE[key]
  assert np.isfinite(float(loss_a)) and float(loss_a) > 0.0
  # Gradients are not ~zero (the comparison would then be vacuous), except the key biases':
  # softmax ignores a shift shared by all keys of a query.
  tiny = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads_a)
          if float(jnp.abs(g).max()) < 100 * ATOL]
  assert all("key_bias" in p for p in tiny), tiny

  # (b) the same weights on the (data=2, fsdp=2, tensor=2) mesh.
  params_b = jax.device_put(params, shardings)
  batch_shardings = jax.tree.map(lambda _: NamedSharding(mesh, P(("data", "fsdp"))), fam.batch)
  batch_b = jax.device_put(fam.batch, batch_shardings)
  sharded = jax.jit(_loss_and_grad(fam), in_shardings=(shardings, batch_shardings),
                    out_shardings=(NamedSharding(mesh, P()), shardings))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sh.RULES):
    lowered = sharded.lower(params_b, batch_b)
    loss_b, grads_b = lowered.compile()(params_b, batch_b)
  # The activation constraints really were emitted (they are no-ops outside mesh + rules).
  text = lowered.as_text()
  assert text.count("sharding_constraint") + text.count("@Sharding") > 0

  # Parameters and gradients really are sharded as the rules say.
  for path, spec in fam.expected_specs.items():
    assert _get(params_b, path).sharding.spec == spec, (path, _get(params_b, path).sharding.spec)
    assert _get(grads_b, path).sharding.spec == spec, path
  table = _get(params_b, fam.embedding)
  assert table.addressable_shards[0].data.shape == (table.shape[0] // 2, table.shape[1] // 2)
  assert len(table.sharding.device_set) == 8
  leaves = jax.tree_util.tree_leaves_with_path(params_b)
  replicated = [jax.tree_util.keystr(p) for p, x in leaves if x.sharding.is_fully_replicated]
  assert not [p for p, x in leaves if x.size >= 1024 and x.sharding.is_fully_replicated]
  assert len(replicated) <= len(leaves) // 4, replicated
  for (path, g), (_, x) in zip(jax.tree_util.tree_leaves_with_path(grads_b), leaves):
    assert g.sharding.is_equivalent_to(x.sharding, x.ndim), jax.tree_util.keystr(path)
  assert loss_b.sharding.is_fully_replicated

  np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=RTOL, atol=ATOL)
  return _mismatches(grads_b, grads_a)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"
  return sh.make_mesh((2, 2, 2))


# --------------------------------------------------------------------------- sharded == single


@pytest.mark.parametrize("make", [_gpt, _bert, _t5], ids=["gpt", "bert", "t5"])
def test_sharded_loss_and_grads_match_single_device(make, mesh):
  fam = make()
  abstract = jax.eval_shape(fam.model.init, jax.random.key(0), *fam.init_args)["params"]
  shardings = sh.logical_sharding(abstract, mesh)
  params = _random_weights(abstract)
  assert jax.tree.structure(shardings) == jax.tree.structure(params)
  bad = _check_sharded_matches_single(fam, mesh, params, shardings)
  assert not bad, "\n".join(bad)


def test_scanned_gpt_init_into_shardings_and_grads_match(mesh):
  """scan_layers: init compiled with out_shardings equals plain init; grads match (a)."""
  fam = _gpt(scan_layers=True)
  rng = jax.random.key(0)
  abstract = jax.eval_shape(fam.model.init, rng, *fam.init_args)["params"]
  shardings = sh.logical_sharding(abstract, mesh)
  init = jax.jit(lambda r: nn.meta.unbox(fam.model.init(r, *fam.init_args)["params"]),
                 out_shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sh.RULES):
    params_b = init(rng)
  params = nn.meta.unbox(jax.jit(fam.model.init)(rng, *fam.init_args)["params"])
  bad = _mismatches(params_b, params)  # the same weights whatever the layout
  assert not bad, "\n".join(bad)
  kernel = params_b["layers"]["attn"]["query_kernel"]  # [L, D, H, K]
  assert kernel.shape == (2, 64, 4, 16)
  assert kernel.sharding.spec == P(None, "fsdp", "tensor", None)
  assert kernel.addressable_shards[0].data.shape == (2, 32, 2, 16)
  assert all(s.spec[0] is None for s in jax.tree.leaves(shardings["layers"]))
  # Gradients at larger weights than init's (where attention is near uniform and the
  # query/key gradients are too small for a 1e-5 comparison to mean much).
  bad = _check_sharded_matches_single(fam, mesh, _random_weights(abstract), shardings)
  assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- make_mesh


def test_make_mesh_fills_in_minus_one():
  mesh = sh.make_mesh((-1, 1, 1))
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert mesh.axis_names == sh.MESH_AXES
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sh.make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sh.make_mesh((1, 1, -1)).shape) == {"data": 1, "fsdp": 1, "tensor": 8}
  assert dict(sh.make_mesh((2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sh.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_make_mesh_on_a_subset_of_devices():
  mesh = sh.make_mesh((2, -1, 1), devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1}
  assert set(mesh.devices.flat) == set(jax.devices()[:4])


@pytest.mark.parametrize("shape, match", [
    ((3, 1, 1), r"needs 3 devices, but 8"),
    ((4, 4, 1), r"needs 16 devices, but 8"),
    ((-1, -1, 2), r"at most one -1"),
    ((3, -1, 1), r"does not divide 8 devices"),
    ((0, -1, 1), r"does not divide 8 devices"),
    ((8, 1), r"has 2 axes but axis_names"),
    ((2, 2, 2, 1), r"has 4 axes but axis_names"),
    ((-2, -4, 1), r"needs"),
    ((8, 1, 0), r"needs"),
])
def test_make_mesh_rejects_bad_shapes(shape, match):
  with pytest.raises(ValueError, match=match):
    sh.make_mesh(shape)


# --------------------------------------------------------------------------- logical_sharding


class _Odd(nn.Module):
  """Parameters whose sizes some mesh axes don't divide."""

  @nn.compact
  def __call__(self, ids):
    x = layers.Embed(301, 64, name="embed")(ids)  # vocab 301: tensor=2 can't split it
    odd = self.param("odd_embed", nn.with_logical_partitioning(nn.initializers.ones,
                                                               (sh.VOCAB, sh.EMBED)), (8, 63))
    mk = lambda name, shape: self.param(
        name, nn.with_logical_partitioning(nn.initializers.ones, (sh.BATCH, sh.LENGTH)), shape)
    plain = self.param("plain", nn.initializers.zeros, (5,))  # no logical names
    return (x.sum() + odd.sum() + plain.sum() + mk("six", (6, 3)).sum()
            + mk("eight", (8, 3)).sum() + mk("three", (3, 3)).sum())


def test_logical_sharding_drops_axes_that_do_not_divide(mesh):
  abstract = jax.eval_shape(_Odd().init, jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
  shardings = sh.logical_sharding(abstract["params"], mesh)
  specs = jax.tree.map(lambda s: s.spec, shardings)
  assert specs == {
      "embed": {"embedding": P(None, "fsdp")},  # 301 % 2: vocab unsplit, embed still on fsdp
      "odd_embed": P("tensor", None),  # 63 % 2: embed loses fsdp, vocab keeps tensor
      "plain": P(None),  # no logical names: replicated
      "six": P("data", None),  # batch -> (data, fsdp): 6 % 2 == 0 but 6 % 4 != 0
      "eight": P(("data", "fsdp"), None),
      "three": P(None, None),
  }
  assert all(s.mesh is mesh or s.mesh == mesh for s in jax.tree.leaves(shardings))

  params = _random_weights(abstract["params"])
  placed = jax.device_put(params, shardings)
  table = placed["embed"]["embedding"]
  assert table.sharding.spec == P(None, "fsdp")
  assert table.addressable_shards[0].data.shape == (301, 32)
  np.testing.assert_array_equal(np.asarray(table), np.asarray(params["embed"]["embedding"]))
  assert placed["odd_embed"].addressable_shards[0].data.shape == (4, 63)
  assert placed["six"].addressable_shards[0].data.shape == (3, 3)
  assert placed["eight"].addressable_shards[0].data.shape == (2, 3)
  assert placed["plain"].sharding.is_fully_replicated
  # And the layout is usable by a jitted computation.
  total = jax.jit(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p)))(placed)
  np.testing.assert_allclose(float(total), sum(float(np.sum(x)) for x in
                                               jax.tree.leaves(params)), rtol=1e-5)


def test_activations_keep_d_whole_even_when_batch_gives_up_fsdp():
  rules = [(name, ("data",) if name == sh.BATCH else axes) for name, axes in sh.RULES]
  assert nn.logical_to_mesh_axes((sh.BATCH, sh.LENGTH, sh.ACT_EMBED), rules) == P("data", None, None)
  assert nn.logical_to_mesh_axes((sh.EMBED, sh.MLP), rules) == P("fsdp", "tensor")
