"""The sentencepiece tokenizer and the padded vocabulary size."""

from __future__ import annotations

import pytest

from moepp_megatron.data.tokenizer import load_tokenizer, padded_vocab_size
from tests.data.corpora import TEXTS


def test_tokenizer_matches_sentencepiece(sp_model, sp_reference):
    tokenizer = load_tokenizer(sp_model)
    assert tokenizer.vocab_size == sp_reference.get_piece_size() == 400
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, -1)
    assert tokenizer.eod == tokenizer.eos_id  # what megatron's GPTDataset uses
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == sp_reference.encode(text)
        assert tokenizer.decode(ids) == sp_reference.decode(ids)
    assert tokenizer.decode(tokenizer.encode(TEXTS[2])) == TEXTS[2]  # byte fallback: lossless


def test_missing_model_names_path(tmp_path):
    path = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_tokenizer(path)


def test_corrupt_model_names_path(tmp_path):
    path = tmp_path / "bad.model"
    path.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=str(path)):
        load_tokenizer(path)


@pytest.mark.parametrize(
    "vocab, tp, divisible_by, padded",
    [
        (32000, 1, 128, 32000),  # LLaMA-2: already a multiple
        (32000, 8, 128, 32768),
        (50257, 1, 128, 50304),  # GPT-2, the classic Megatron-LM figure
        (50257, 2, 128, 50432),
        (400, 3, 128, 768),
        (1, 1, 1, 1),
    ],
)
def test_padded_vocab_size(vocab, tp, divisible_by, padded):
    assert padded_vocab_size(vocab, tp, divisible_by) == padded


def test_padded_vocab_size_rejects_nonpositive():
    with pytest.raises(ValueError, match="tensor_parallel=0"):
        padded_vocab_size(32000, 0)
