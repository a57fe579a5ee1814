"""(query, document) pairs to model inputs, the way the model was trained: `[CLS] query [SEP] document [SEP]`.

Queries and documents are encoded without special tokens, then laid out with the tokenizer's own
pair template, so an input equals transformers' batched
`tokenizer([query], [document], truncation="only_second")`, the call sentence-transformers'
CrossEncoder makes (an empty document keeps its [SEP]: `[CLS] query [SEP] [SEP]`). The query is
kept whole; the document is cut (END), refused (NONE) or split into overlapping windows (CHUNK)
when the pair is longer than max_length.

Only as much text is tokenized as the answer needs: a document that will be cut at 8192 tokens is
encoded from a prefix that ends just before a whitespace (where byte-level BPE's pre-tokenizer
splits anyway, so the tokens are the same as the full text's), which keeps a 10 MB document from
costing seconds.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

# First guess of characters per token when cutting a prefix; the cut grows when it was too short.
_CHARS_PER_TOKEN = 8
_GROWTH = 4


class Truncation(enum.Enum):
    END = "end"
    NONE = "none"
    CHUNK = "chunk"


@dataclass(frozen=True)
class EncodeOptions:
    max_length: int
    max_query_tokens: int
    max_total_tokens: int
    truncation: Truncation = Truncation.END
    chunk_overlap: int | None = None  # None: default_chunk_overlap, capped at half a window
    default_chunk_overlap: int = 64


@dataclass(frozen=True)
class TokenizedPairs:
    """Model inputs as a ragged batch, and how they map back to the caller's pairs.

    Every input's ids are laid end to end in `input_ids`; `owners[i]` is the caller's pair that
    input i belongs to (non-decreasing: a pair's windows are consecutive).
    """

    input_ids: np.ndarray  # int32 [total_tokens]
    lengths: np.ndarray  # int32 [inputs]
    owners: np.ndarray  # int32 [inputs]
    windows: np.ndarray  # int32 [pairs]: inputs per pair (1 unless CHUNK)
    truncated: np.ndarray  # bool [pairs]: the document was cut (END)

    @property
    def total_tokens(self) -> int:
        return int(self.input_ids.size)

    def best_per_pair(self, logits: np.ndarray) -> np.ndarray:
        """The highest logit of each pair's inputs (its windows), in pair order."""
        starts = np.concatenate(([0], np.cumsum(self.windows)[:-1]))
        return np.maximum.reduceat(logits, starts) if logits.size else logits


class EncodingError(ValueError):
    """A pair cannot be encoded under the options.

    `part` says what is at fault ("query", "document", "total", or an option's name) and `index`
    which pair, so that each API surface can name its own request field.
    """

    def __init__(self, part: str, description: str, index: int | None = None) -> None:
        super().__init__(description)
        self.part = part
        self.description = description
        self.index = index


class QueryTooLongError(EncodingError):
    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__("query", f"the query is {tokens} tokens long; the limit is {limit} (max_query_tokens)", index)


class PairTooLongError(EncodingError):
    def __init__(self, index: int, length: str, max_length: int) -> None:
        super().__init__(
            "document",
            f"document {index} does not fit: with the query it is {length} tokens long and max_length is "
            f"{max_length} (truncation NONE)",
            index,
        )


class TooManyTokensError(EncodingError):
    def __init__(self, limit: int) -> None:
        super().__init__("total", f"the request needs more than {limit} tokens over all its pairs (max_total_tokens)")


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


def _safe_cut(text: str, limit: int) -> int:
    """A cut at or before `limit` that falls just before a whitespace following a non-whitespace.

    Byte-level BPE pre-tokenizes at such points, so the tokens of text[:cut] are a prefix of the
    text's tokens. Without such a point in the upper half (a whitespace run, one huge word), cut
    at `limit`.
    """
    for cut in range(limit, limit // 2, -1):
        if text[cut].isspace() and not text[cut - 1].isspace():
            return cut
    return limit


class PairTokenizer:
    """Tokenizes (query, document) pairs into a TokenizedPairs ragged batch."""

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

    def describe(self) -> str:
        model = type(self.tokenizer.model).__name__
        return f"{model}, {self.tokenizer.get_vocab_size(with_added_tokens=True)} ids"

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_prefixes(self, texts: Sequence[str], needs: Sequence[int]) -> list[list[int]]:
        """Token ids of each text, or at least its first needs[i] + 1 (exact) when it has more."""
        results: list[list[int] | None] = [None] * len(texts)
        limits = [max(64, (need + 1) * _CHARS_PER_TOKEN) for need in needs]
        pending = list(range(len(texts)))
        while pending:
            cuts = [len(texts[i]) if len(texts[i]) <= limits[i] else _safe_cut(texts[i], limits[i]) for i in pending]
            encodings = self.tokenizer.encode_batch(
                [texts[i][:cut] for i, cut in zip(pending, cuts, strict=True)], add_special_tokens=False
            )
            still = []
            for i, cut, encoding in zip(pending, cuts, encodings, strict=True):
                ids = encoding.ids
                if cut == len(texts[i]) or len(ids) > needs[i]:
                    results[i] = ids
                else:  # the prefix was too short to tell: cut longer
                    limits[i] *= _GROWTH
                    still.append(i)
            pending = still
        return [r for r in results if r is not None]

    def encode(self, queries: Sequence[str], documents: Sequence[str], options: EncodeOptions) -> TokenizedPairs:
        """Encode the pairs (queries[i], documents[i]); raises an EncodingError naming the field at fault."""
        if options.max_length > self.max_length:
            raise EncodingError("max_length", f"max_length {options.max_length} exceeds the model's {self.max_length}")
        specials = self.template.special_tokens
        if options.max_length < specials + 2:
            raise EncodingError("max_length", f"max_length {options.max_length} leaves no room for text")
        query_limit = min(options.max_query_tokens, options.max_length - specials - 1)
        distinct = list(dict.fromkeys(queries))
        query_ids: dict[str, list[int]] = {}
        for query, ids in zip(distinct, self.encode_prefixes(distinct, [query_limit] * len(distinct)), strict=True):
            if len(ids) > query_limit:
                index = queries.index(query)
                tokens = len(ids) if len(ids) <= query_limit + 1 else self.count_tokens(query)
                raise QueryTooLongError(index, tokens, query_limit)
            query_ids[query] = ids

        rooms = [options.max_length - specials - len(query_ids[q]) for q in queries]
        # CHUNK needs every token (up to the request's budget); END and NONE only enough to fill the room.
        needs = [options.max_total_tokens] * len(documents) if options.truncation is Truncation.CHUNK else rooms
        document_ids = self.encode_prefixes(documents, needs)

        pieces: list[np.ndarray] = []
        lengths: list[int] = []
        owners: list[int] = []
        windows = np.zeros(len(documents), dtype=np.int32)
        truncated = np.zeros(len(documents), dtype=bool)
        total = 0
        heads = {
            q: np.array([*self.template.prefix, *ids, *self.template.middle], dtype=np.int32)
            for q, ids in query_ids.items()
        }
        tail = np.array(self.template.suffix, dtype=np.int32)
        for index, (query, doc_ids, room) in enumerate(zip(queries, document_ids, rooms, strict=True)):
            if options.truncation is Truncation.NONE and len(doc_ids) > room:
                length = self._pair_length(len(query_ids[query]), documents[index], options)
                raise PairTooLongError(index, length, options.max_length)
            spans = self._spans(len(doc_ids), room, options)
            truncated[index] = options.truncation is Truncation.END and len(doc_ids) > room
            windows[index] = len(spans)
            head = heads[query]
            for start, end in spans:
                pieces += (head, np.asarray(doc_ids[start:end], dtype=np.int32), tail)
                lengths.append(head.size + (end - start) + tail.size)
                owners.append(index)
                total += lengths[-1]
                if total > options.max_total_tokens:
                    raise TooManyTokensError(options.max_total_tokens)
        return TokenizedPairs(
            input_ids=np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32),
            lengths=np.asarray(lengths, dtype=np.int32),
            owners=np.asarray(owners, dtype=np.int32),
            windows=windows,
            truncated=truncated,
        )

    def _pair_length(self, query_tokens: int, document: str, options: EncodeOptions) -> str:
        """The pair's length for an error message; past the request's token budget only a bound."""
        tokens = len(self.encode_prefixes([document], [options.max_total_tokens])[0])
        length = query_tokens + tokens + self.template.special_tokens
        return str(length) if tokens <= options.max_total_tokens else f"more than {options.max_total_tokens}"

    def _spans(self, tokens: int, room: int, options: EncodeOptions) -> list[tuple[int, int]]:
        """The [start, end) document-token spans of a pair's model inputs."""
        if tokens <= room:
            return [(0, tokens)]
        if options.truncation is Truncation.END:
            return [(0, room)]
        overlap = options.chunk_overlap
        if overlap is None:
            overlap = min(options.default_chunk_overlap, room // 2)
        elif overlap >= room:
            raise EncodingError(
                "chunk_overlap", f"chunk_overlap {overlap} must be smaller than a window's {room} document tokens"
            )
        stride = room - overlap
        last = -(-(tokens - room) // stride)  # windows until one reaches the end
        return [(k * stride, min(k * stride + room, tokens)) for k in range(last + 1)]
