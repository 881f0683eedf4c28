"""Tokenizers: text <-> token ids, and how each is saved to and restored from meta.json.

    char  one id per distinct character of the corpus (vocabulary built from the text)
    byte  the 256 byte values of the UTF-8 encoding (nothing to build; any text)
    gpt2  OpenAI's GPT-2 BPE through tiktoken (50257 ids)
    bpe   a byte-level BPE of `vocab_size` ids trained on the corpus itself with `rustbpe`
          (Sennrich et al., arXiv 1508.07909), encoded and decoded by tiktoken

A tokenizer's full definition goes into `meta.json` next to the data as plain JSON (the char
vocabulary, or the BPE merges as hex strings), so sampling decodes with exactly the same one.
"""

import tiktoken

KINDS = ("char", "byte", "gpt2", "bpe")


class CharTokenizer:
    kind = "char"

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def train(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters not in this char-level vocabulary: {''.join(unknown)!r} "
                             f"({', '.join(map(repr, unknown[:10]))}); remove them from the text")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def to_meta(self):
        return {"kind": "char", "vocab_size": self.vocab_size, "chars": "".join(self.chars)}


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def to_meta(self):
        return {"kind": "byte", "vocab_size": 256}


class TiktokenTokenizer:
    """GPT-2's encoding, or a BPE trained here with rustbpe, both run by tiktoken."""

    def __init__(self, kind, encoding, merges_hex=None):
        self.kind, self.enc, self.merges_hex = kind, encoding, merges_hex
        self.vocab_size = encoding.n_vocab

    @classmethod
    def gpt2(cls):
        return cls("gpt2", tiktoken.get_encoding("gpt2"))

    @classmethod
    def train(cls, texts, vocab_size):
        """Train a byte-level BPE of vocab_size ids (>= 256) on an iterable of strings."""
        import rustbpe
        if vocab_size < 256:
            raise ValueError(f"a byte-level BPE needs vocab_size >= 256, got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size=vocab_size)
        ranks = dict(trainer.get_mergeable_ranks())
        return cls._from_ranks(ranks, trainer.get_pattern())

    @classmethod
    def _from_ranks(cls, ranks, pattern):
        enc = tiktoken.Encoding(name="bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        merges_hex = [tok.hex() for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
        tok = cls("bpe", enc, merges_hex)
        tok.pattern = pattern
        return tok

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def to_meta(self):
        if self.kind == "gpt2":
            return {"kind": "gpt2", "vocab_size": self.vocab_size}
        return {"kind": "bpe", "vocab_size": self.vocab_size, "pattern": self.pattern,
                "tokens_hex": self.merges_hex}


def from_meta(meta):
    """Rebuild the tokenizer described by meta (the "tokenizer" entry of meta.json)."""
    kind = meta.get("kind")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        return TiktokenTokenizer.gpt2()
    if kind == "bpe":
        ranks = {bytes.fromhex(h): i for i, h in enumerate(meta["tokens_hex"])}
        return TiktokenTokenizer._from_ranks(ranks, meta["pattern"])
    raise ValueError(f"unknown tokenizer kind {kind!r} in meta.json; expected one of {KINDS}")


def train(kind, text_iter_factory, vocab_size=None):
    """Build a tokenizer of `kind`. text_iter_factory() yields the corpus as strings (it may be
    called more than once, for a corpus too large to hold in memory)."""
    if kind == "char":
        chars = set()
        for t in text_iter_factory():
            chars.update(t)
        return CharTokenizer(sorted(chars))
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        return TiktokenTokenizer.gpt2()
    if kind == "bpe":
        return TiktokenTokenizer.train(text_iter_factory(), vocab_size or 4096)
    raise ValueError(f"unknown tokenizer {kind!r}; choose one of {', '.join(KINDS)}")

