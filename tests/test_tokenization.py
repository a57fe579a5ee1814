"""PairTokenizer equals transformers' pair encoding (the one the model was trained with)."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from rerank_server.tokenization import PairTemplate, PairTokenizer, QueryTooLongError
from tests.conftest import TOKENIZER_DIR
from tests.texts import mixed_documents, text

DOCUMENTS = [
    *mixed_documents(),
    "",
    " leading and trailing spaces ",
    "北京是中国的首都。",
    "مرحبا بالعالم",
    "emoji 🚀🔥 and combining e\u0301 and zero\u200bwidth",
    "line\nbreaks\tand\ttabs",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.mark.parametrize("max_length", [13, 64, 512, 8192])
def test_pairs_equal_transformers_batched_pair_encoding(hf_tokenizer, max_length: int) -> None:
    query = "how to implement quick sort in python?"
    tokenizer = PairTokenizer.from_dir(TOKENIZER_DIR, max_length)
    pairs = tokenizer.encode(query, DOCUMENTS)
    expected = hf_tokenizer([query] * len(DOCUMENTS), DOCUMENTS, truncation="only_second", max_length=max_length)
    offsets = np.concatenate(([0], np.cumsum(pairs.lengths)))
    for i, ids in enumerate(expected["input_ids"]):
        assert pairs.input_ids[offsets[i] : offsets[i + 1]].tolist() == ids, DOCUMENTS[i][:40]
    full = hf_tokenizer([query] * len(DOCUMENTS), DOCUMENTS)["input_ids"]
    assert pairs.truncated.tolist() == [len(f) > max_length for f in full]
    assert pairs.input_ids.dtype == np.int32 and pairs.total_tokens == int(pairs.lengths.sum())


def test_template_is_read_off_the_tokenizer() -> None:
    template = PairTemplate.of(PairTokenizer.from_dir(TOKENIZER_DIR, 64).tokenizer)
    assert template == PairTemplate(prefix=(50281,), middle=(50282,), suffix=(50282,))


def test_the_query_is_kept_whole_or_refused() -> None:
    tokenizer = PairTokenizer.from_dir(TOKENIZER_DIR, 64)
    query = text(20)
    pairs = tokenizer.encode(query, [text(200)])
    assert pairs.lengths.tolist() == [64]
    assert (
        pairs.input_ids[1 : 1 + tokenizer.count_tokens(query)].tolist()
        == tokenizer.tokenizer.encode(query, add_special_tokens=False).ids
    )
    with pytest.raises(QueryTooLongError, match="the limit is 10"):
        tokenizer.encode(query, ["doc"], max_query_tokens=10)
    with pytest.raises(QueryTooLongError, match="the limit is 60"):
        tokenizer.encode(text(80), ["doc"])
