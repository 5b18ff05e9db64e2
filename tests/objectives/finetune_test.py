"""Tests of llmjax.objectives.finetune: classification, SFT and seq2seq on JSON records."""

import itertools
import json
import pickle

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from llmjax import objectives
from llmjax.data import ByteTokenizer, load_tokenizer, make_pipeline
from llmjax.data.sources import open_source
from llmjax.objectives import SFT, Classification, Seq2Seq, parse_chat, render_chat

TOK = ByteTokenizer()
WORDS = "the quick brown fox jumps over lazy dog a cat sat on mat".split()


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
  """(our HFTokenizer, transformers' BertTokenizerFast) of one tiny WordPiece vocabulary."""
  letters = "abcdefghijklmnopqrstuvwxyz"
  vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["##s", "##ed"]
           + list(letters) + ["##" + c for c in letters])
  tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  theirs = transformers.BertTokenizerFast(tokenizer_object=tok)
  directory = str(tmp_path_factory.mktemp("bert"))
  theirs.save_pretrained(directory)
  return load_tokenizer(directory), theirs


def _rows(pipeline_ds):
  """Every row of every batch of a finite pipeline."""
  it = iter(pipeline_ds)
  batches = list(it)
  it.close()
  return batches


def _jsonl(tmp_path, records, name="r.jsonl"):
  path = tmp_path / name
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


# --------------------------------------------------------------------------- classification


def test_bert_pairs_equal_transformers(bert):
  """[CLS] a [SEP] b [SEP] ids and token types, and longest_first truncation, as transformers."""
  ours, theirs = bert
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(WORDS + ["cats", "xyz"], n)) for n in (1, 2, 3, 5, 8, 13)]
  for length in (5, 6, 7, 9, 12, 16, 40):
    objective = Classification(ours, length, architecture="encoder")
    for a, b in itertools.product(texts, texts + [None]):
      want = theirs(a, b, truncation="longest_first" if b else True, max_length=length)
      tokens, types = objective.encode_pair(a, b)
      assert tokens.tolist() == want["input_ids"], (length, a, b)
      assert types.tolist() == want["token_type_ids"], (length, a, b)
  again = pickle.loads(pickle.dumps(objective))  # Grain workers get it pickled
  want = theirs(texts[3], texts[4])["input_ids"]
  assert again.encode_pair(texts[3], texts[4])[0].tolist() == want


def test_decoder_pairs_and_byte_tokenizer_fallbacks():
  gpt = Classification(TOK, 8, architecture="decoder")
  tokens, _ = gpt.encode_pair("abc", "de")
  assert tokens.tolist() == [*TOK.encode("abc"), TOK.eos_id, *TOK.encode("de")]
  assert gpt.encode_pair("abcdefghij")[0].tolist() == TOK.encode("abcdefgh").tolist()
  tokens, types = gpt.encode_pair("abcdefgh", "xyz")  # budget 7: 4 + 3
  assert tokens.tolist() == [*TOK.encode("abcd"), TOK.eos_id, *TOK.encode("xyz")]
  assert types.tolist() == [0] * 5 + [1] * 3  # the EOS ends the first text, as [SEP]


def _classification_records(n, num_labels=2):
  return [{"text": f"text {i} " + "x" * (i % 7), "label": i % num_labels if num_labels > 1
           else i / 4, **({"text_pair": f"pair {i}"} if i % 3 else {})} for i in range(n)]


@pytest.mark.parametrize("packing", ["pack", "pad"])
@pytest.mark.parametrize("architecture", ["encoder", "decoder"])
def test_classification_batches_name_each_example(tmp_path, packing, architecture):
  """Through the real pipeline: every example once, its label in a slot whose pooled position
  is its own [CLS] (encoder) or last token (decoder); "pad" fills one slot a row; unused
  slots and filler rows weigh 0."""
  objective = Classification(TOK, 32, architecture=architecture)
  records = _classification_records(6)
  source = open_source(_jsonl(tmp_path, records), check_record=objective.check_record)
  batches = _rows(make_pipeline(source, TOK, objective, batch_size=4, num_epochs=1, shuffle=False,
                                packing=packing, prefetch=0, shard_index=0, shard_count=1))
  expected = {tuple(objective.encode_pair(r["text"], r.get("text_pair"))[0]): r["label"]
              for r in records}
  seen = []
  for batch in batches:
    slots = objective.lengths["label"]
    assert batch["targets"].shape == batch["weights"].shape == batch["pool_positions"].shape
    assert batch["targets"].shape == (4, slots) and batch["targets"].dtype == np.int32
    for row in range(4):
      for slot in np.flatnonzero(batch["weights"][row]):
        pos = batch["pool_positions"][row, slot]
        real = batch["segment_ids"][row] == batch["segment_ids"][row, pos]
        tokens = tuple(batch["tokens"][row][real])
        assert pos == (np.flatnonzero(real)[0] if architecture == "encoder" else
                       np.flatnonzero(real)[-1])
        assert expected[tokens] == batch["targets"][row, slot]
        np.testing.assert_array_equal(batch["positions"][row][real], np.arange(real.sum()))
        seen.append(tokens)
      if packing == "pad":
        assert batch["weights"][row, 1:].sum() == 0
  assert sorted(seen) == sorted(expected)
  assert len(batches) == 2 if packing == "pad" else len(batches) <= 2
  args, kwargs = objective.model_args(batches[0])
  assert len(args) == 1 and set(kwargs) == {"segment_ids", "positions", "pool_positions"} | (
      {"token_types"} if architecture == "encoder" else set())


