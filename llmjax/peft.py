"""LoRA through qwix: low-rank adapters on a frozen base, folded in by `merge`, PEFT's files.

`wrap(model, LoraConfig(...))` returns the model with qwix's LoRA on every projection whose
path matches `targets`: y = x W + (alpha / r) * dropout(x) A B, A [in, r] uniform in
±1/sqrt(in) and B [r, out] zero at init (PEFT's), so a new adapter leaves the logits exactly
the base model's. A projection's path is its module path plus the kernel's name without
"_kernel": "encoder/layers_0/attn/query", "layers_3/mlp/wi" ("layers/..." under scan_layers).
qwix hooks `jax.lax.dot_general` inside linen modules: the adapters are parameters
`<kernel>_lora_a` [.., in, r] and `<kernel>_lora_b` [.., r, out] beside each kernel, sharded
by its logical axes; `trainable(model)` says which leaves train (adapters and the
`train` regex: PEFT's modules_to_save, by default a classification head). QLoRA:
`LoraConfig(quantize="nf4")` (or int8, int4) runs the frozen base's projections quantized
(llmjax.quant): `add_adapters` quantizes given float parameters, the trainer quantizes
`init_from`'s as they load, and `merge` folds the adapters into the dequantized weights.

PEFT interop maps projection paths to transformers' module names (`_HF_NAMES`):
`save_adapter` writes adapter_config.json + adapter_model.safetensors with PEFT's keys and
layouts (lora_A.weight [r, in], lora_B.weight [out, r]), `load_adapter` reads them. GPT-2 fuses
q, k, v into one c_attn with one A: an import gives our three projections that A; an export
writes c_attn at rank 3r (A stacked, B block-diagonal, alpha tripled), the same function.
"""

import contextlib
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import qwix
import safetensors.numpy
from flax import linen as nn
from flax import traverse_util
from flax import nnx
from qwix._src.providers import lora as qwix_lora
from qwix._src.utils import flax_util

from llmjax import hf, models, paths, quant

DEFAULT_TARGETS = {"bert": r".*attn/(query|value)", "gpt": r".*attn/(query|key|value)",
                   "t5": r".*attn/(query|value)"}  # PEFT's defaults for BERT, GPT-2 and T5
