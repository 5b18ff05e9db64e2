"""Retrieval: recall@k and MRR of an embedding model on query -> passage tasks. Cosine
similarity is the dot product of unit embeddings (decode.embed normalizes), computed exactly
in float64 numpy; passages rank by descending score, equal scores by ascending passage index."""

import numpy as np

from llmjax import decode
from llmjax.data.hf_tokenizer import HFTokenizer
from llmjax.models.bert import Bert


def _checked(query_vectors, passage_vectors) -> tuple[np.ndarray, np.ndarray]:
  q_QD, p_PD = np.asarray(query_vectors, np.float64), np.asarray(passage_vectors, np.float64)
  if q_QD.ndim != 2 or q_QD.shape[1:] != p_PD.shape[1:] or not q_QD.size * p_PD.size:
    raise ValueError(f"retrieval: vectors {q_QD.shape}, {p_PD.shape}; expected [Q, D], [P, D]")
  return q_QD, p_PD


def search(query_vectors, passage_vectors, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The k best passages of each query, best first: (int indices [Q, k], scores [Q, k])."""
  q_QD, p_PD = _checked(query_vectors, passage_vectors)
  if int(k) != k or not 1 <= k <= len(p_PD):
    raise ValueError(f"retrieval: k={k}; expected 1..{len(p_PD)} (the number of passages)")
  s_QP = q_QD @ p_PD.T
  top_Qk = np.argsort(-s_QP, axis=1, kind="stable")[:, :int(k)]  # stable: ties by index
  return top_Qk, np.take_along_axis(s_QP, top_Qk, axis=1)


def ranks(query_vectors, passage_vectors, relevant) -> np.ndarray:
  """Rank (1 = best) of passage relevant[i] among all passages for query i, int [Q]."""
  q_QD, p_PD = _checked(query_vectors, passage_vectors)
  r_Q = np.asarray(relevant)
  if r_Q.shape != (len(q_QD),) or r_Q.dtype.kind not in "iu":
    raise ValueError(f"retrieval: relevant is {r_Q.dtype} {r_Q.shape}; expected {len(q_QD)} ints")
  bad = np.flatnonzero((r_Q < 0) | (r_Q >= len(p_PD)))
  if len(bad):
    raise ValueError(f"retrieval: relevant[{bad[0]}]={r_Q[bad[0]]} is not in [0, {len(p_PD)})")
  out_Q = np.empty(len(q_QD), np.int64)
  for s in range(0, len(q_QD), 1024):  # scores [1024, P] at a time
    s_QP, rel_Q1 = q_QD[s:s + 1024] @ p_PD.T, r_Q[s:s + 1024, None]
    mine_Q1 = np.take_along_axis(s_QP, rel_Q1, axis=1)
    above_QP = (s_QP > mine_Q1) | ((s_QP == mine_Q1) & (np.arange(len(p_PD)) < rel_Q1))
    out_Q[s:s + 1024] = 1 + above_QP.sum(axis=1)
  return out_Q


def score(query_vectors, passage_vectors, relevant, ks=(1, 5, 10)) -> dict[str, float]:
  """{"recall@k" for k in ks, "mrr"} of the ranks; relevant[i]: query i's passage index."""
  r_Q = ranks(query_vectors, passage_vectors, relevant)
  return {**{f"recall@{k}": float(np.mean(r_Q <= k)) for k in ks}, "mrr": float(np.mean(1 / r_Q))}


def encode(model, params, tokenizer, texts, *, batch_size: int = 64, max_length=None,
           pooling: str = "mean") -> np.ndarray:
  """Unit embeddings of `texts`, float32 [N, D], as sentence-transformers computes them.

  Ids are `tokenizer.encode`'s (an llmjax tokenizer's wrapped as llmjax trains: [CLS] ids [SEP],
  T5: ids EOS), cut to `max_length` (default a Bert's max_seq_len) keeping a final special as
  transformers does; rows run shortest first, in padded batches of length buckets."""
  cap, rows = model.cfg.max_seq_len if isinstance(model, Bert) else None, []
  for text in texts:
    ids = tokenizer.encode(text).tolist()
    if not isinstance(tokenizer, HFTokenizer):
      specials = (tokenizer.cls_id, tokenizer.sep_id) if cap else (None, tokenizer.eos_id)
      ids = [i for i in (specials[0], *ids, specials[1]) if i is not None]
    n = max_length or cap or len(ids)
    cut = len(ids) > n and ids[-1] in tokenizer.special_ids  # keep the final [SEP] / EOS
    rows.append(ids[:n - 1] + ids[-1:] if cut else ids[:n])
  if isinstance(texts, str) or not rows or not all(rows) or batch_size < 1:
    raise ValueError(f"encode: {len(rows)} texts, batch_size={batch_size}; want >= 1, none empty")
  order, B, vectors = np.argsort([len(r) for r in rows]), min(batch_size, len(rows)), []
  for s in range(0, len(rows), B):
    batch = [rows[i] for i in order[s:s + B]]
    T = decode.bucket(max(len(r) for r in batch), cap)
    tokens_BT, segment_ids_BT = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b, row in enumerate(batch + batch[-1:] * (B - len(batch))):  # copies fill the last
      tokens_BT[b, :len(row)], segment_ids_BT[b, :len(row)] = row, 1
    v_BD = decode.embed(model, params, tokens_BT, segment_ids_BT, pooling=pooling)
    vectors.append(np.asarray(v_BD, np.float32)[:len(batch)])
  return np.concatenate(vectors)[np.argsort(order)]
