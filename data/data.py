"""Prepare a dataset: get text, train or pick a tokenizer, write token files for train.py.

    python data/data.py                                   # tiny shakespeare, char-level -> data/shakespeare_char/
    python data/data.py shakespeare --tokenizer bpe --vocab-size 2048
    python data/data.py tinystories --tokenizer gpt2 --max-tokens 100_000_000
    python data/data.py --input 'notes/*.txt' --name notes --tokenizer byte

Writes data/<name>/train.bin and val.bin (uint16 token ids when the vocabulary fits, else uint32)
and meta.json (tokenizer, vocab size, token counts, source, dtype, the arguments that made it).
Files are written under temporary names and renamed into place, meta.json last, so an interrupted
run never leaves a dataset that looks complete. A re-run with the same arguments does nothing.
"""

import argparse
import glob
import json
import os
import sys
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from gpt import tokenizer as tok  # noqa: E402

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-{split}.txt"
SHARD_BYTES = 64 * 2**20  # TinyStories is fetched in 64 MiB shards, so a run can stop early
TIMEOUT = 10  # seconds before a download attempt counts as impossible


class DataError(Exception):
    """A problem with the input that the user can fix; printed as one line, exit status 1."""


# ------------------------------------------------------------------------------------------------
# Getting text

def _fetch(url, dest, start=0, end=None, desc=None):
    """Download url (bytes start..end-1) into dest, resuming a partial dest.part."""
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "gpt-data/1.0"}
    if start + have or end is not None:
        headers["Range"] = f"bytes={start + have}-{'' if end is None else end - 1}"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"cannot download {url} ({e}). Without internet, prepare local text "
                        f"instead: python data/data.py --input PATH_OR_GLOB --name NAME") from None
    total = resp.headers.get("Content-Length")
    with open(part, "ab") as f, tqdm(total=int(total) + have if total else None, initial=have,
                                     unit="B", unit_scale=True, desc=desc or os.path.basename(dest),
                                     disable=None) as bar:
        while chunk := resp.read(1 << 20):
            f.write(chunk)
            bar.update(len(chunk))
    os.replace(part, dest)


def shakespeare_text(raw_dir):
    path = os.path.join(raw_dir, "tinyshakespeare.txt")
    if not os.path.exists(path):
        os.makedirs(raw_dir, exist_ok=True)
        _fetch(SHAKESPEARE_URL, path)
    return [path]


def tinystories_shards(raw_dir, split, max_shards=None):
    """Yield paths of TinyStories shards (64 MiB byte ranges of the one text file), downloading
    each one that is not there yet. A partial shard resumes where it stopped."""
    url = TINYSTORIES_URL.format(split=split)
    os.makedirs(raw_dir, exist_ok=True)
    try:
        size = int(urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                          timeout=TIMEOUT).headers["Content-Length"])
    except (urllib.error.URLError, OSError, TypeError, KeyError) as e:
        raise DataError(f"cannot reach {url} ({e}). Without internet, prepare local text "
                        f"instead: python data/data.py --input PATH_OR_GLOB --name NAME") from None
    n = -(-size // SHARD_BYTES)
    for i in range(n if max_shards is None else min(n, max_shards)):
        path = os.path.join(raw_dir, f"tinystories-{split}-{i:03d}.txt")
        if not os.path.exists(path):
            _fetch(url, path, start=i * SHARD_BYTES, end=min(size, (i + 1) * SHARD_BYTES),
                   desc=f"TinyStories {split} {i + 1}/{n}")
        yield path


def local_files(pattern):
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"--input {pattern!r} matches no file; give a path or a quoted glob like 'texts/*.txt'")
    return paths