ADAPTER = ("_lora_a", "_lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA's settings; `ranks` / `alphas`: {regex over paths: value} exceptions (PEFT's
  rank_pattern / alpha_pattern)."""
  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  targets: str | None = None  # a regex fully matching projection paths; None: DEFAULT_TARGETS
  rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
  train: str = "classifier/.*"  # base parameters trained in full
  ranks: tuple = ()
  alphas: tuple = ()
  quantize: str | None = None  # QLoRA: the frozen base's projections as "nf4", "int8" or "int4"

  def __post_init__(self):
    if self.quantize not in (None, "nf4", "int8", "int4"):
      raise ValueError(f"LoRA quantize={self.quantize!r}; expected nf4, int8, int4 or None (a "
                       f"float base)")
    for pattern, rank in ((None, self.rank), *self.ranks):
      if not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"LoRA rank={rank!r}{f' (for {pattern})' if pattern else ''} must be an "
                         f"int > 0")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")
    for pattern in (self.targets, self.train, *(p for p, _ in self.ranks + self.alphas)):
      try:
        re.compile(pattern or "")
      except re.error as e:
        raise ValueError(f"LoRA pattern {pattern!r} is not a regex: {e}") from None

  def rank_alpha(self, path: str) -> tuple[int, float]:
    """(r, alpha) of the projection at `path`."""
    find = lambda table, default: next((v for p, v in table if re.fullmatch(p, path)), default)
    return find(self.ranks, self.rank), find(self.alphas, self.alpha)

  def scale(self, path: str) -> float:
    r, alpha = self.rank_alpha(path)
    return alpha / (r ** 0.5 if self.rslora else r)


def _family(model) -> str:
  return models.config_to_dict(model.cfg)["family"]


projection = quant.projection  # a kernel's projection: "a/attn/query_kernel" -> "a/attn/query"


class _Provider(quant.Provider):
  """qwix's LoRA on the projections `targets` matches (a path regex: qwix's rules match module
  paths, and our attention holds four kernels in one module), over a base quantized as `quant`
  says (QLoRA) or float; LoRA dropout only when a dropout rng is given."""

  def __init__(self, cfg: LoraConfig, targets: str):
    super().__init__(cfg.quantize and quant.QuantConfig(cfg.quantize))
    self.cfg, self.targets = cfg, targets

  def adapter(self, path, name, lhs, rhs, dimension_numbers, precision):
    if not re.fullmatch(self.targets, path):
      return None
    module = flax_util.get_current_module()
    r, alpha = self.cfg.rank_alpha(path)
    bound = lambda shape: 1.0 / np.sqrt(shape[-2])  # A's fan-in: PEFT's kaiming_uniform(a=√5)
    dtype = getattr(module, "param_dtype", None)  # qwix takes a quantized base's scales' dtype
    rule = qwix.LoraRule(
        module_path=".*", rank=r, alpha=self.cfg.scale(path) * r,
        lora_a_initializer=lambda key, shape, qwix_dtype: jax.random.uniform(
            key, shape, dtype or qwix_dtype, -bound(shape), bound(shape)),
        lora_b_initializer=lambda key, shape, qwix_dtype: jnp.zeros(shape, dtype or qwix_dtype))
    (lhs_ca, rhs_ca), (lhs_ba, rhs_ba) = dimension_numbers
    rhs_ra = tuple(i for i in range(rhs.ndim) if i not in rhs_ca and i not in rhs_ba)
    dims = lambda axes: tuple(rhs.shape[i] for i in axes)
    a_shape, a_axes, b_shape, b_axes = qwix_lora._create_lora_layer_shapes(  # pylint: disable=protected-access
        rhs_ca, rhs_ba, rhs_ra, dims(rhs_ca), dims(rhs_ba), dims(rhs_ra), r)
    # qwix (0.1.8) applies the kernel's axis names to a new adapter before renaming them, a
    # rank mismatch under logical rules: it creates the adapters with none in force.
    creating = nn.logical_axis_rules(()) if module.is_initializing() else contextlib.nullcontext()
    with creating:
      a, b = qwix_lora._get_or_create_lora_params(  # pylint: disable=protected-access
          name=name, rule=rule, a_shape=a_shape, b_shape=b_shape, a_sharding_transpose=a_axes,
          b_sharding_transpose=b_axes)
    if self.cfg.dropout > 0 and module.has_rng("dropout"):
      lhs = nnx.Dropout(self.cfg.dropout, deterministic=False)(
          lhs, rngs=flax_util.make_rng("dropout"))
    delta = qwix_lora._compute_lora_delta(  # pylint: disable=protected-access
        lhs, a, b, lhs_ca, lhs_ba, dims(rhs_ca), dims(rhs_ba), dims(rhs_ra), r, precision)
    return delta * (rule.alpha / rule.rank)


def wrap(model: nn.Module, cfg: LoraConfig) -> nn.Module:
  """`model` with LoRA adapters on the projections `cfg.targets` matches (same apply signature;
  `model.apply` then needs the adapters' parameters, made by `init` or `add_adapters`); with
  `cfg.quantize`, over a quantized base (QLoRA)."""
  targets = cfg.targets or DEFAULT_TARGETS[_family(model)]
  provider = _Provider(cfg, targets)
  wrapped = quant.intercept(model, provider)
  type(wrapped).lora = cfg
  if provider.quant:
    type(wrapped).quant = provider.quant
  return wrapped


def from_config(model: nn.Module, section) -> nn.Module:
  """`model` wrapped as a config's `lora` section (LoraConfig's fields) says, or `model` itself
  where the section or its rank is unset (full fine-tuning)."""
  if not section or section.get("rank") is None:
    if section and section.get("quantize"):
      raise ValueError(f"lora.quantize={section['quantize']!r} needs lora.rank: QLoRA trains "
                       f"adapters over the quantized base")
    return model
  return wrap(model, LoraConfig(**section))


def is_adapter(path: str) -> bool:
  return path.endswith(ADAPTER)


def trainable(model: nn.Module):
  """The predicate on parameter paths ("a/b/c") of the leaves that train under wrapped `model`:
  the adapters and the base parameters `lora.train` matches; None for a plain model."""
  cfg = getattr(model, "lora", None)
  return None if cfg is None else lambda path: is_adapter(path) or bool(re.fullmatch(cfg.train, path))


def add_adapters(model: nn.Module, params, example_args: tuple, example_kwargs=None,
                 seed: int = 0) -> dict:
  """`params` of the base model with new adapters for wrapped `model` (B zero: same outputs),
  its projections quantized if `model` quantizes them (QLoRA); a `targets` that matches no
  projection is an error naming the projections there are."""
  boxed = jax.jit(lambda: model.init(
      jax.random.key(seed), *example_args, **(example_kwargs or {})))()["params"]
  fresh = nn.meta.unbox(boxed)
  check_matched(model, fresh)
  if getattr(model, "quant", None):
    params = quant.fill(params, boxed)
  return combine(fresh, params)


def check_matched(model: nn.Module, params) -> None:
  """Raises ValueError if the model's LoRA targets matched no projection of `params`."""
  flat = traverse_util.flatten_dict(params, sep="/")
  if not any(map(is_adapter, flat)):
    names = sorted({re.sub(r"_\d+/", "_N/", projection(k)) for k in flat if k.endswith("kernel")})
    raise ValueError(f"LoRA targets {model.provider.targets!r} match no projection; "
                     f"the model's are {', '.join(names)}")


