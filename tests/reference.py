"""The reference the service is checked against: transformers eager, one pair at a time, unpadded."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, ModernBertForSequenceClassification


class EagerReranker:
    def __init__(self, checkpoint: Path) -> None:
        self.model = ModernBertForSequenceClassification.from_pretrained(checkpoint, attn_implementation="eager").eval()
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
    def logits(self, query: str, documents: Sequence[str]) -> np.ndarray:
        out = [self.model(input_ids=torch.tensor([self.encode(query, d)])).logits[0, 0].item() for d in documents]
        return np.array(out, dtype=np.float64)


@cache
def eager(checkpoint: Path) -> EagerReranker:
    return EagerReranker(checkpoint)
