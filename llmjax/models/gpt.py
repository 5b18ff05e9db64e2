"""Decoder-only Transformer (GPT-2 family): pre-LN blocks, learned or rotary positions."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax import layers
from llmjax import sharding as sh
from llmjax.models import common, heads

SIZES = {
    "tiny": dict(vocab_size=256, max_seq_len=256, d_model=64, num_layers=2, num_heads=4),
    "small": dict(d_model=768, num_layers=12, num_heads=12),
    "medium": dict(d_model=1024, num_layers=24, num_heads=16),
    "large": dict(d_model=1280, num_layers=36, num_heads=20),
    "xl": dict(d_model=1600, num_layers=48, num_heads=25),
}


@dataclasses.dataclass(frozen=True)
class GPTConfig(common.BaseConfig):
  """Hyperparameters of a GPT model; defaults are GPT-2 small's."""

  vocab_size: int = 50257
  max_seq_len: int = 1024  # rows of the learned position table
  d_model: int = 768
  num_layers: int = 12
  num_heads: int = 12
  num_kv_heads: int | None = None  # None: as many as num_heads; fewer: grouped-query
  head_dim: int | None = None  # None: d_model // num_heads
  d_ff: int = 0  # 0: 4 * d_model
  activation: str = "gelu_tanh"
  gated: bool = False  # GeGLU / SwiGLU feed-forward
  positions: str = "learned"  # learned | rope | sinusoidal
  rope_theta: float = 10_000.0
  norm: str = "layernorm"  # layernorm | rmsnorm
  norm_eps: float = 1e-5
  use_bias: bool = True
  tie_embeddings: bool = True
  head: str = "lm"  # lm: next-token logits | classify: [B, num_labels] from the last token
  num_labels: int = 0  # head="classify" only: its outputs (1: regression)
  SIZES = SIZES

  def __post_init__(self):
    super().__post_init__()
    common.check(self.positions in ("learned", "rope", "sinusoidal"),
                 f"GPTConfig.positions={self.positions!r}; expected learned, rope or sinusoidal")
    common.check(self.norm in ("layernorm", "rmsnorm"),
                 f"GPTConfig.norm={self.norm!r}; expected layernorm or rmsnorm")
    common.check(self.max_seq_len > 0, f"GPTConfig.max_seq_len={self.max_seq_len} must be positive")
    common.check(self.head in ("lm", "classify"), f"GPTConfig.head={self.head!r}; expected lm or "
                 f"classify")
    common.check_classifier(self)


def _norm(cfg: GPTConfig, name: str):
  if cfg.norm == "rmsnorm":
    return layers.RMSNorm(cfg.norm_eps, name=name, **cfg.dtypes)
  return layers.LayerNorm(cfg.norm_eps, use_bias=cfg.use_bias, name=name, **cfg.dtypes)


class GPTBlock(nn.Module):
  """x + attn(norm(x)), then x + mlp(norm(x))."""

  cfg: GPTConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT, prefix_mask_BT=None):
    cfg = self.cfg
    resid_init = nn.initializers.normal(0.02 / (2 * cfg.num_layers) ** 0.5)
    x_BTD = sh.constrain(x_BTD, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
    h_BTD = layers.Attention(
        cfg.num_heads, cfg.kv_heads, cfg.k, use_bias=cfg.use_bias,
        rope_theta=cfg.rope_theta if cfg.positions == "rope" else None,
        dropout_rate=cfg.dropout_rate, deterministic=self.deterministic,
        impl=cfg.attention_impl, decode=self.decode, out_init=resid_init, name="attn",
        **cfg.dtypes)(_norm(cfg, "ln_1")(x_BTD), q_segment_ids=segment_ids_BT, causal=True,
                      positions=positions_BT, prefix_mask=prefix_mask_BT)
    x_BTD = x_BTD + layers.Dropout(cfg.dropout_rate)(h_BTD, deterministic=self.deterministic)
    h_BTD = layers.Mlp(cfg.mlp_dim, cfg.activation, cfg.gated, cfg.use_bias,
                       deterministic=self.deterministic, wo_init=resid_init, name="mlp",
                       **cfg.dtypes)(_norm(cfg, "ln_2")(x_BTD))
    x_BTD = x_BTD + layers.Dropout(cfg.dropout_rate)(h_BTD, deterministic=self.deterministic)
    return sh.constrain(x_BTD, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED)), None