def split(params, keep) -> tuple[dict, dict]:
  """(the leaves whose path `keep` accepts, the rest) of a parameter tree."""
  flat = traverse_util.flatten_dict(params, sep="/")
  pick = lambda want: traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if bool(keep(k)) == want}, sep="/")
  return pick(True), pick(False)


def combine(*trees) -> dict:
  """One parameter tree from disjoint ones (`split`'s inverse)."""
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(tree or {}, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def _adapters(params) -> dict[str, tuple]:
  """{kernel path: (A, B)} of the adapters in `params`."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return {k[:-len(ADAPTER[0])]: (v, flat[k[:-len(ADAPTER[0])] + ADAPTER[1]])
          for k, v in flat.items() if k.endswith(ADAPTER[0])}


def merge(model: nn.Module, params) -> tuple[nn.Module, dict]:
  """(the plain model, its parameters with every adapter folded in: W + scale * A B, over the
  dequantized W of a quantized base)."""
  flat = {k: v for k, v in traverse_util.flatten_dict(quant.dequantized(params), sep="/").items()
          if not is_adapter(k)}
  for kernel, (a, b) in _adapters(params).items():
    w = flat[kernel]
    scale = model.lora.scale(projection(kernel))
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    flat[kernel] = (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)
  return quant.base_model(model), traverse_util.unflatten_dict(flat, sep="/")


# Projection path -> transformers module name, by family (our layers_N; HF's own prefixes).
_HF_NAMES = {
    "bert": [(r"encoder/layers_(\d+)/attn/(query|key|value)", r"encoder.layer.\1.attention.self.\2"),
             (r"encoder/layers_(\d+)/attn/out", r"encoder.layer.\1.attention.output.dense"),
             (r"encoder/layers_(\d+)/mlp/wi", r"encoder.layer.\1.intermediate.dense"),
             (r"encoder/layers_(\d+)/mlp/wo", r"encoder.layer.\1.output.dense"),
             (r"pooler_dense", "pooler.dense"), (r"classifier", "classifier")],
    "gpt": [(r"layers_(\d+)/attn/(query|key|value)", r"h.\1.attn.c_attn"),
            (r"layers_(\d+)/attn/out", r"h.\1.attn.c_proj"),
            (r"layers_(\d+)/mlp/wi", r"h.\1.mlp.c_fc"), (r"layers_(\d+)/mlp/wo", r"h.\1.mlp.c_proj"),
            (r"classifier", "score")],
    "t5": [(r"(encoder|decoder)/layers_(\d+)/self_attn/(q|k|v|o)\w*", r"\1.block.\2.layer.0.SelfAttention.\3"),
           (r"decoder/layers_(\d+)/cross_attn/(q|k|v|o)\w*", r"decoder.block.\1.layer.1.EncDecAttention.\2"),
           (r"encoder/layers_(\d+)/mlp/(wi_0|wi_1|wi|wo)", r"encoder.block.\1.layer.1.DenseReluDense.\2"),
           (r"decoder/layers_(\d+)/mlp/(wi_0|wi_1|wi|wo)", r"decoder.block.\1.layer.2.DenseReluDense.\2")],
}
_PREFIX = {"bert": "bert.", "gpt": "transformer.", "t5": ""}  # where HF keeps the body
_QKV = ("query", "key", "value")  # GPT-2's c_attn order


def hf_name(family: str, path: str) -> str | None:
  """The transformers module name (without the body prefix) of projection `path`, if any."""
  for pattern, template in _HF_NAMES[family]:
    if re.fullmatch(pattern, path):
      return re.sub(pattern, template, path)
  return None


def _per_layer(flat: dict) -> dict:
  """Scanned entries ("x/layers/y" with a leading layers axis) as "x/layers_i/y" entries."""
  out = {}
  for k, v in flat.items():
    parts = k.split("/")
    if "layers" not in parts:
      out[k] = v
      continue
    at = parts.index("layers")
    for i in range(v.shape[0]):
      out["/".join(parts[:at] + [f"layers_{i}"] + parts[at + 1:])] = v[i]
  return out


def _task(model) -> str | None:
  family, head = _family(model), getattr(model.cfg, "head", None)
  return ("SEQ_CLS" if head == "classify" else "CAUSAL_LM" if family == "gpt" else
          "SEQ_2_SEQ_LM" if family == "t5" else None)


def save_adapter(model: nn.Module, params, adapter_dir: str) -> None:
  """Writes the adapters (and the fully trained `lora.train` parameters) of wrapped `model` as
  PEFT's adapter_config.json + adapter_model.safetensors under `adapter_dir`."""
  cfg, family = model.lora, _family(model)
  flat = _per_layer(traverse_util.flatten_dict(nn.meta.unbox(params), sep="/"))
  groups, tensors, ranks, alphas = {}, {}, {}, {}
  for kernel, (a, b) in _adapters(traverse_util.unflatten_dict(flat, sep="/")).items():
    path = projection(kernel)
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    groups.setdefault(hf_name(family, path), []).append(
        (path, a.reshape(-1, a.shape[-1]).T, b.reshape(b.shape[0], -1).T, *cfg.rank_alpha(path)))
  prefix = "base_model.model." + _PREFIX[family]
  for name, members in groups.items():
    if name is None:
      raise ValueError(f"no transformers name for LoRA on {[m[0] for m in members]}")
    (_, a, b, r, alpha), n = members[0], len(members)
    if name.endswith("c_attn"):  # q, k, v in one: A stacked, B block-diagonal, rank n * r
      slot = {m[0].rsplit("/", 1)[1]: m for m in members}
      a = np.concatenate([slot[q][1] for q in _QKV if q in slot])
      b = np.zeros((3 * b.shape[0], a.shape[0]), np.float32)
      for i, q in enumerate(q for q in _QKV if q in slot):
        b[_QKV.index(q) * b.shape[0] // 3:][:b.shape[0] // 3, i * r:(i + 1) * r] = slot[q][2]
      r, alpha = n * r, n * alpha
    tensors[f"{prefix}{name}.lora_A.weight"], tensors[f"{prefix}{name}.lora_B.weight"] = a, b
    if r != cfg.rank:
      ranks[name] = r
    if alpha != cfg.alpha:
      alphas[name] = alpha
  saved = sorted({k.rsplit("/", 1)[0] for k in flat
                  if not is_adapter(k) and re.fullmatch(cfg.train, k)})
  for module in saved:
    name = hf_name(family, module)
    if name is None:
      raise ValueError(f"lora.train matches {module}, which PEFT's files have no name for")
    for leaf in ("kernel", "bias"):
      if f"{module}/{leaf}" in flat:
        value = np.asarray(flat[f"{module}/{leaf}"], np.float32)
        tensors[f"base_model.model.{name}.{'weight' if leaf == 'kernel' else 'bias'}"] = (
            value.reshape(-1, value.shape[-1]).T if leaf == "kernel" else value)
  root = paths.path(adapter_dir)
  root.mkdir(parents=True, exist_ok=True)
  config = {"peft_type": "LORA", "task_type": _task(model), "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora, "bias": "none",
            "target_modules": sorted(groups), "rank_pattern": ranks, "alpha_pattern": alphas,
            "modules_to_save": [hf_name(family, m) for m in saved] or None,
            "fan_in_fan_out": family == "gpt", "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": None}
  (root / "adapter_config.json").write_text(json.dumps(config, indent=2))
  (root / "adapter_model.safetensors").write_bytes(safetensors.numpy.save(
      {k: np.ascontiguousarray(v) for k, v in tensors.items()}))


def load_adapter(base: nn.Module, base_params, adapter_dir: str) -> tuple[nn.Module, dict]:
  """(wrapped model, base params + adapters) from PEFT's files in `adapter_dir` (local or gs://)
  for our import of the model they were trained on; every tensor must find its place."""
  root = paths.path(adapter_dir)
  if not (root / "adapter_config.json").is_file():
    raise ValueError(f"{adapter_dir!r} has no adapter_config.json: not a PEFT adapter directory")
  config = json.loads((root / "adapter_config.json").read_text())
  if config.get("peft_type") != "LORA" or config.get("use_dora"):
    raise ValueError(f"{adapter_dir}: peft_type={config.get('peft_type')!r}"
                     f"{' with DoRA' if config.get('use_dora') else ''}; llmjax reads LoRA")
  tensors = safetensors.numpy.load((root / "adapter_model.safetensors").read_bytes())
  family, scanned = _family(base), base.cfg.scan_layers
  flat = _per_layer(traverse_util.flatten_dict(nn.meta.unbox(base_params), sep="/"))
  by_name = {}  # transformers module name -> [(projection path, kernel key)]
  for k in flat:
    if k.endswith("kernel"):
      path = projection(k)
      by_name.setdefault(hf_name(family, path), []).append((path, k))

  def place(key: str) -> tuple[list[tuple[str, str]], str]:
    module = key.removeprefix("base_model.model.").rsplit(".", 2 if ".lora_" in key else 1)[0]
    name = next((n for n in by_name if n and module in (n, _PREFIX[family] + n)), None)
    if name is None:
      raise ValueError(f"{adapter_dir}: {key} names a module this {family} model lacks")
    last = lambda m: m[0].split("/")[-1]
    return sorted(by_name[name], key=lambda m: _QKV.index(last(m)) if last(m) in _QKV else 0), name

  pattern = lambda table, name, default: next(
      (v for p, v in (table or {}).items() if re.fullmatch(rf"(.*\.)?{p}", name)), default)
  generic = lambda p: re.sub(r"layers_\d+", "layers", p) if scanned else p
  r0, alpha0 = config["r"], config["lora_alpha"]
  ranks, alphas, adapted, trained = set(), set(), set(), set()
  for key, value in tensors.items():
    members, name = place(key)
    if ".lora_A." in key:
      b_T = tensors[key.replace(".lora_A.", ".lora_B.")]
      r = pattern(config.get("rank_pattern"), name, r0)
      alpha = pattern(config.get("alpha_pattern"), name, alpha0)
      rows = b_T.shape[0] // len(members)  # c_attn: q, k and v share A, split B
      for i, (path, kernel) in enumerate(members):
        dtype = flat[kernel].dtype
        flat[kernel + ADAPTER[0]] = jnp.asarray(value.T, dtype)
        flat[kernel + ADAPTER[1]] = jnp.asarray(b_T[i * rows:(i + 1) * rows].T, dtype)
        adapted.add(generic(path))
        ranks |= {(re.escape(generic(path)), r)} if r != r0 else set()
        alphas |= {(re.escape(generic(path)), alpha)} if alpha != alpha0 else set()
    elif ".lora_B." not in key:  # modules_to_save: a fully trained layer of the base
      path, kernel = members[0]
      leaf = kernel if key.endswith(".weight") else kernel[:-len("kernel")] + "bias"
      shape, dtype = flat[leaf].shape, flat[leaf].dtype
      flat[leaf] = jnp.asarray((value.T if leaf == kernel else value).reshape(shape), dtype)
      trained.add(re.escape(generic(path)) + "/.*")
  if not adapted:
    raise ValueError(f"{adapter_dir} holds no LoRA weights")
  cfg = LoraConfig(rank=r0, alpha=alpha0, dropout=config.get("lora_dropout", 0.0),
                   targets="|".join(sorted(re.escape(p) for p in adapted)),
                   rslora=bool(config.get("use_rslora")), train="|".join(sorted(trained)) or "(?!)",
                   ranks=tuple(sorted(ranks)), alphas=tuple(sorted(alphas)))
  params = traverse_util.unflatten_dict(flat, sep="/")
  return wrap(base, cfg), hf.stack_all(params) if scanned else params

