"""Post-training quantization through qwix: int8 and int4 weight-only, int8 weights and
activations (w8a8), and nf4 (QLoRA's frozen base, see peft).

    qmodel, qparams = quant.quantize(model, params, "int8")
    logits = qmodel.apply({"params": qparams}, tokens)        # the float model's signature

qwix intercepts jax.lax.dot_general and jnp.einsum inside the model's methods (and, here,
jnp.take: the embedding lookup); `Provider` chooses each weight's rule by its path, the module
path plus the parameter's name less "kernel" (`projection`): "layers_0/attn/query",
"layers_3/mlp/wi", "wte/embedding" (the token table, and the tied head that reads it), "head".
`targets`, a regex fully matching such paths, says which weights quantize: by default the
attention projections and the MLPs; embeddings and the output head stay float unless it names
them (".*": every weight a product or a lookup reads). Norms and biases, T5's relative-bias
table and the attention's score and mixing products (no weight, so no rule; float in w8a8
too) always stay float.

A quantized weight is qwix's WithAux(QArray(qvalue, scale), how) in the parameter tree:
symmetric absmax scales, int8 per output channel (absmax / 127.5); int4 and nf4 per output
channel and block of contracted values. qwix tiles the last contracted dimension only, so a
block is `tile_size` of it times the other contracted dimensions (an attention output's
[H, K, D] kernel: every head at once). By default the tile is the largest power of two that
divides that dimension with blocks of at most 128 values; an explicit tile must divide it, or
spans it whole where it is shorter. A table's scales are per row (and tile). w8a8 also
quantizes each op's input per token, dynamically (qwix's XLA default). qwix computes a
product's numerics; this module only chooses and places them.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import linen as nn
from flax import traverse_util
from qwix._src.core import qarray
from qwix._src.providers import ptq
from qwix._src.utils import flax_util

from llmjax import models
from llmjax import sharding as sh

QTYPES = {"int8": (jnp.int8, None), "int4": (jnp.int4, None), "w8a8": (jnp.int8, jnp.int8),
          "nf4": ("nf4", None)}  # name: (weights' type, activations' type)
TILED = ("int4", "nf4")
DEFAULT_TARGETS = r".*(attn|mlp)/\w+"  # the attention projections and the MLPs
TILE = 128
METHODS = ("__call__", "hidden", "pooled", "encode", "decoder_logits")  # the models' entry points
WithAux, QArray = ptq.WithAux, qwix.QArray


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """What to quantize: `qtype` (a key of QTYPES), `targets` (a regex over weight paths; None:
  DEFAULT_TARGETS), `tile_size` (int4 / nf4 only; None: the default tiling)."""
  qtype: str = "int8"
  targets: str | None = None
  tile_size: int | None = None

  def __post_init__(self):
    if self.qtype not in QTYPES:
      raise ValueError(f"unknown qtype {self.qtype!r}; expected one of {', '.join(QTYPES)}")
    try:
      re.compile(self.targets or "")
    except re.error as e:
      raise ValueError(f"quantization targets {self.targets!r} is not a regex: {e}") from None
    if self.tile_size is not None and (self.qtype not in TILED or not (
        isinstance(self.tile_size, int) and self.tile_size > 0)):
      raise ValueError(f"tile_size={self.tile_size!r}: expected an int > 0 with qtype int4 or "
                       f"nf4, not {self.qtype}")

  @property
  def pattern(self) -> str:
    return self.targets or DEFAULT_TARGETS

  def tile(self, path: str, n: int, rest: int = 1) -> int | None:
    """The tile along the last contracted dimension, of size `n`, `rest` values contracted
    beside each of its entries (None: per channel)."""
    if self.qtype not in TILED:
      return None
    most = 1 << (max(TILE // rest, 1).bit_length() - 1)  # a power of two: blocks <= TILE values
    tile = math.gcd(most, n) if self.tile_size is None else min(self.tile_size, n)
    if n % tile:
      raise ValueError(f"tile_size={self.tile_size} does not divide {path}'s contracted "
                       f"dimension of {n}")
    return tile

  def rule(self, path: str, n: int, rest: int = 1) -> qwix.QuantizationRule:
    weight, act = QTYPES[self.qtype]
    return qwix.QuantizationRule(weight_qtype=weight, act_qtype=act,
                                 tile_size=self.tile(path, n, rest))


def projection(name: str) -> str:
  """The path of the weight at parameter path `name`: its "kernel" suffix dropped."""
  return name.removesuffix("/kernel").removesuffix("_kernel")


class Provider(qwix.PtqProvider):
  """qwix's PTQ with each weight's rule chosen by its path: `rule(path, n, rest)` (n: the size
  of the last dimension the weight contracts, rest: of the others) returns a qwix rule or None.
  A projection may also add `adapter(...)` to its output (peft's LoRA)."""

  def __init__(self, quant: QuantConfig | None):
    super().__init__([])  # qwix's own rules, by module path, are unused: `rule` chooses
    self.quant, self._rule, self.matched = quant, None, set()

  def rule(self, path: str, n: int, rest: int = 1):
    if self.quant is None or not re.fullmatch(self.quant.pattern, path):
      return None
    self.matched.add(path)
    return self._init_rule(self.quant.rule(path, n, rest))

  def adapter(self, path, name, lhs, rhs, dimension_numbers, precision):  # pylint: disable=unused-argument
    """A term added to the projection at `path` (its parameter `name`), or None."""
    return None

  def _weight(self, x):
    """(x's path, its parameter name) if x is a parameter of the current module, else (None,
    None). qwix's find_param tells quantized weights apart by shape only, and attention holds
    three of one shape: a quantized one is found here by its values' identity. A float one is
    never one an earlier op of this init quantized: init runs every op float."""
    module = flax_util.get_current_module()
    if isinstance(x, WithAux):
      params = module.scope._collection("params").items()  # pylint: disable=protected-access
      name = next((k for k, boxed in params if isinstance(v := flax_util.unbox(boxed), WithAux)
                   and v.array.qvalue is x.array.qvalue), None)
    else:
      name = flax_util.find_param(x)
    return (None, None) if name is None else (
        projection("/".join(map(str, module.path + (name,)))), name)

  def _chosen(self, rhs, contracted):
    """(path, name) of weight `rhs` (contracted: its contracted axes), setting its op's rule. A
    float weight meets a quantized model outside init only where quantization did not cover it
    (a method init does not run): it stays float."""
    path, name = self._weight(rhs)
    n, rest = rhs.shape[contracted[-1]], math.prod(rhs.shape[a] for a in contracted[:-1])
    if path is not None and (isinstance(rhs, WithAux)
                             or flax_util.get_current_module().is_initializing()):
      self._rule = self.rule(path, n, rest)
    elif isinstance(rhs, WithAux):  # quantized, though not traced back to its name
      self._rule = self._init_rule(self.quant.rule("", n, rest))
    return path, name

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                  **kwargs):
    path = None
    if dimension_numbers[0][1]:
      path, name = self._chosen(rhs, dimension_numbers[0][1])
    try:
      out = super().dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                                **kwargs)
    finally:
      self._rule = None
    extra = None if path is None else self.adapter(path, name, lhs, rhs, dimension_numbers,
                                                   precision)
    return out if extra is None else out + extra

  def einsum(self, einsum_str, *operands, **kwargs):
    if len(operands) == 2 and "->" in einsum_str and "." not in einsum_str:
      ins, out = einsum_str.replace(" ", "").split("->")
      lhs_s, rhs_s = ins.split(",")
      contracted = [i for i, c in enumerate(rhs_s) if c in lhs_s and c not in out]
      if contracted:
        self._chosen(operands[1], contracted)
    try:
      return super().einsum(einsum_str, *operands, **kwargs)
    finally:
      self._rule = None

  def take(self, a, indices, axis=None, **kwargs):
    """An embedding table's rows: gathered from a quantized table, then dequantized."""
    if isinstance(a, WithAux) and axis == 0:
      return qwix.dequantize(a.array[indices])
    path, name = self._weight(a) if axis == 0 and a.ndim == 2 else (None, None)
    rule = (path and path.endswith("embedding") and flax_util.get_current_module().is_initializing()
            and self.rule(path, a.shape[1]))
    if not rule:
      return jnp.take(a, indices, axis=axis, **kwargs)
    how = qarray.HowToQuantize(qtype=rule.weight_qtype, channelwise_axes=(0,),  # init: per row
                               tiled_axes={1: rule.tile_size} if rule.tile_size else {})
    return qwix.dequantize(ptq.create_quantized_param(name, a, how).array[indices])

  def get_intercept_map(self):
    return super().get_intercept_map() | {"jax.numpy.take": self.take}

  def _get_current_rule_and_op_id(self, op_name, **kwargs):  # qwix's hook for the rule in force
    _, op_id = super()._get_current_rule_and_op_id(op_name, **kwargs)
    return (self._rule if op_name in ("dot_general", "einsum") else None), op_id


