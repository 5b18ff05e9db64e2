"""Generation against transformers' `generate`: greedy, ragged batches and beam search, on
random GPT-2 and T5 (v1.0, v1.1) checkpoints read by hf.load."""

import numpy as np
import pytest
import torch

from llmjax import decode, hf

from tests import hf_reference  # needs the test extra: torch (CPU) and transformers

N = 12  # new tokens
PROMPTS = [[5, 17, 33, 8, 250, 91, 2], [44, 12], [7, 7, 120, 64, 3, 199, 30, 11, 9, 42, 6]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{name: (torch model, llmjax model, params)} for GPT-2 and both T5 versions."""
  out = {}
  for name, make in (("gpt2", hf_reference.make_gpt2),
                     ("t5-1.0", lambda p: hf_reference.make_t5(p, "1.0")),
                     ("t5-1.1", lambda p: hf_reference.make_t5(p, "1.1"))):
    path = str(tmp_path_factory.mktemp(name))
    torch_model = make(path).model.eval()
    torch_model.generation_config.eos_token_id = None  # no stopping unless a test asks
    torch_model.generation_config.pad_token_id = 0
    torch_model.generation_config.decoder_start_token_id = 0  # T5 starts from pad
    out[name] = (torch_model, *hf.load(path))
  return out


def _hf_generate(torch_model, prompt, **kw):
  """transformers' new tokens for one prompt (T5: after the decoder start token), one row per
  returned sequence (best first), padded with 0 to N."""
  with torch.no_grad():
    ids = torch_model.generate(torch.tensor([prompt]), max_new_tokens=N, do_sample=False,
                               early_stopping=False, **kw).numpy()
  new = ids[:, 1:] if torch_model.config.is_encoder_decoder else ids[:, len(prompt):]
  new = np.pad(new, ((0, 0), (0, N - new.shape[1])))  # it stops at the longest beam
  if kw.get("eos_token_id") is not None:  # it fills finished beams with EOS when pad is 0
    after_eos = np.cumsum(new == kw["eos_token_id"], axis=1) - (new == kw["eos_token_id"]) > 0
    new[after_eos] = 0
  return new


@pytest.mark.parametrize("name", ["gpt2", "t5-1.0", "t5-1.1"])
def test_greedy_ragged_batch_equals_transformers_and_rows_alone(checkpoints, name):
  torch_model, model, params = checkpoints[name]
  batch = np.asarray(decode.generate(model, params, PROMPTS, N))
  assert batch.shape == (len(PROMPTS), N) and batch.dtype == np.int32
  for b, prompt in enumerate(PROMPTS):
    np.testing.assert_array_equal(batch[b], _hf_generate(torch_model, prompt)[0], err_msg=f"row {b}")
    if name != "t5-1.1":  # each row alone: a batch of one, another compilation
      np.testing.assert_array_equal(decode.generate(model, params, [prompt], N)[0], batch[b])


def _eos_the_beams_reach(torch_model, prompts):
  """The token the best 4-beam hypotheses emit most often: as EOS, it makes beams finish."""
  emitted = np.concatenate([_hf_generate(torch_model, p, num_beams=4)[0, 1:-2] for p in prompts])
  return int(np.bincount(emitted).argmax())


@pytest.mark.parametrize("name", ["gpt2", "t5-1.0"])
def test_beam_search_equals_transformers(checkpoints, name):
  torch_model, model, params = checkpoints[name]
  prompts = PROMPTS[:2]
  eos_id = _eos_the_beams_reach(torch_model, prompts)
  eos_mattered = set()
  for length_penalty in (0.6, 1.0, 2.0):
    refs = {}
    for eos in (None, eos_id):
      ours = np.asarray(decode.generate(model, params, prompts, N, num_beams=4,
                                        length_penalty=length_penalty, eos_id=eos))
      for b, prompt in enumerate(prompts):
        refs[eos, b] = _hf_generate(torch_model, prompt, num_beams=4, num_return_sequences=4,
                                    length_penalty=length_penalty, eos_token_id=eos)
        np.testing.assert_array_equal(ours[b], refs[eos, b][0], err_msg=f"row {b}, "
                                      f"length_penalty {length_penalty}, eos {eos}")
    # The beams did reach the EOS: it ends returned hypotheses or changed the search.
    if any((refs[eos_id, b] == eos_id).any() or (refs[eos_id, b] != refs[None, b]).any()
           for b in range(len(prompts))):
      eos_mattered.add(length_penalty)
  assert eos_mattered == {0.6, 1.0, 2.0}