def read_text(path):
    """A file's text as UTF-8. Invalid bytes become U+FFFD (reported); a file that looks binary
    (NUL bytes, or more than 1% invalid UTF-8) or is empty is refused."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DataError(f"{path} is empty")
    if b"\x00" in raw:
        raise DataError(f"{path} looks like a binary file (it contains NUL bytes); give text files")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > 0.01 * len(raw):
        raise DataError(f"{path} is not UTF-8 text ({bad} invalid bytes); convert it, e.g. "
                        f"iconv -f latin1 -t utf-8 {path}")
    if bad:
        print(f"warning: {path}: {bad} invalid UTF-8 bytes replaced by U+FFFD", file=sys.stderr)
    return text


# ------------------------------------------------------------------------------------------------
# Tokenizing and writing

def encode_all(tokenizer, texts, desc="tokenizing"):
    """Token ids of each text, in 1 MB pieces split at newlines; tiktoken encodes a batch of
    pieces on all cores. Returns one 1-D uint32 array."""
    pieces = []
    for text in texts:
        start = 0
        while start < len(text):
            end = text.find("\n", start + 1_000_000)
            end = len(text) if end < 0 else end + 1
            pieces.append(text[start:end])
            start = end
    out = []
    batch = os.cpu_count() or 1
    for i in tqdm(range(0, len(pieces), batch), desc=desc, unit="MB", unit_scale=batch, disable=None):
        group = pieces[i:i + batch]
        ids = tokenizer.encode_batch(group) if hasattr(tokenizer, "encode_batch") \
            else [tokenizer.encode(p) for p in group]
        out.extend(np.asarray(x, dtype=np.uint32) for x in ids)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint32)


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_bin(path, ids, dtype):
    """Write ids to path atomically (temp file, then rename)."""
    tmp = path + ".tmp"
    np.asarray(ids).astype(dtype).tofile(tmp)
    os.replace(tmp, path)


def read_bin(path, dtype):
    return np.memmap(path, dtype=dtype, mode="r")


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def prepare(source="shakespeare", input=None, name=None, tokenizer="char", vocab_size=None,
            val_frac=0.1, max_tokens=None, out_root=None, raw_dir=None, force=False):
    """Build data/<name>/ and return its path. See the module docstring."""
    if tokenizer not in tok.KINDS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(tok.KINDS)}")
    if not 0 < val_frac < 1:
        raise DataError(f"--val-frac must be between 0 and 1, got {val_frac}")
    out_root = out_root or os.path.join(ROOT, "data")
    raw_dir = raw_dir or os.path.join(out_root, "raw")
    if input is not None:
        source = "local"
        paths = local_files(input)
    name = name or f"{source}_{tokenizer}"
    out_dir = os.path.join(out_root, name)
    settings = {"source": source, "input": input, "tokenizer": tokenizer, "vocab_size": vocab_size,
                "val_frac": val_frac, "max_tokens": max_tokens}
    if input is not None:
        settings["files"] = [[p, os.path.getsize(p), os.path.getmtime(p)] for p in paths]
    meta_path = os.path.join(out_dir, "meta.json")
    if not force and os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f).get("settings") == settings:
                print(f"{out_dir}/ is up to date (same arguments); nothing to do")
                return out_dir

    if source == "shakespeare":
        paths = shakespeare_text(raw_dir)
    elif source == "tinystories":
        paths = None  # streamed shard by shard below
    elif source != "local":
        raise DataError(f"unknown source {source!r}; choose shakespeare, tinystories, or --input PATH")

    if source == "tinystories":
        train_ids, val_ids, tokenizer_obj = _tinystories(raw_dir, tokenizer, vocab_size, max_tokens)
    else:
        texts = [read_text(p) for p in paths]
        tokenizer_obj = tok.train(tokenizer, lambda: iter(texts), vocab_size)
        try:
            ids = encode_all(tokenizer_obj, texts)
        except ValueError as e:
            raise DataError(str(e)) from None
        if max_tokens:
            ids = ids[:max_tokens]
        n_val = int(len(ids) * val_frac)
        if n_val < 2 or len(ids) - n_val < 2:
            raise DataError(f"only {len(ids)} tokens: too few to split into train and val; add text")
        train_ids, val_ids = ids[:-n_val], ids[-n_val:]

    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # from here until the new meta.json lands, the dataset is incomplete
    dtype = token_dtype(tokenizer_obj.vocab_size)
    write_bin(os.path.join(out_dir, "train.bin"), train_ids, dtype)
    write_bin(os.path.join(out_dir, "val.bin"), val_ids, dtype)
    meta = {"tokenizer": tokenizer_obj.to_meta(), "vocab_size": tokenizer_obj.vocab_size,
            "dtype": np.dtype(dtype).name, "train_tokens": int(len(train_ids)),
            "val_tokens": int(len(val_ids)), "source": source, "settings": settings}
    write_json(meta_path, meta)
    print(f"wrote {out_dir}/: {len(train_ids):,} train + {len(val_ids):,} val tokens, "
          f"{tokenizer} tokenizer of {tokenizer_obj.vocab_size} ids, {np.dtype(dtype).name}")
    return out_dir


def _tinystories(raw_dir, tokenizer, vocab_size, max_tokens):
    """Tokenize TinyStories shard by shard until max_tokens; the official valid file is val."""
    ts_dir = os.path.join(raw_dir, "tinystories")
    val_text = read_text(next(tinystories_shards(ts_dir, "valid", max_shards=1)))
    first = read_text(next(tinystories_shards(ts_dir, "train", max_shards=1)))
    # char and bpe vocabularies come from the first shard (64 MiB is plenty for either)
    tokenizer_obj = tok.train(tokenizer, lambda: iter([first]), vocab_size)
    chunks, count = [], 0
    for path in tinystories_shards(ts_dir, "train"):
        ids = encode_all(tokenizer_obj, [first if not chunks else read_text(path)], desc=os.path.basename(path))
        chunks.append(ids)
        count += len(ids)
        if max_tokens and count >= max_tokens:
            break
    train_ids = np.concatenate(chunks)[:max_tokens] if max_tokens else np.concatenate(chunks)
    return train_ids, encode_all(tokenizer_obj, [val_text], desc="valid"), tokenizer_obj


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", default="shakespeare", choices=["shakespeare", "tinystories"])
    p.add_argument("--input", help="local text file(s) instead of a download: a path or a quoted glob")
    p.add_argument("--name", help="output folder under data/ (default: <source>_<tokenizer>)")
    p.add_argument("--tokenizer", default="char", choices=tok.KINDS)
    p.add_argument("--vocab-size", type=int, help="bpe only: vocabulary size to train (default 4096)")
    p.add_argument("--val-frac", type=float, default=0.1, help="fraction of tokens held out for validation")
    p.add_argument("--max-tokens", type=lambda s: int(s.replace("_", "")), help="stop after this many tokens")
    p.add_argument("--out-root", help="where dataset folders go (default: data/ of this repository)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    a = p.parse_args(argv)
    try:
        prepare(a.source, a.input, a.name, a.tokenizer, a.vocab_size, a.val_frac, a.max_tokens,
                a.out_root, force=a.force)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