class GPT(nn.Module):
  """Decoder-only language model: tokens [B, T] -> next-token logits [B, T, V] in float32.
  `segment_ids` [B, T]: 0 marks padding, equal non-zero ids one packed sequence (default:
  one per row). `positions` default to each token's index in its segment. `prefix_mask`
  [B, T] (prefix LM) marks positions that attend bidirectionally within their segment.
  `last_only` returns the last position's logits only, [B, 1, V]; head="classify" returns
  [B, num_labels] from each row's last real token (packed: [B, P, num_labels] at
  `pool_positions` [B, P], each example's last token). With `decode=True` the
  attention layers keep a KV cache: initialize with a [B, max_length] input, then feed
  tokens with mutable=["cache"] (a step past max_length gives NaN); segment id 0 marks left
  padding and rows of different lengths pass their own `positions` (as llmjax.decode does)."""

  ARCHITECTURE = "decoder"  # which objectives train it: see objectives.Objective.check_model

  cfg: GPTConfig
  decode: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, *, prefix_mask: jax.Array | None = None,
               deterministic: bool = True, last_only: bool = False,
               pool_positions: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    common.check_inputs("GPT", tokens, segment_ids=segment_ids, positions=positions,
                        prefix_mask=prefix_mask)
    T = tokens.shape[1]
    if cfg.positions == "learned" and not self.decode:  # a decoding cache may be longer
      common.check(T <= cfg.max_seq_len, f"GPT: sequence length {T} exceeds "
                   f"GPTConfig.max_seq_len={cfg.max_seq_len} (the learned position table)")
    common.check(not (self.decode and prefix_mask is not None),
                 "GPT(decode=True) has no prefix_mask: run the prefix without decode")
    segment_ids_BT = jnp.ones_like(tokens) if segment_ids is None else segment_ids
    if positions is None:
      positions = layers.segment_positions(segment_ids_BT)
      if self.decode:  # continue from where the cache is
        step = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
        if not self.is_initializing():
          positions = positions + step.value
          step.value = step.value + T
    wte = layers.Embed(cfg.vocab_size, cfg.d_model, name="wte", **cfg.dtypes)
    x_BTD = wte(tokens)
    if cfg.positions == "learned":
      x_BTD = x_BTD + layers.LearnedPositions(cfg.max_seq_len, cfg.d_model, name="wpe",
                                              **cfg.dtypes)(positions)
    elif cfg.positions == "sinusoidal":
      x_BTD = x_BTD + layers.sinusoidal(positions, cfg.d_model).astype(cfg.compute_dtype)
    x_BTD = layers.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)
    x_BTD = common.run_layers(GPTBlock, cfg, cfg.num_layers, x_BTD, segment_ids_BT, positions,
                              prefix_mask, deterministic=deterministic, decode=self.decode)
    if last_only:  # generation's prefill needs the next-token logits of the last position only
      x_BTD = x_BTD[:, -1:]
    x_BTD = _norm(cfg, "ln_f")(x_BTD)
    if cfg.head == "classify":
      pooled = (heads.last_token(x_BTD, segment_ids_BT) if pool_positions is None
                else heads.pick(x_BTD, pool_positions))
      return heads.ClassifierHead(cfg.num_labels, use_bias=False, name="classifier",
                                  **cfg.dtypes)(pooled)
    if cfg.tie_embeddings:
      logits_BTV = wte.attend(x_BTD)
    else:
      head_DV = self.param("head", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (sh.EMBED, sh.VOCAB)), (cfg.d_model, cfg.vocab_size),
                           cfg.weight_dtype)
      logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD.astype(jnp.float32),
                              jnp.asarray(head_DV, jnp.float32))
    return sh.constrain(logits_BTV, (sh.BATCH, sh.LENGTH, sh.VOCAB))