def intercept(model: nn.Module, provider: Provider) -> nn.Module:
  """`model` with `provider` intercepting every entry point (a class of its own)."""
  base = getattr(type(model), "_unquantized_type", type(model))
  methods = [m for m in METHODS if hasattr(base, m)]
  wrapped = qwix.quantize_model(model, provider, methods=methods)
  type(wrapped).provider = provider
  return wrapped


def wrap(model: nn.Module, cfg: QuantConfig) -> nn.Module:
  """The quantized form of `model` (same apply signature), for parameters that `quantize`
  (or a quantized checkpoint) gives."""
  wrapped = intercept(model, Provider(cfg))
  type(wrapped).quant = cfg
  return wrapped


def example_inputs(model: nn.Module) -> tuple:
  """Token inputs that run every weight of `model` (init's)."""
  tokens = jnp.ones((1, min(8, getattr(model.cfg, "max_seq_len", 8))), jnp.int32)
  return (tokens, tokens) if isinstance(model, models.T5) else (tokens,)


def abstract(qmodel: nn.Module):
  """The parameter tree of `qmodel` without values: boxed ShapeDtypeStructs (logical axis
  names), quantized weights as WithAux(QArray) of them."""
  return jax.eval_shape(lambda: qmodel.init(jax.random.key(0), *example_inputs(qmodel)))["params"]


