"""Fine-tuning objectives on JSON records (`open_source(..., check_record=objective.check_record)`
checks each; `check_source(source)` tokenizes all once before training, for the log).

Chat template (`render_chat`): each message is "<|role|>\\n" + content + "\\n", an assistant's
content followed by the EOS id (not text); pieces are tokenized apart, so the loss mask falls on
token boundaries. Text is encoded without the tokenizer's own specials where it can leave them
out (Hugging Face), so the objective places each special once.
"""

from __future__ import annotations

import collections
import inspect
import math
import re

import jax.numpy as jnp
import numpy as np

from llmjax.objectives.base import Objective, cross_entropy, segments
from llmjax.objectives.causal_lm import CausalLM
from llmjax.objectives.span_corruption import SpanCorruption

ROLES = ("system", "user", "assistant")
_HEADER = re.compile(r"^<\|(system|user|assistant)\|>\n", re.M)


def render_chat(messages, add_generation_prompt: bool = False) -> str:
  """The template's text of `messages`; `add_generation_prompt`: then the assistant's header."""
  return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + (
      "<|assistant|>\n" if add_generation_prompt else "")


def parse_chat(text: str) -> list[dict[str, str]]:
  """The messages `render_chat` made `text` of (a generation prompt: an empty assistant's)."""
  parts = _HEADER.split(text)
  if parts[0]:
    raise ValueError(f"chat text must start with a role header such as '<|user|>': {text:.40}")
  return [{"role": role, "content": content[:-1] if content.endswith("\n") else content}
          for role, content in zip(parts[1::2], parts[2::2])]


def truncate_pair(a: np.ndarray, b: np.ndarray | None, budget: int):
  """(a, b) cut to `budget` ids in all by transformers' (fast) "longest_first": only the longer
  if the shorter fits in half, else both to half (the longer, on a tie b, keeps an odd id)."""
  if b is None or len(a) + len(b) <= budget:
    return a[:budget], b
  short = min(len(a), len(b))
  long = max(short, budget - short)  # the longer keeps what the shorter leaves, at least as many
  if short + long > budget:
    short, long = budget // 2, budget - budget // 2
  return (a[:long], b[:short]) if len(a) > len(b) else (a[:short], b[:long])


def _problem(record, keys, kinds=(str,), optional=False) -> str | None:
  """Why a field `keys` of `record` is missing or not of `kinds` (a bool is no number), or None."""
  for key in (k for k in keys if not optional or record.get(k) is not None):
    if key not in record:
      return f"no field {key!r}"
    if not isinstance(record[key], kinds) or isinstance(record[key], bool):
      return (f"field {key!r} is {type(record[key]).__name__}, expected "
              f"{' or '.join(k.__name__ for k in kinds)}")
  return None


