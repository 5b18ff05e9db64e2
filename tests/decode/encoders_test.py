"""BERT fill-mask against transformers' fill-mask pipeline, and sentence embeddings against
sentence-transformers' pooling and normalization, on random checkpoints read by hf.load."""

import numpy as np
import pytest
import torch
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
from transformers import BertTokenizerFast, pipeline

from llmjax import decode, hf
from llmjax.models import GPT, GPTConfig

from tests import hf_reference  # needs the test extra: torch (CPU) and transformers


@pytest.fixture(scope="module")
def bert_mlm(tmp_path_factory):
  path = tmp_path_factory.mktemp("bert_mlm")
  torch_model = hf_reference.make_bert_mlm(str(path)).model.eval()
  # A WordPiece vocabulary of the model's size, so the real pipeline runs on real text.
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(
      hf_reference.VOCAB - 5)]
  (path / "vocab.txt").write_text("\n".join(words) + "\n")
  tokenizer = BertTokenizerFast(str(path / "vocab.txt"))
  return torch_model, tokenizer, *hf.load(str(path))


def test_fill_mask_equals_the_transformers_pipeline(bert_mlm):
  torch_model, tokenizer, model, params = bert_mlm
  fill = pipeline("fill-mask", model=torch_model, tokenizer=tokenizer, top_k=5, device="cpu")
  texts = ["w5 w17 [MASK] w200 w3", "w9 [MASK] w41 w7 [MASK] w250 w11 w12"]
  rows = [tokenizer(t)["input_ids"] for t in texts]
  ids, probs = decode.fill_mask(model, params, rows, top_k=5, mask_id=tokenizer.mask_token_id)
  assert ids.shape == probs.shape == (2, 2, 5)
  for b, text in enumerate(texts):
    expected = fill(text)
    expected = [expected] if isinstance(expected[0], dict) else expected
    for m, candidates in enumerate(expected):
      np.testing.assert_array_equal(ids[b, m], [c["token"] for c in candidates])
      np.testing.assert_allclose(probs[b, m], [c["score"] for c in candidates], atol=1e-5)
  # Row 0 has one mask: its second slot is empty.
  assert (np.asarray(ids[0, 1]) == -1).all() and (np.asarray(probs[0, 1]) == 0).all()


@pytest.fixture(scope="module")
def bert_model(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bert_model"))
  return hf_reference.make_bert_model(path).model.eval(), *hf.load(path)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embed_equals_sentence_transformers(bert_model, pooling):
  torch_model, model, params = bert_model
  rng = np.random.default_rng(0)
  lengths = [12, 5, 9]
  tokens = rng.integers(5, hf_reference.VOCAB, (3, 12))
  mask = (np.arange(12)[None] < np.array(lengths)[:, None]).astype(np.int64)
  with torch.no_grad():
    hidden = torch_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))[0]
    features = {"token_embeddings": hidden, "attention_mask": torch.tensor(mask)}
    features = Pooling(hidden.shape[-1], pooling_mode=pooling)(features)
    expected = Normalize()(features)["sentence_embedding"].numpy()
  ours = decode.embed(model, params, tokens * mask, mask, pooling=pooling, normalize=True)
  np.testing.assert_allclose(ours, expected, atol=1e-5)
  # A list of rows of different lengths is padded for you; without normalize, norms vary.
  rows = [tokens[b, :n].tolist() for b, n in enumerate(lengths)]
  np.testing.assert_allclose(decode.embed(model, params, rows, pooling=pooling), expected,
                             atol=1e-5)
  raw = np.asarray(decode.embed(model, params, rows, pooling=pooling, normalize=False))
  np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=-1, keepdims=True), expected,
                             atol=1e-5)


def test_bad_input(bert_mlm, bert_model):
  _, _, mlm, mlm_params = bert_mlm
  _, encoder, encoder_params = bert_model
  gpt = GPT(GPTConfig.from_size("tiny"))
  with pytest.raises(ValueError, match="fill_mask: needs a Bert with its MLM head"):
    decode.fill_mask(gpt, None, [[1, 2]])
  with pytest.raises(ValueError, match="fill_mask: needs a Bert with its MLM head"):
    decode.fill_mask(encoder, encoder_params, [[1, 2]])
  with pytest.raises(ValueError, match="no token is the mask id 4"):
    decode.fill_mask(mlm, mlm_params, [[1, 2]], mask_id=4)
  with pytest.raises(ValueError, match="token id 999 is outside"):
    decode.fill_mask(mlm, mlm_params, [[1, 999]], mask_id=4)
  with pytest.raises(ValueError, match="top_k=0"):
    decode.fill_mask(mlm, mlm_params, [[1, 4]], top_k=0, mask_id=4)
  with pytest.raises(ValueError, match="embed: needs a Bert or T5"):
    decode.embed(gpt, None, [[1, 2]])
  with pytest.raises(ValueError, match="pooling='max'"):
    decode.embed(encoder, encoder_params, [[1, 2]], pooling="max")
  with pytest.raises(ValueError, match="every row needs at least one token"):
    decode.embed(encoder, encoder_params, [[1, 2], []])
