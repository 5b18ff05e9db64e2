"""The shared loss, and every objective's batches driving its model family end to end."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax import data, objectives
from llmjax.models import GPT, Bert, BertConfig, GPTConfig, T5, T5Config



def _random_case(seed=0, B=3, T=5, V=11):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(B, T, V)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, T)))
  weights = jnp.asarray(rng.integers(0, 2, (B, T)), jnp.float32)
  return logits, targets, weights


def test_cross_entropy_matches_optax():
  """nll is optax's integer-label cross entropy summed under the weights; correct counts
  argmax hits."""
  logits, targets, weights = _random_case()
  sums = objectives.cross_entropy(logits, targets, weights)
  want = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  np.testing.assert_allclose(sums["nll"], jnp.sum(want * weights), rtol=1e-6)
  np.testing.assert_allclose(sums["loss"], sums["nll"], rtol=1e-6)
  np.testing.assert_allclose(sums["weight"], weights.sum())
  hits = (jnp.argmax(logits, -1) == targets) * weights
  np.testing.assert_allclose(sums["correct"], hits.sum())


def test_label_smoothing_and_z_loss():
  """Label smoothing equals optax.smooth_labels targets; z-loss adds z * log(Z)^2 per
  weighted token."""
  logits, targets, weights = _random_case(1)
  V = logits.shape[-1]
  smoothed = optax.smooth_labels(jax.nn.one_hot(targets, V), 0.1)
  want = jnp.sum(optax.softmax_cross_entropy(logits, smoothed) * weights)
  got = objectives.cross_entropy(logits, targets, weights, label_smoothing=0.1)
  np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
  z = objectives.cross_entropy(logits, targets, weights, z_loss=1e-2)
  log_z = jax.nn.logsumexp(logits, -1)
  np.testing.assert_allclose(z["loss"] - z["nll"], jnp.sum(1e-2 * log_z**2 * weights), rtol=1e-5)


def test_zero_weight_positions_do_not_matter():
  """Targets and logits at zero-weight positions change neither the loss nor its gradient."""
  logits, targets, weights = _random_case(2)
  obj = objectives.CausalLM(data.ByteTokenizer(), 5)
  loss = lambda lg, tg: obj.loss(lg, {"targets": tg, "weights": weights})[0]
  scrambled_targets = jnp.where(weights > 0, targets, (targets + 3) % logits.shape[-1])
  scrambled_logits = jnp.where(weights[..., None] > 0, logits, 100.0 * logits)
  np.testing.assert_allclose(loss(logits, targets), loss(scrambled_logits, scrambled_targets),
                             rtol=1e-6)
  grad = jax.grad(loss)(logits, targets)
  assert float(jnp.abs(grad * (weights[..., None] == 0)).max()) == 0.0


def _first_batch(objective, seq_len, batch_size=2):
  tok = data.ByteTokenizer()
  it = iter(data.make_pipeline(data.builtin_source(), tok, objective(tok, seq_len),
                               batch_size=batch_size, seed=3, prefetch=0))
  batch = next(it)
  it.close()
  return batch


@pytest.mark.parametrize("name", ["causal_lm", "prefix_lm", "masked_lm", "span_corruption"])
def test_objective_trains_its_model(name):
  """A pipeline batch feeds its model family; a few SGD steps on it lower the objective's loss."""
  tok = data.ByteTokenizer()
  vocab = 384  # >= the byte tokenizer's 363 ids
  make_model = {"causal_lm": lambda: GPT(GPTConfig.from_size("tiny", vocab_size=vocab)),
                "prefix_lm": lambda: GPT(GPTConfig.from_size("tiny", vocab_size=vocab)),
                "masked_lm": lambda: Bert(BertConfig.from_size("tiny", vocab_size=vocab)),
                "span_corruption": lambda: T5(T5Config.from_size("tiny", vocab_size=vocab))}[name]
  model = make_model()
  data.check_vocab(tok, model.cfg.vocab_size)
  objective = objectives.OBJECTIVES[name](tok, 32)
  batch = jax.tree.map(jnp.asarray, _first_batch(objectives.OBJECTIVES[name], 32))
  assert float(batch[objective.weights_key].sum()) > 0
  init_args = [batch[k] for k in (("encoder_tokens", "decoder_tokens") if name == "span_corruption"
                                  else ("tokens",))]
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), *init_args)

  @jax.jit
  def step(params):
    loss_fn = lambda p: objective.loss(objective.logits(model, p, batch), batch)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)

  losses = []
  for _ in range(4):
    loss, params = step(params)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_prefix_is_bidirectional_and_suffix_causal():
  """With a prefix mask, early prefix outputs see later prefix tokens; suffix outputs never
  see the future."""
  cfg = GPTConfig.from_size("tiny", vocab_size=50, max_seq_len=16)
  model = GPT(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (1, 12)))
  prefix = jnp.asarray([[1] * 5 + [0] * 7])
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), tokens)
  # Changing token j changes outputs at i only where i may attend to j.
  base = model.apply(params, tokens, prefix_mask=prefix)
  for j in range(12):
    changed = model.apply(params, tokens.at[0, j].set((tokens[0, j] + 1) % 50), prefix_mask=prefix)
    moved = np.abs(np.asarray(changed - base)).max(-1)[0] > 0
    may_see = np.array([j <= i or (i < 5 and j < 5) for i in range(12)])
    np.testing.assert_array_equal(moved, may_see, err_msg=f"changing token {j}")