def is_quantized(params) -> bool:
  return any(isinstance(x, WithAux) for x in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, WithAux)))


def _leaves(params) -> dict:
  """{path: leaf} of a parameter tree, unboxed; a quantized weight (WithAux) is one leaf."""
  return traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")


def quantize(model: nn.Module, params, qtype: str = "int8", *, targets: str | None = None,
             tile_size: int | None = None) -> tuple[nn.Module, dict]:
  """(the quantized model, its parameters): the weights `targets` matches quantized to `qtype`,
  the rest as given. Sharded parameters stay sharded by the same logical axes."""
  cfg = QuantConfig(qtype, targets, tile_size)
  if is_quantized(params):
    raise ValueError("these parameters are already quantized: quantize the float checkpoint")
  _check_plain(model, "quantize")
  qmodel = wrap(model, cfg)
  shapes = abstract(qmodel)
  wanted = _leaves(shapes)
  chosen = sorted(k for k, v in wanted.items() if isinstance(v, WithAux))
  if not chosen:
    names = sorted({re.sub(r"_\d+/", "_N/", projection(k)) for k in wanted
                    if k.endswith(("kernel", "embedding", "head"))})
    raise ValueError(f"quantization targets {cfg.pattern!r} match no weight; the model's are "
                     f"{', '.join(names)}")
  return qmodel, fill(params, shapes)


def _check_plain(model: nn.Module, what: str) -> None:
  if getattr(model, "lora", None) is not None:
    raise ValueError(f"{what}: the model carries LoRA adapters, which this would drop; fold them "
                     f"in first with peft.merge(model, params)")


def fill(params, shapes) -> dict:
  """`params` with each weight that `shapes` (a quantized model's parameter tree: boxed, as
  `abstract` gives it, or ShapeDtypeStructs with shardings) holds quantized, quantized as it
  says and placed as its shardings say, or else, for `params` on a mesh, by the weights' logical
  axes there. The others, and parameters `shapes` lacks, are kept as they are."""
  flat, boxed = _leaves(params), traverse_util.flatten_dict(shapes, sep="/")
  chosen = [k for k, v in boxed.items() if isinstance(v, WithAux)]
  missing = sorted(set(chosen) - set(flat))
  if missing:
    raise ValueError(f"params lack {len(missing)} weights of this model: {missing[:4]}")
  boxed = {k: boxed[k] for k in chosen}
  spec, out = nn.meta.unbox(boxed), None
  if all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding for x in jax.tree.leaves(spec)):
    out = jax.tree.map(lambda x: x.sharding, spec)
  elif mesh := sh.mesh_of(params):
    out = sh.logical_sharding(boxed, mesh)
  done = jax.jit(lambda p: {k: _quantized(p[k], spec[k]) for k in chosen}, out_shardings=out)(
      {k: jnp.asarray(flat[k]) for k in chosen})
  return traverse_util.unflatten_dict({**flat, **done}, sep="/")


