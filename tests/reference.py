"""The reference the service is checked against: transformers eager, one pair at a time, unpadded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, ModernBertForSequenceClassification

from rerank_server.testing import narrow_logits
from tests.texts import text


class EagerReranker:
    """transformers eager execution (no compilation, no padding); attention "eager" or, for 8192-token
    inputs whose eager attention matrices would take gigabytes, "sdpa"."""

    def __init__(self, checkpoint: Path, attention: str = "eager") -> None:
        self.model = ModernBertForSequenceClassification.from_pretrained(
            checkpoint, attn_implementation=attention
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.max_length = min(self.model.config.max_position_embeddings, self.tokenizer.model_max_length)

    def encode(self, query: str, document: str, max_length: int | None = None) -> list[int]:
        # The batched call, as sentence-transformers' CrossEncoder makes it: unlike the single-pair
        # call, it keeps the pair template for an empty document ([CLS] q [SEP] [SEP]).
        ids: list[int] = self.tokenizer(
            [query], [document], truncation="only_second", max_length=max_length or self.max_length
        )["input_ids"][0]
        return ids

    @torch.no_grad()
    def logits_of_ids(self, ids: Sequence[int]) -> float:
        return float(self.model(input_ids=torch.tensor([list(ids)])).logits[0, 0].item())

    def logits(self, query: str, documents: Sequence[str], max_length: int | None = None) -> np.ndarray:
        return np.array([self.logits_of_ids(self.encode(query, d, max_length)) for d in documents], dtype=np.float64)

    def chunk_logits(self, query: str, document: str, max_length: int, overlap: int) -> tuple[float, int]:
        """Max over hand-made windows of the document, each with the query: (best logit, windows)."""
        query_ids = self.tokenizer(query, add_special_tokens=False)["input_ids"]
        doc_ids = self.tokenizer(document, add_special_tokens=False)["input_ids"]
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        room = max_length - len(query_ids) - 3
        logits, start = [], 0
        while True:
            window = doc_ids[start : start + room]
            logits.append(self.logits_of_ids([cls, *query_ids, sep, *window, sep]))
            if start + room >= len(doc_ids):
                return max(logits), len(logits)
            start += room - overlap


@cache
def eager(checkpoint: Path, attention: str = "eager") -> EagerReranker:
    return EagerReranker(checkpoint, attention)


@dataclass(frozen=True)
class CloseCandidates:
    """A query and 200 documents whose fp32 logits lie within about ±1 of each other around 2.5, on a
    checkpoint rescaled so: fp32 keeps them all distinct, bf16's resolution there (steps of 1/128 to
    1/64) would merge most of them. What the distinct-logit tests count on."""

    checkpoint: Path
    query: str
    documents: list[str]
    expected: np.ndarray  # eager fp32, one pair at a time

    def ragged(self) -> tuple[np.ndarray, np.ndarray]:
        """The pairs' ids end to end, and their lengths."""
        encoded = [eager(self.checkpoint).encode(self.query, d) for d in self.documents]
        return np.concatenate(encoded).astype(np.int64), np.array([len(e) for e in encoded], dtype=np.int64)


def distinct(logits: np.ndarray) -> int:
    return len(set(np.asarray(logits, dtype=np.float32).tolist()))


def close_candidates(source: Path, folder: Path, count: int = 200) -> CloseCandidates:
    """`source`'s encoder with its classifier rescaled (logits: standard deviation 0.3 around 2.5), saved
    to `folder` with the tokenizer, and `count` documents of 20-120 words against one query."""
    query = "how to implement quick sort in python?"
    documents = [text(20 + (i * 37) % 100, seed=1000 + i) for i in range(count)]
    narrow_logits(source, folder, EagerReranker(source).logits(query, documents))
    expected = eager(folder).logits(query, documents)
    if distinct(expected) != count or distinct(torch.tensor(expected).bfloat16().float().numpy()) > 0.8 * count:
        raise AssertionError("the candidates are not close enough, or fp32 itself ties some")
    return CloseCandidates(folder, query, documents, expected)
