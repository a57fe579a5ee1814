"""The reference the service is checked against: transformers eager, one pair at a time, unpadded."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, ModernBertForSequenceClassification


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