class _Records(Objective):
  """What they share: the tokenizer, record checks (of the str `fields` needed), T5's decoder."""

  def __init__(self, tokenizer, length: int, **loss_options):
    if length < 1:
      raise ValueError(f"length={length} must be >= 1")
    super().__init__(tokenizer, **loss_options)
    self.tokenizer, self.length = tokenizer, length  # the tokenizer pickles (Grain workers)
    params = inspect.signature(tokenizer.encode).parameters
    self._plain = {"add_special_tokens": False} if "add_special_tokens" in params else {}

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text`, without the tokenizer's own specials where it can leave them out."""
    return np.asarray(self.tokenizer.encode(text, **self._plain), np.int32)

  def check_record(self, record: dict) -> str | None:
    """What is wrong with `record` (one line naming the field), or None."""
    return _problem(record, self.fields)

  def record(self, document, where: str = "record") -> dict:
    """`document` if it is a good record, else ValueError."""
    problem = (self.check_record(document) if isinstance(document, dict) else
               f"{type(self).__name__} reads JSON records, not {type(document).__name__} "
               f"documents: open the data with check_record=objective.check_record")
    if problem:
      raise ValueError(f"{where}: {problem}")
    return document

  def _records(self, source):  # every record of `source`, checked
    return (self.record(source[i], f"record {i} of {source}") for i in range(len(source)))

  def _set_decoder(self, decoder_start_id: int | None, target_length: int) -> None:
    """T5's decoder: `target_length` ids behind `decoder_start_id` (None: the pad id, as T5)."""
    self.tokenizer.require(eos_id=True)
    start = self.tokenizer.pad_id if decoder_start_id is None else decoder_start_id
    if start is None or not 0 <= start < self.tokenizer.vocab_size or target_length < 1:
      raise ValueError(f"decoder_start_id={start} (default: the pad id) must be an id in [0, "
                       f"{self.tokenizer.vocab_size}) and target_length={target_length} >= 1")
    self.start_id, self.target_length = start, target_length
    self.lengths = {"encoder_tokens": self.length, "decoder_targets": target_length,
                    "decoder_tokens": target_length}

  def decoder_features(self, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Decoder targets EOS (cut to fit) and the decoder's inputs: them shifted right."""
    targets = np.append(targets[:self.target_length - 1], self.tokenizer.eos_id).astype(np.int32)
    return {"decoder_targets": targets,
            "decoder_tokens": np.append(self.start_id, targets[:-1]).astype(np.int32)}


class Classification(_Records):
  """Classification (cross-entropy) or, with num_labels=1, regression (MSE) of texts or pairs.
  `label_names` (comma-separated): T5's label words (default: the number). A tokenizer without
  [CLS]/[SEP] uses BOS/EOS, or none if it lacks those too."""

  fields = ("text",)
  not_settings = ("architecture",)  # keyword-only, but no config setting: from_config passes it

  def __init__(self, tokenizer, length: int, *, num_labels: int = 2,
               label_names: str | None = None, decoder_start_id: int | None = None,
               architecture: str | None = None, **loss_options):
    names = [n.strip() for n in label_names.split(",")] if label_names else None
    if architecture not in ("encoder", "decoder", "encoder_decoder"):
      raise ValueError(f"classification needs architecture='encoder', 'decoder' or "
                       f"'encoder_decoder' (the model's ARCHITECTURE), not {architecture!r}")
    if num_labels < 1 or names is not None and not len(names) == len(set(names)) == num_labels:
      raise ValueError(f"num_labels={num_labels} must be >= 1 (1: regression) and label_names="
                       f"{label_names!r} name each label once")
    if num_labels == 1 and architecture == "encoder_decoder":
      raise ValueError("regression on an encoder-decoder is text-to-text: use seq2seq")
    super().__init__(tokenizer, length, **loss_options)
    self.num_labels, self.label_names, self.architecture = num_labels, label_names, architecture
    self.architectures, t, listed = (architecture,), tokenizer, lambda i: [] if i is None else [i]
    head, sep = ((listed(t.cls_id), listed(t.sep_id)) if t.cls_id is not None else
                 (listed(t.bos_id), listed(t.eos_id)))
    # The specials before a, after a and after b, without a pair and with one (T5 joins them).
    self._layout = {"encoder": {False: (head, sep, []), True: (head, sep, sep)},
                    "decoder": {False: ([], [], []), True: ([], listed(t.eos_id), [])},
                    "encoder_decoder": {False: ([], listed(t.eos_id), [])}}[architecture]
    if length < 2 + sum(map(len, self._layout[architecture != "encoder_decoder"])):
      raise ValueError(f"length={length} leaves no room for a text pair and its special tokens")
    # Label slots: packed rows hold up to length // 8 examples, each classified at its own
    # [CLS] (BERT) or last token (GPT); "pad" packing fills one slot a row.
    self.lengths = {"tokens": length, "token_types": length, "label": max(1, length // 8)}
    if architecture == "encoder_decoder":
      self.targets_key, self.weights_key = "decoder_targets", "decoder_weights"
      self._label_ids = [self.encode(n) for n in names or map(str, range(num_labels))]
      self._set_decoder(decoder_start_id, 1 + max(map(len, self._label_ids)))

  def check_model(self, model) -> None:
    """Also: an encoder or decoder must have a classification head of num_labels outputs."""
    super().check_model(model)
    cfg = getattr(model, "cfg", None)
    head, n = getattr(cfg, "head", "classify"), getattr(cfg, "num_labels", self.num_labels)
    if self.architecture != "encoder_decoder" and (head != "classify" or n != self.num_labels):
      raise ValueError(f"objective.num_labels={self.num_labels} needs model.head='classify' and "
                       f"model.num_labels={self.num_labels}; the model has head={head!r}, "
                       f"num_labels={n}")

  def check_record(self, record: dict) -> str | None:
    problem = (super().check_record(record) or _problem(record, ["text_pair"], optional=True)
               or _problem(record, ["label"], (int, float)))
    label, n = record.get("label"), self.num_labels
    if problem or (math.isfinite(label) if n == 1 else 0 <= label < n and label == int(label)):
      return problem
    return (f"label {label} is not a finite number" if n == 1 else
            f"label {label} is outside num_labels={n} (expected 0..{n - 1})")

  def encode_pair(self, text: str, text_pair: str | None = None,
                  length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, token_types) the model reads, cut to `length` (default: the objective's) as
    transformers cuts pairs; T5 reads "text text_pair" EOS."""
    if self.architecture == "encoder_decoder" and text_pair is not None:
      text, text_pair = f"{text} {text_pair}", None
    a, b = self.encode(text), None if text_pair is None else self.encode(text_pair)
    head, tail_a, tail_b = self._layout[b is not None]
    a, b = truncate_pair(a, b, (length or self.length) - len(head) - len(tail_a) - len(tail_b))
    first = np.concatenate([head, a, tail_a])
    second = np.zeros(0) if b is None else np.concatenate([b, tail_b])
    return (np.concatenate([first, second]).astype(np.int32),
            np.repeat([0, 1], [len(first), len(second)]).astype(np.int32))

  def examples(self, document, rng) -> list[dict[str, np.ndarray]]:
    record = self.record(document)
    label = float(record["label"]) if self.num_labels == 1 else int(record["label"])
    tokens, types = self.encode_pair(record["text"], record.get("text_pair"))
    if self.architecture == "encoder_decoder":
      return [{"encoder_tokens": tokens, **self.decoder_features(self._label_ids[label])}]
    return [{"tokens": tokens, "token_types": types,
             "label": np.array([label], np.float32 if self.num_labels == 1 else np.int32)}]

  def check_source(self, source) -> str:
    """The label counts (or range) and how many examples are cut to `length`."""
    labels, cut = collections.Counter(), 0
    for r in self._records(source):
      labels[r["label"]] += 1
      cut += len(self.encode_pair(r["text"], r.get("text_pair"), 1 << 30)[0]) > self.length
    shown = (f"in [{min(labels):g}, {max(labels):g}]" if self.num_labels == 1 else
             ", ".join(f"{k}: {labels[k]:,}" for k in range(self.num_labels)))
    return f"classification: {len(source):,} examples, labels {shown}; {cut:,} cut to {self.length}"

  def batch(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if self.architecture == "encoder_decoder":
      return SpanCorruption.batch(self, rows)
    segment_ids, positions = segments(rows, "tokens")
    slots_BP = rows["label_segment_ids"]  # the example (segment id) of each label slot, 0: none
    in_BPL = segment_ids[:, None, :] == np.where(slots_BP > 0, slots_BP, -1)[:, :, None]
    last = in_BPL.shape[-1] - 1 - np.argmax(in_BPL[..., ::-1], axis=-1)
    pool_BP = np.argmax(in_BPL, axis=-1) if self.architecture == "encoder" else last
    return {"tokens": rows["tokens"], "token_types": rows["token_types"],
            "segment_ids": segment_ids, "positions": positions,
            "pool_positions": np.where(slots_BP > 0, pool_BP, 0).astype(np.int32),
            "targets": rows["label"].astype(np.float32 if self.num_labels == 1 else np.int32),
            "weights": (slots_BP > 0).astype(np.float32)}

  def model_args(self, batch):
    if self.architecture == "encoder_decoder":
      return SpanCorruption.model_args(self, batch)
    keys = ("segment_ids", "positions", "pool_positions") + ("token_types",) * (
        self.architecture == "encoder")
    return (batch["tokens"],), {k: batch[k] for k in keys}

  def loss(self, logits_BC, batch):
    """Cross-entropy over logits [B, P, num_labels] (regression: MSE of logits[..., 0]); with
    two labels, the sums add tp/fp/fn of label 1."""
    if self.architecture == "encoder_decoder":
      return super().loss(logits_BC, batch)
    logits_BC, w_B, t_B = logits_BC.astype(jnp.float32), batch["weights"], batch["targets"]
    if self.num_labels == 1:
      p_B, t_B = logits_BC[..., 0], t_B.astype(jnp.float32)
      se = jnp.sum(w_B * jnp.square(p_B - t_B))
      sums = {"loss": se, "nll": se, "weight": jnp.sum(w_B),  # correct: the same integer
              "correct": jnp.sum(w_B * (jnp.round(p_B) == jnp.round(t_B)))}
    else:
      sums = cross_entropy(logits_BC, t_B, w_B, **self.loss_options)
      if self.num_labels == 2:
        pred_B, true_B = jnp.argmax(logits_BC, axis=-1) == 1, t_B == 1
        sums.update({k: jnp.sum(w_B * v) for k, v in (
            ("tp", pred_B & true_B), ("fp", pred_B & ~true_B), ("fn", ~pred_B & true_B))})
    return sums["loss"] / jnp.maximum(sums["weight"], 1.0), sums

  def metrics(self, sums) -> dict[str, float]:
    """{"f1"} of label 1 when there are two labels, else {}."""
    tp, fp, fn = (float(sums.get(k, 0)) for k in ("tp", "fp", "fn"))
    return {"f1": 2 * tp / max(2 * tp + fp + fn, 1e-9)} if "tp" in sums else {}


class SFT(_Records):
  """Decoder fine-tuning on [BOS] prompt response EOS (no template) or chat `messages`, loss only
  on responses and their EOS; cut to `length` + 1 ids, an example whose prompt leaves no room
  for a response token is skipped (check_source counts them)."""

  architectures = ("decoder",)

  def __init__(self, tokenizer, length: int, *, add_bos: bool = True, **loss_options):
    tokenizer.require(bos_id=add_bos, eos_id=True)
    super().__init__(tokenizer, length, **loss_options)
    self.add_bos, self.lengths = add_bos, {"tokens": length, "targets": length, "weights": length}

  def check_record(self, record: dict) -> str | None:
    if "messages" not in record:
      problem = _problem(record, ("prompt", "response"))
      return problem and problem + " (nor 'messages')"
    messages = record["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
      return f"field 'messages' is {messages!r:.40}, expected a list of objects"
    for i, m in enumerate(messages):
      problem = _problem(m, ("role", "content")) or (m["role"] not in ROLES and (
          f"role {m['role']!r} is not one of {ROLES}")) or (_HEADER.search(m["content"]) and (
              "content holds a line that is a role header, such as '<|user|>'"))
      if problem:
        return f"message {i}: {problem}"
    return None if any(m["role"] == "assistant" for m in messages) else (
        "'messages' has no assistant message to train on")

  def tokens(self, record: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ids, is_response) of a whole record, uncut."""
    eos, pieces = [self.tokenizer.eos_id], [([self.tokenizer.bos_id] if self.add_bos else [], 0)]
    if "messages" not in record:
      pieces += [(record["prompt"], 0), (record["response"], 1), (eos, 1)]
    for m in record.get("messages", ()):  # each piece (text or ids, is it response?)
      pieces += ([("<|assistant|>\n", 0), (m["content"], 1), (eos, 1), ("\n", 0)]
                 if m["role"] == "assistant" else [(render_chat([m]), 0)])
    ids = [self.encode(p) if isinstance(p, str) else p for p, _ in pieces]
    return (np.concatenate(ids).astype(np.int32),
            np.repeat([r for _, r in pieces], list(map(len, ids))).astype(bool))

  def examples(self, document, rng) -> list[dict[str, np.ndarray]]:
    ids, response = (x[:self.length + 1] for x in self.tokens(self.record(document)))
    weights = response[1:].astype(np.float32)  # weights go with the targets, ids[1:]
    return [{"tokens": ids[:-1], "targets": ids[1:], "weights": weights}] if weights.any() else []

  def check_source(self, source) -> str:
    """Counts the examples skipped (no response within `length`) and cut; ValueError if all are."""
    n, skipped, cut = len(source), 0, 0
    for response in (self.tokens(record)[1] for record in self._records(source)):
      skipped, cut = skipped + (np.argmax(response) > self.length), cut + (
          len(response) > self.length + 1)
    if skipped == n:
      raise ValueError(f"sft: every prompt is longer than length={self.length}: nothing to train")
    return (f"sft: {skipped:,} of {n:,} examples have prompts longer than {self.length} tokens "
            f"(no room for a response); skipped. {cut:,} cut to {self.length + 1} tokens")

  model_args = CausalLM.model_args


class Seq2Seq(_Records):
  """Encoder-decoder fine-tuning (T5): `inputs` EOS (cut to `length`) -> `targets` EOS (cut to
  `target_length`, default `length`), the decoder reading them behind `decoder_start_id`."""

  fields = ("inputs", "targets")
  targets_key, weights_key = "decoder_targets", "decoder_weights"
  architectures = ("encoder_decoder",)

  def __init__(self, tokenizer, length: int, *, target_length: int | None = None,
               decoder_start_id: int | None = None, **loss_options):
    super().__init__(tokenizer, length, **loss_options)
    self._set_decoder(decoder_start_id, target_length or length)

  def examples(self, document, rng) -> list[dict[str, np.ndarray]]:
    record, eos = self.record(document), self.tokenizer.eos_id
    return [{"encoder_tokens": np.append(self.encode(record["inputs"])[:self.length - 1], eos)
             .astype(np.int32), **self.decoder_features(self.encode(record["targets"]))}]

  def check_source(self, source) -> str:
    """How many inputs and targets are cut."""
    inputs, targets = np.array([(len(self.encode(r["inputs"])) >= self.length,
                                 len(self.encode(r["targets"])) >= self.target_length)
                                for r in self._records(source)]).reshape(-1, 2).sum(0)
    return (f"seq2seq: {len(source):,} examples; {inputs:,} inputs cut to {self.length} tokens, "
            f"{targets:,} targets to {self.target_length}")

  batch = SpanCorruption.batch  # the same batch keys and model call as T5's pre-training
  model_args = SpanCorruption.model_args