def test_classification_loss_and_f1():
  objective = Classification(TOK, 16, architecture="encoder")
  logits = jnp.asarray([[2.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, 3.0], [9.0, -9.0]])
  batch = {"targets": jnp.asarray([0, 1, 1, 0, 1]), "weights": jnp.asarray([1.0, 1, 1, 1, 0])}
  loss, sums = objective.loss(logits, batch)
  logp = np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True))
  np.testing.assert_allclose(loss, -np.mean(logp[np.arange(4), [0, 1, 1, 0]]), rtol=1e-6)
  assert (float(sums["tp"]), float(sums["fp"]), float(sums["fn"])) == (1, 1, 1)
  assert float(sums["correct"]) == 2 and float(sums["weight"]) == 4
  assert objective.metrics(sums) == {"f1": pytest.approx(0.5)}
  three = Classification(TOK, 16, num_labels=3, architecture="encoder")
  _, sums = three.loss(jnp.concatenate([logits, logits[:, :1]], axis=1), batch)
  assert "tp" not in sums and three.metrics(sums) == {}


def test_regression(tmp_path):
  objective = Classification(TOK, 16, num_labels=1, architecture="encoder")
  records = _classification_records(5, num_labels=1)
  source = open_source(_jsonl(tmp_path, records), check_record=objective.check_record)
  batch, = _rows(make_pipeline(source, TOK, objective, batch_size=8, num_epochs=1, shuffle=False,
                               packing="pad", prefetch=0, shard_index=0, shard_count=1))
  assert batch["targets"].dtype == np.float32
  np.testing.assert_allclose(batch["targets"][:5, 0], [r["label"] for r in records])
  predictions = np.array([0.3, 0.1, 0.9, 0.5, 1.2, 7, 7, 7], np.float32)
  slots = objective.lengths["label"]  # "pad": each row's first label slot holds its example
  logits = np.full((8, slots, 1), 7.0, np.float32)
  logits[:, 0, 0] = predictions
  loss, sums = objective.loss(jnp.asarray(logits), batch)
  np.testing.assert_allclose(loss, np.mean((predictions[:5] - batch["targets"][:5, 0]) ** 2),
                             rtol=1e-6)
  assert float(sums["nll"]) == float(sums["loss"])
  assert float(sums["correct"]) == 3 and objective.metrics(sums) == {}  # 0.3, 0.1, 1.2 round right
  assert objective.check_record({"text": "a", "label": "x"}).startswith("field 'label' is str")


def test_label_checks_and_names():
  objective = Classification(TOK, 16, architecture="encoder")
  assert objective.check_record({"text": "a", "label": 3}) == (
      "label 3 is outside num_labels=2 (expected 0..1)")
  assert objective.check_record({"text": "a"}) == "no field 'label'"
  assert objective.check_record({"label": 1}) == "no field 'text'"
  assert objective.check_record({"text": "a", "label": True}).startswith("field 'label' is bool")
  assert objective.check_record({"text": "a", "text_pair": 5, "label": 0}).startswith(
      "field 'text_pair' is int")
  assert objective.check_record({"text": "a", "text_pair": None, "label": 1.0}) is None
  assert objective.check_record({"text": "a", "label": "1"}).startswith("field 'label' is str")
  with pytest.raises(ValueError, match="label_names='a,b,c' name each label once"):
    Classification(TOK, 16, label_names="a,b,c", architecture="encoder")
  with pytest.raises(ValueError, match="label_names='a,a' name each label once"):
    Classification(TOK, 16, label_names="a,a", architecture="encoder")
  with pytest.raises(ValueError, match="needs architecture='encoder', 'decoder' or"):
    Classification(TOK, 16)
  with pytest.raises(ValueError, match="record 1 of .*: label 5 is outside"):
    objective.check_source([{"text": "a", "label": 0}, {"text": "b", "label": 5}])
  summary = objective.check_source([{"text": "a" * 20, "label": 0}, {"text": "b", "label": 1}])
  assert summary == "classification: 2 examples, labels 0: 1, 1: 1; 1 cut to 16"