def test_prefix_mask_refused_where_it_has_no_meaning():
  """Decoding with a prefix mask, or one of the wrong shape, is a clear error before tracing."""
  cfg = GPTConfig.from_size("tiny", vocab_size=50, max_seq_len=16)
  tokens = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="prefix_mask"):
    GPT(cfg, decode=True).init(jax.random.key(0), tokens, prefix_mask=jnp.ones_like(tokens))
  with pytest.raises(ValueError, match="prefix_mask"):
    GPT(cfg).init(jax.random.key(0), tokens, prefix_mask=jnp.ones((1, 7), jnp.int32))


def test_objectives_refuse_bad_settings_up_front():
  """A model too small for the tokenizer, a bad masking rate or cap, or no decoder start id is
  an error naming the value, raised before any batch is made."""
  tok = data.ByteTokenizer()
  objective = objectives.CausalLM(tok, 8)
  model = GPT(GPTConfig.from_size("tiny", vocab_size=256))  # the byte tokenizer has 363 ids
  batch = {k: jnp.zeros((1, 8), jnp.int32) for k in ("tokens", "segment_ids", "positions")}
  with pytest.raises(ValueError, match="vocab_size"):
    objective.logits(model, {}, batch)
  for kwargs, match in [({"mask_rate": 0.0}, "mask_rate"), ({"mask_rate": 1.5}, "mask_rate"),
                        ({"max_predictions": 0}, "max_predictions")]:
    with pytest.raises(ValueError, match=match):
      objectives.MaskedLM(tok, 16, **kwargs)
  with pytest.raises(ValueError, match="decoder_start_id"):
    objectives.SpanCorruption(tok, 64, decoder_start_id=tok.vocab_size)
  no_pad = data.ByteTokenizer()
  no_pad.pad_id = None  # as a SentencePiece model trained without a pad piece
  with pytest.raises(ValueError, match="no pad id"):
    objectives.SpanCorruption(no_pad, 64)


def test_objectives_refuse_a_model_of_another_architecture():
  """Masked LM on a causal GPT, span corruption on a decoder-only model, causal LM on a BERT:
  each refused in one line naming the objective, the model and what would fit; the same
  through an experiment config, before anything is initialized."""
  from llmjax import train
  tok = data.ByteTokenizer()
  gpt = GPT(GPTConfig.from_size("tiny", vocab_size=384))
  bert = Bert(BertConfig.from_size("tiny", vocab_size=384))
  for objective, model, fits in [(objectives.MaskedLM(tok, 16), gpt, "causal_lm or prefix_lm"),
                                 (objectives.SpanCorruption(tok, 64), gpt, "causal_lm"),
                                 (objectives.CausalLM(tok, 16), bert, "masked_lm")]:
    with pytest.raises(ValueError, match=f"not {type(model).__name__} .*{fits}") as e:
      objective.check_model(model)
    assert "\n" not in str(e.value)
  config = train.base_config()
  config.objective.name = "masked_lm"
  with pytest.raises(ValueError, match="MaskedLM trains encoder models, not GPT"):
    train.build(config)
