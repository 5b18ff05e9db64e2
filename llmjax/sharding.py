"""Logical axis names, the one table that maps them to mesh axes, and mesh helpers.

Layers name their parameters' and activations' dimensions with the logical names below, never
mesh axes; `RULES` maps them, in order, to a (data, fsdp, tensor) mesh, each mesh axis to at most
one dimension of an array. The model width is `embed` in parameters, `act_embed` in activations,
so FSDP splits a parameter's D while an activation [B, T, D] keeps D whole (split by batch)."""

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names, declared once.
BATCH = "batch"  # examples in a batch
LENGTH = "length"  # sequence positions (activations only)
EMBED = "embed"  # model width D of parameters
ACT_EMBED = "act_embed"  # model width D of activations: kept whole by default
HEADS = "heads"  # query heads H
KV_HEADS = "kv_heads"  # key/value heads G
HEAD_DIM = "kv"  # per-head width K
MLP = "mlp"  # feed-forward width F
VOCAB = "vocab"  # vocabulary V
LAYERS = "layers"  # the stacked layer axis of scanned parameters
POSITIONS = "positions"  # learned position table rows
BUCKETS = "buckets"  # relative-position buckets
TOKEN_TYPES = "token_types"  # BERT token-type table rows

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

RULES: Rules = (
    (BATCH, ("data", "fsdp")), (EMBED, "fsdp"),
    (HEADS, "tensor"), (KV_HEADS, "tensor"), (MLP, "tensor"), (VOCAB, "tensor"),
    (LENGTH, None), (ACT_EMBED, None), (HEAD_DIM, None), (LAYERS, None), (POSITIONS, None),
    (BUCKETS, None), (TOKEN_TYPES, None))


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with Auto axes over `devices` (default: all); one -1 in `shape` takes the rest."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {tuple(shape)} has {len(shape)} axes but axis_names "
                     f"{tuple(axis_names)} has {len(axis_names)}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)} may hold at most one -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or len(devices) % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices) or min(shape) < 1:
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                     f"but {len(devices)} are given")
  return jax.make_mesh(tuple(shape), tuple(axis_names), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def fit_spec(spec: P, shape: Sequence[int], mesh) -> P:
  """Drops mesh axes from dimensions they don't divide evenly (e.g. GPT-2's 50257 vocab)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = []
    for name in names:
      if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[name]) == 0:
        kept.append(name)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


def logical_sharding(boxed_tree, mesh: Mesh, rules: Rules = RULES):
  """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (e.g. from `eval_shape(init)`);
  leaves without logical names are replicated, and `fit_spec` drops axes a dimension won't take."""
  specs = nn.get_partition_spec(boxed_tree)
  shapes = nn.meta.unbox(boxed_tree)

  def one(spec, leaf):
    spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec is not None else P()
    return NamedSharding(mesh, fit_spec(spec, np.shape(leaf), mesh))

  return jax.tree.map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def mesh_of(tree) -> Mesh | None:
  """The mesh a tree's arrays are placed on, if they are split over more than one device."""
  shardings = (getattr(leaf, "sharding", None) for leaf in jax.tree.leaves(tree))
  return next((s.mesh for s in shardings if isinstance(s, NamedSharding) and s.mesh.size > 1),
              None)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Activation sharding hint by logical names; a no-op outside a mesh and rules context."""
  return nn.with_logical_constraint(x, tuple(axes))