def test_t5_classification_is_text_to_text():
  objective = Classification(TOK, 16, label_names="negative,positive",
                             architecture="encoder_decoder")
  example, = objective.examples({"text": "good", "text_pair": "film", "label": 1}, None)
  assert example["encoder_tokens"].tolist() == [*TOK.encode("good film"), TOK.eos_id]
  assert example["decoder_targets"].tolist() == [*TOK.encode("positive"), TOK.eos_id]
  assert example["decoder_tokens"].tolist() == [TOK.pad_id, *TOK.encode("positive")]
  assert objective.lengths["decoder_targets"] == len("negative") + 1
  assert objective.targets_key == "decoder_targets" and objective.metrics({}) == {}


def test_from_config_passes_architecture():
  section = type("Section", (dict,), {"__getattr__": dict.__getitem__})
  config = section(name="classification", length=16, **{
      k: default for k, (default, _) in objectives.settings().items()})
  assert "architecture" not in objectives.settings()
  objective = objectives.from_config(config, TOK, architecture="decoder")
  assert isinstance(objective, Classification) and objective.architecture == "decoder"
  assert isinstance(objectives.from_config(section(config, name="sft"), TOK), SFT)
  assert pickle.loads(pickle.dumps(objective)).encode_pair("ab")[0].tolist() == [
      *TOK.encode("ab")]


# --------------------------------------------------------------------------- SFT


def test_chat_template_round_trips():
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hi\n\nthere <|user|> inline"},
              {"role": "assistant", "content": ""}, {"role": "user", "content": "two\n"},
              {"role": "assistant", "content": "ok"}]
  text = render_chat(messages)
  assert text.startswith("<|system|>\nBe brief.\n<|user|>\nHi")
  assert parse_chat(text) == messages
  assert render_chat(messages[:2], add_generation_prompt=True).endswith("inline\n<|assistant|>\n")
  assert parse_chat(render_chat(messages[:2], True)) == messages[:2] + [
      {"role": "assistant", "content": ""}]
  with pytest.raises(ValueError, match="must start with a role header"):
    parse_chat("hello\n<|user|>\nx\n")