def float_view(shapes):
  """`shapes` with each quantized weight as the float one it stands for (shape, dtype and
  placement): what a float checkpoint holds for it."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.array.qvalue.shape, x.array.scale.dtype, sharding=getattr(x.array.qvalue, "sharding", None))
                      if isinstance(x, WithAux) else x, shapes,
                      is_leaf=lambda x: isinstance(x, WithAux))


def _quantized(w, spec: WithAux) -> WithAux:
  """`w` quantized as `spec` says, from the dtype the model computes in (its scales', which a
  bfloat16 model with float32 parameters quantizes at); a scanned stack of layers layer by
  layer (its `how` describes one layer: the scales it gives `w` whole are not the stack's)."""
  one = lambda x: qarray.quantize(x.astype(spec.array.scale.dtype), spec.how)
  try:
    stacked = tuple(qarray.get_scale_shape(w.shape, spec.how)) != tuple(spec.array.scale.shape)
  except ValueError:  # a tile that fits one layer's dimension, not the stack's
    stacked = True
  return WithAux((jax.vmap(one) if stacked else one)(w), spec.how)


def dequantize(qmodel: nn.Module, qparams) -> tuple[nn.Module, dict]:
  """(the float model, its parameters with each quantized weight dequantized); a QLoRA model's
  adapters fold in with peft.merge."""
  _check_plain(qmodel, "dequantize")
  return base_model(qmodel), dequantized(qparams)


def dequantized(params) -> dict:
  """`params` with each quantized weight as the float array it stands for."""
  return jax.tree.map(lambda x: qwix.dequantize(x.array) if isinstance(x, WithAux) else x,
                      nn.meta.unbox(params), is_leaf=lambda x: isinstance(x, WithAux))


def base_model(model: nn.Module) -> nn.Module:
  """The plain model under an intercepted one (quantized or LoRA), or `model` itself."""
  cls = getattr(type(model), "_unquantized_type", None)
  return model if cls is None else cls(model.cfg)


def nbytes(params) -> int:
  """Parameter bytes as stored: quantized values at their type's bits (int4: half a byte),
  scales and float leaves at their dtype's size."""
  size = lambda x: int(np.prod(x.shape)) * x.dtype.itemsize
  total = 0
  for leaf in _leaves(params).values():
    if isinstance(leaf, WithAux):
      q = leaf.array
      bits = 4 if q.qvalue.dtype in (jnp.int4, jnp.uint4) else 8  # int4; nf4's indices
      total += math.ceil(np.prod(q.qvalue.shape) * bits / 8)
      total += sum(size(x) for x in (q.scale, q.zero_point) if x is not None)
    else:
      total += size(leaf)
  return total


def to_arrays(qparams) -> dict:
  """A checkpoint's form of quantized parameters: each WithAux as {"qvalue", "scale"}."""
  flat = {}
  for k, v in _leaves(qparams).items():
    if isinstance(v, WithAux):
      flat[k + "/qvalue"], flat[k + "/scale"] = v.array.qvalue, v.array.scale
    else:
      flat[k] = v
  return traverse_util.unflatten_dict(flat, sep="/")


def from_arrays(arrays, shapes) -> dict:
  """`to_arrays`'s inverse, given the quantized model's `abstract` tree."""
  flat, out = traverse_util.flatten_dict(arrays, sep="/"), {}
  wanted = _leaves(shapes)
  stored = lambda k, v: (k + "/qvalue" if isinstance(v, WithAux) else k) in flat
  missing = sorted(k for k, v in wanted.items() if not stored(k, v))
  if missing:
    raise ValueError(f"the stored parameters lack {len(missing)} of this quantized model's: "
                     f"{missing[:4]} (quantized with other targets?)")
  for k, v in wanted.items():
    if isinstance(v, WithAux):
      out[k] = WithAux(QArray(flat[k + "/qvalue"], flat[k + "/scale"], qtype=v.array.qtype), v.how)
    else:
      out[k] = flat[k]
  return traverse_util.unflatten_dict(out, sep="/")
