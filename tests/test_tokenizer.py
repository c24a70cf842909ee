"""The checkpoint tokenizer wrapper (nanomoe_fn/model/tokenizer.py) over a tiny byte-level BPE trained here.

Dimension legend: n tokens of one text.
"""

from __future__ import annotations

import json

import pytest

from nanomoe_fn.model.tokenizer import load_tokenizer
from tests.model_fixtures import tiny_tokenizer

TEXTS = ["hello world", "the lazy experts route tokens", "naïve café, 東京 🙂", ""]


@pytest.mark.parametrize("bos", ["<s>", {"__type": "AddedToken", "content": "<s>", "special": True}])
def test_encode_decode_round_trip(tmp_path, bos):
    tok = load_tokenizer(tiny_tokenizer(tmp_path, bos=bos))
    bos_id, eos_id = tok.tok.token_to_id("<s>"), tok.tok.token_to_id("</s>")
    assert (tok.bos_token_id, tok.eos_token_ids) == (bos_id, (eos_id,))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == bos_id and bos_id not in ids[1:]
        assert tok.encode(text, add_bos=False) == ids[1:]
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text  # byte-level: exact, special tokens dropped
        assert tok.decode(ids + [eos_id]) == text
    assert tok.decode([bos_id, *tok.encode("hi", add_bos=False)], skip_special_tokens=False) == "<s>hi"
    # merges were learned: a frequent word is fewer tokens than its bytes
    assert len(tok.encode("experts", add_bos=False)) < len("experts")


def test_stop_ids_and_missing_config(tmp_path):
    path = tiny_tokenizer(tmp_path / "a")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok = load_tokenizer(path)
    assert tok.eos_token_ids == (1, 2)  # '</s>' is id 1, then the generation config's extra stop id
    bare = load_tokenizer(tiny_tokenizer(tmp_path / "b", config=False))
    assert bare.bos_token_id is None and bare.eos_token_ids == ()
    assert bare.encode("hello") == bare.encode("hello", add_bos=False)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    path = tiny_tokenizer(tmp_path / "c", bos="<bos-not-in-vocab>")
    with pytest.raises(ValueError, match="'<bos-not-in-vocab>' is not in the tokenizer's vocabulary"):
        load_tokenizer(path)
