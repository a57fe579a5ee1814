"""(query, document) pairs to token ids, the way the model was trained: `[CLS] query [SEP] document [SEP]`.

The query and the documents are encoded without special tokens, then laid out with the tokenizer's
own pair template, so the ids equal transformers' batched
`tokenizer([query], [document], truncation="only_second")`, the call sentence-transformers'
CrossEncoder makes (an empty document keeps its [SEP]: `[CLS] query [SEP] [SEP]`). Only the
document is cut to fit `max_length`; the query is kept whole (queries longer than the configured
limit are refused before this step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass(frozen=True)
class TokenizedPairs:
    """A ragged batch: every pair's ids laid end to end, and each pair's length."""

    input_ids: np.ndarray  # int32 [total_tokens]
    lengths: np.ndarray  # int32 [pairs]
    truncated: np.ndarray  # bool [pairs]: the document was cut to fit

    @property
    def total_tokens(self) -> int:
        return int(self.input_ids.size)


@dataclass(frozen=True)
class PairTemplate:
    """Special tokens around the two sequences of a pair, e.g. [CLS] | [SEP] | [SEP]."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]

    @property
    def special_tokens(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> PairTemplate:
        """Read the template off the tokenizer's post-processor by encoding a sample pair."""
        encoding = tokenizer.encode("a", "b", add_special_tokens=True)
        sequence_ids = encoding.sequence_ids
        first = [i for i, s in enumerate(sequence_ids) if s == 0]
        second = [i for i, s in enumerate(sequence_ids) if s == 1]
        if not first or not second:
            raise ValueError("the tokenizer does not encode sentence pairs")
        ids = encoding.ids
        return cls(tuple(ids[: first[0]]), tuple(ids[first[-1] + 1 : second[0]]), tuple(ids[second[-1] + 1 :]))


class QueryTooLongError(ValueError):
    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"the query is {tokens} tokens long; the limit is {limit}")
        self.tokens = tokens
        self.limit = limit


class PairTokenizer:
    """Tokenizes a query against many documents into a TokenizedPairs ragged batch."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.template = PairTemplate.of(tokenizer)
        if max_length <= self.template.special_tokens + 1:
            raise ValueError(f"max_length {max_length} leaves no room for text")
        self.max_length = max_length

    @classmethod
    def from_dir(cls, folder: Path, max_length: int) -> PairTokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        return cls(Tokenizer.from_file(str(path)), max_length)

    def max_query_tokens(self) -> int:
        """The longest query that still leaves room for one document token."""
        return self.max_length - self.template.special_tokens - 1

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode(self, query: str, documents: Sequence[str], max_query_tokens: int | None = None) -> TokenizedPairs:
        """Encode (query, document) for every document; raises QueryTooLongError past the query limit."""
        limit = self.max_query_tokens() if max_query_tokens is None else min(max_query_tokens, self.max_query_tokens())
        query_ids = self.tokenizer.encode(query, add_special_tokens=False).ids
        if len(query_ids) > limit:
            raise QueryTooLongError(len(query_ids), limit)
        head = np.array([*self.template.prefix, *query_ids, *self.template.middle], dtype=np.int32)
        tail = np.array(self.template.suffix, dtype=np.int32)
        room = self.max_length - head.size - tail.size
        pieces: list[np.ndarray] = []
        lengths = np.empty(len(documents), dtype=np.int32)
        truncated = np.zeros(len(documents), dtype=bool)
        for i, encoding in enumerate(self.tokenizer.encode_batch(list(documents), add_special_tokens=False)):
            doc_ids = encoding.ids
            if len(doc_ids) > room:
                doc_ids = doc_ids[:room]
                truncated[i] = True
            pieces += (head, np.asarray(doc_ids, dtype=np.int32), tail)
            lengths[i] = head.size + len(doc_ids) + tail.size
        input_ids = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32)
        return TokenizedPairs(input_ids=input_ids, lengths=lengths, truncated=truncated)