def test_sft_weights_are_exactly_on_the_response_and_eos():
  sft = SFT(TOK, 64)
  example, = sft.examples({"prompt": "Q: 2+2?", "response": " 4"}, None)
  full = [TOK.bos_id, *TOK.encode("Q: 2+2?"), *TOK.encode(" 4"), TOK.eos_id]
  assert example["tokens"].tolist() == full[:-1] and example["targets"].tolist() == full[1:]
  assert example["weights"].tolist() == [0.0] * 7 + [1.0] * 3  # targets " ", "4", EOS

  chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
          {"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
  example, = sft.examples({"messages": chat}, None)
  targets, weights = example["targets"], example["weights"]
  np.testing.assert_array_equal(targets[weights > 0], [*TOK.encode("yo"), TOK.eos_id,
                                                       *TOK.encode("!"), TOK.eos_id])
  tokens = np.append(example["tokens"], targets[-1])
  pieces = TOK.decode(tokens[tokens != TOK.eos_id])  # BOS dropped
  assert pieces == render_chat(chat)


def test_sft_truncation_skips_and_check_source():
  sft = SFT(TOK, 8, add_bos=False)
  # 9 ids are kept: a prompt of 8 leaves its last input to predict the response's first token.
  example, = sft.examples({"prompt": "abcdefgh", "response": "xyz"}, None)
  assert example["targets"].tolist()[-1] == TOK.encode("x")[0]
  assert example["weights"].tolist() == [0.0] * 7 + [1.0]
  assert sft.examples({"prompt": "abcdefghi", "response": "xyz"}, None) == []  # no room
  records = [{"prompt": "abcdefghi", "response": "x"}, {"prompt": "a", "response": "x"},
             {"prompt": "ab", "response": "xyzuvwq"}]
  assert sft.check_source(records) == ("sft: 1 of 3 examples have prompts longer than 8 tokens "
                                       "(no room for a response); skipped. 2 cut to 9 tokens")
  with pytest.raises(ValueError, match="every prompt is longer than length=8: nothing to train"):
    sft.check_source(records[:1])
  assert sft.check_record({"prompt": "a"}) == "no field 'response' (nor 'messages')"
  assert sft.check_record({"messages": [{"role": "user", "content": "a"}]}) == (
      "'messages' has no assistant message to train on")
  assert sft.check_record({"messages": [{"role": "bot", "content": "a"}]}).startswith(
      "message 0: role 'bot' is not one of")
  assert "role header" in sft.check_record(
      {"messages": [{"role": "assistant", "content": "x\n<|user|>\ny"}]})


def test_sft_packs_examples_apart(tmp_path):
  sft = SFT(TOK, 48)
  records = [{"prompt": f"p{i}", "response": "r" * i} for i in range(1, 9)]
  source = open_source(_jsonl(tmp_path, records), check_record=sft.check_record)
  batches = _rows(make_pipeline(source, TOK, sft, batch_size=2, num_epochs=1, packing="pack",
                                prefetch=0, shard_index=0, shard_count=1))
  total = sum(float(b["weights"].sum()) for b in batches)
  assert total == sum(i + 1 for i in range(1, 9))  # each response and its EOS
  assert max(int(b["segment_ids"].max()) for b in batches) > 1  # several examples in a row


# --------------------------------------------------------------------------- seq2seq


def test_seq2seq_batch_shapes_and_shift(tmp_path):
  objective = Seq2Seq(TOK, 12, target_length=6)
  records = [{"inputs": "in" * i, "targets": "t" * i} for i in range(1, 8)]
  source = open_source(_jsonl(tmp_path, records), check_record=objective.check_record)
  batches = _rows(make_pipeline(source, TOK, objective, batch_size=2, num_epochs=1,
                                packing="pack", prefetch=0, shard_index=0, shard_count=1))
  keys = {"encoder_tokens", "encoder_segment_ids", "encoder_positions", "decoder_tokens",
          "decoder_targets", "decoder_weights", "decoder_segment_ids", "decoder_positions"}
  for batch in batches:
    assert set(batch) == keys and batch["encoder_tokens"].shape == (2, 12)
    assert batch["decoder_targets"].shape == (2, 6)
    seg, pos = batch["decoder_segment_ids"], batch["decoder_positions"]
    first = (seg > 0) & (pos == 0)
    assert (batch["decoder_tokens"][first] == TOK.pad_id).all()
    rest = (seg > 0) & (pos > 0)
    shifted = np.roll(batch["decoder_targets"], 1, axis=1)
    np.testing.assert_array_equal(batch["decoder_tokens"][rest], shifted[rest])
    np.testing.assert_array_equal(batch["decoder_weights"], (seg > 0).astype(np.float32))
  example, = objective.examples(records[-1], None)
  assert example["decoder_targets"].tolist() == [*TOK.encode("ttttt"), TOK.eos_id]  # cut to 6
  assert example["encoder_tokens"].tolist() == [*TOK.encode("inininininin")[:11], TOK.eos_id]
  assert objective.check_source(records) == (
      "seq2seq: 7 examples; 2 inputs cut to 12 tokens, 2 targets to 6")
  args, kwargs = objective.model_args(batches[0])
  assert len(args) == 4 and kwargs == {}


@pytest.mark.parametrize("architecture", ["encoder", "decoder"])
def test_packed_examples_classify_as_alone(tmp_path, architecture):
  """A model's logits for an example packed with others equal its logits alone in a row."""
  import jax
  from llmjax import models
  objective = Classification(TOK, 32, architecture=architecture)
  records = _classification_records(6)
  source = open_source(_jsonl(tmp_path, records), check_record=objective.check_record)
  family = {"encoder": ("bert", dict(pooler=True)), "decoder": ("gpt", {})}[architecture]
  cfg = models.FAMILIES[family[0]][0].from_size(
      "tiny", head="classify", num_labels=2, vocab_size=384, dropout_rate=0.0, **family[1])
  model = models.FAMILIES[family[0]][1](cfg)
  out = {}
  for packing in ("pack", "pad"):
    for batch in _rows(make_pipeline(source, TOK, objective, batch_size=4, num_epochs=1,
                                     shuffle=False, packing=packing, prefetch=0, shard_index=0,
                                     shard_count=1)):
      if "params" not in out:
        out["params"] = objective.init(model, jax.random.key(0), batch)["params"]
      logits = np.asarray(objective.logits(model, {"params": out["params"]}, batch))
      for row, slot in zip(*np.nonzero(batch["weights"])):
        pos = batch["pool_positions"][row, slot]
        real = batch["segment_ids"][row] == batch["segment_ids"][row, pos]
        out.setdefault(tuple(batch["tokens"][row][real]), []).append(logits[row, slot])
  pairs = [v for k, v in out.items() if k != "params"]
  assert len(pairs) == 6 and all(len(v) == 2 for v in pairs)
  for packed, alone in pairs:
    np.testing.assert_allclose(packed, alone, atol=1e-5)
