"""Prepare a dataset: get text, train or pick a tokenizer, write token files for train.py.

    python data/data.py                                   # tiny shakespeare, char-level -> data/shakespeare_char/
    python data/data.py shakespeare --tokenizer bpe --vocab-size 2048
    python data/data.py tinystories --tokenizer gpt2 --max-tokens 100_000_000
    python data/data.py --input 'notes/*.txt' --name notes --tokenizer byte

Sources. `shakespeare`: the 1.1 MB tiny-shakespeare text, downloaded once into data/raw/.
`tinystories`: TinyStories-{train,valid}.txt, downloaded into data/raw/tinystories/ in 64 MiB
shards (byte ranges) with a progress bar, only as many as --max-tokens needs; an interrupted shard
resumes where it stopped. `--input PATH_OR_GLOB`: local text files, in sorted order. When a download
is impossible the run fails within seconds (a 10 s timeout) with a message naming --input.

Tokenizers (gpt/tokenizer.py): char, byte, gpt2, bpe (trained here with rustbpe on the first 64 MiB
of the training text, vocabulary --vocab-size, default 4096, stored in meta.json). Text is cut into
~1 MB pieces at a newline between two non-space characters (which no tokenizer's pre-split crosses,
so the ids are those of the whole text) and encoded in batches: on all cores by tiktoken, vectorised
with numpy for char and byte; a progress bar shows the text consumed.

Output: data/<name>/train.bin and val.bin (uint16 token ids when the vocabulary fits, else uint32)
and meta.json (tokenizer, vocab size, dtype, token counts, source, and the settings that made it).
val is the last --val-frac of the tokens, except for tinystories, whose own valid file is val
(capped at val_frac x --max-tokens when that is given). A re-run with the same settings does
nothing; different settings rebuild. The new dataset is built in a hidden folder beside the old one
and swapped in only when complete, so an interrupted or failed run leaves the previous dataset as
it was and never a partial one that looks complete (a leftover hidden folder is removed next run).

Bad inputs end the run with a one-line error and exit status 1, before anything is replaced: a
missing path or a glob that matches no file; an empty (or whitespace-only) file; a binary file
(one containing NUL bytes, which also catches UTF-16 text); text that is not UTF-8: a few invalid
bytes (at most 1% of the file) are replaced by U+FFFD with a warning, more is refused with the
iconv command that converts it. A UTF-8 byte-order mark is dropped.
"""

import argparse
import glob
import http.client
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from gpt import tokenizer as tok  # noqa: E402

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-{split}.txt"
SHARD_BYTES = 64 * 2**20        # TinyStories is fetched in 64 MiB shards, so a run can stop early
TIMEOUT = 10                    # seconds before a download attempt counts as impossible
PIECE_CHARS = 2**20             # text is encoded in pieces of about this many characters
BPE_TRAIN_CHARS = 64 * 2**20    # a bpe is trained on at most this much of the training text
FORMAT = 2                      # bump when the files change meaning: old datasets then rebuild
OFFLINE_HINT = ("Without internet, prepare local text instead: "
                "python data/data.py --input PATH_OR_GLOB --name NAME")


class DataError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


# ------------------------------------------------------------------------------------------------
# Downloading

def _open(url, headers=None):
    """The response to a GET of url, or DataError. HTTP 416 (a range past the end) is raised as
    urllib.error.HTTPError for the caller to read."""
    request = urllib.request.Request(url, headers={"User-Agent": "gpt-data/1.0", **(headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416:
            raise
        raise DataError(f"cannot download {url} (HTTP {e.code} {e.reason}). {OFFLINE_HINT}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', e)}). {OFFLINE_HINT}") from None


def _fetch(url, dest, start=0, end=None, desc=None):
    """Download bytes start .. end-1 of url (to its end when end is None) into dest. The bytes go
    to dest.part first; a dest.part left by an interrupted run is continued, not restarted."""
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    want = None if end is None else end - start
    if want is not None and have > want:
        have = 0  # not ours: start again
    if have != want:
        headers = {}
        if start + have or end is not None:
            headers["Range"] = f"bytes={start + have}-{'' if end is None else end - 1}"
        try:
            resp = _open(url, headers)
        except urllib.error.HTTPError:  # 416: the range starts past the end of the file
            if end is not None:
                raise DataError(f"{url} is shorter than expected; delete {part} and run again") from None
            os.replace(part, dest)  # dest.part already holds the whole file
            return
        with resp:
            if headers and resp.status != 206:
                if start or end is not None:
                    raise DataError(f"{url} ignores byte ranges, so it cannot be fetched in shards")
                have = 0  # the whole file came instead of the rest: start again
            size = resp.headers.get("Content-Length")
            expect = have + int(size) if size else want
            try:
                with open(part, "ab" if have else "wb") as f, \
                        tqdm(total=expect, initial=have, unit="B", unit_scale=True,
                             desc=desc or os.path.basename(dest), disable=None) as bar:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise DataError(f"download of {url} broke off ({e}); run the same command again "
                                f"to resume it") from None
        have = os.path.getsize(part)
        if expect is not None and have != expect:
            raise DataError(f"download of {url} stopped at {have} of {expect} bytes; run the same "
                            f"command again to resume it")
    os.replace(part, dest)


def _remote_size(url, record):
    """The size in bytes of the file at url, asked once with a one-byte range request and then
    kept in the file `record` (so that shards already downloaded can be used offline)."""
    try:
        with open(record) as f:
            known = json.load(f)
        if known["url"] == url:
            return known["size"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    with _open(url, {"Range": "bytes=0-0"}) as resp:
        content_range = resp.headers.get("Content-Range", "")  # "bytes 0-0/TOTAL"
        if resp.status != 206 or "/" not in content_range:
            raise DataError(f"{url} ignores byte ranges, so it cannot be fetched in shards")
        size = int(content_range.rsplit("/", 1)[1])
    write_json(record, {"url": url, "size": size})
    return size


def shakespeare_text(raw_dir):
    """Path of tiny shakespeare, downloaded into raw_dir the first time."""
    path = os.path.join(raw_dir, "tinyshakespeare.txt")
    if not os.path.exists(path):
        os.makedirs(raw_dir, exist_ok=True)
        try:
            _fetch(SHAKESPEARE_URL, path, desc="tiny shakespeare")
        except DataError as e:
            raise DataError(f"{e} (or save the text as {path})") from None
    return path


def tinystories_texts(raw_dir, split):
    """The text of TinyStories-{split}.txt, one string per 64 MiB shard, each shard downloaded when
    it is first needed. Each string ends at the last line break of its shard (the rest is carried
    to the next one), so no character or line is cut in two."""
    url = TINYSTORIES_URL.format(split=split)
    os.makedirs(raw_dir, exist_ok=True)
    size = _remote_size(url, os.path.join(raw_dir, f"TinyStories-{split}.json"))
    n = -(-size // SHARD_BYTES)
    carry = b""
    for i in range(n):
        path = os.path.join(raw_dir, f"TinyStories-{split}-{i:03d}-of-{n:03d}.txt")
        if not os.path.exists(path):
            _fetch(url, path, i * SHARD_BYTES, min(size, (i + 1) * SHARD_BYTES),
                   desc=f"TinyStories {split} shard {i + 1}/{n}")
        with open(path, "rb") as f:
            raw = carry + f.read()
        cut = len(raw) if i == n - 1 else _cut_point(raw)
        raw, carry = raw[:cut], raw[cut:]
        if raw.strip():
            yield decode_text(raw, path, bom=i == 0)


# ------------------------------------------------------------------------------------------------
# Reading text

def local_files(pattern):
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        hint = f"; for the files in a folder say '{os.path.join(pattern, '*')}'" if os.path.isdir(pattern) else ""
        raise DataError(f"--input {pattern!r} matches no file{hint}; give a path or a quoted glob "
                        f"like 'texts/*.txt'")
    return paths


def decode_text(raw, where, bom=True):
    """Text of the bytes raw (read from `where`), checked as the module docstring says."""
    if not raw.strip():
        raise DataError(f"{where} is empty")
    if b"\x00" in raw:
        raise DataError(f"{where} looks like a binary file (it contains NUL bytes; UTF-16 text does "
                        f"too); give UTF-8 text files")
    try:
        return raw.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8-sig" if bom else "utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    if bad > 0.01 * len(raw):
        raise DataError(f"{where} is not UTF-8 text ({bad} invalid bytes); convert it first, e.g. "
                        f"iconv -f latin1 -t utf-8 {where} > {where}.utf8")
    print(f"warning: {where}: {bad} invalid UTF-8 byte sequences replaced by U+FFFD", file=sys.stderr)
    return text


def read_text(path):
    """A text file's contents as a string (see decode_text)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    return decode_text(raw, path)


# A line break with a non-space character on each side: every tokenizer's pre-split pattern ends a
# piece there, so encoding the text in pieces cut after it gives the ids of the whole text.
_CUT = re.compile(r"(?<=\S)\n(?=\S)")
_CUT_BYTES = re.compile(rb"(?<=\S)\n(?=\S)")


def _cut_point(raw):
    """Where to cut the bytes raw so the first part ends at a line break (see _CUT): near the end."""
    for window in (1 << 16, 1 << 22, len(raw)):
        cuts = [m.end() for m in _CUT_BYTES.finditer(raw, max(0, len(raw) - window))]
        if cuts:
            return cuts[-1]
    return len(raw)


def split_pieces(text, size=None):
    """Cut text into pieces of about size characters, at line breaks (see _CUT)."""
    size = size or PIECE_CHARS
    start = 0
    while len(text) - start > size:
        m = _CUT.search(text, start + size)
        if m is None:
            break
        yield text[start:m.end()]
        start = m.end()
    if start < len(text):
        yield text[start:]


def take_chars(texts, limit):
    """The first `limit` characters (all when limit is None) of an iterable of strings; it stops
    without asking texts for more once it has them (so no further shard is downloaded)."""
    if limit is None:
        yield from texts
        return
    for text in texts:
        yield text[:limit]
        limit -= len(text)
        if limit <= 0:
            return


# ------------------------------------------------------------------------------------------------
# Tokenizing and writing

def encode_texts(tokenizer, texts, desc="tokenizing", total_bytes=None):
    """Token ids of an iterable of strings, as a stream of 1-D integer arrays, in order. The
    progress bar counts the UTF-8 bytes of text encoded, out of total_bytes when that is known."""
    batch = 2 * (os.cpu_count() or 1)
    with tqdm(desc=desc, total=total_bytes, unit="B", unit_scale=True, disable=None) as bar:
        for text in texts:  # batches stay within one text: the next is read only when needed
            pieces = split_pieces(text)
            while group := list(itertools.islice(pieces, batch)):
                yield from tokenizer.encode_batch(group)
                bar.update(sum(len(p.encode("utf-8", "surrogatepass")) for p in group))


def token_dtype(vocab_size):
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_tokens(f, ids, dtype):
    """Append ids to the open binary file f as dtype."""
    np.asarray(ids).astype(dtype, copy=False).tofile(f)


def write_split(path, chunks, dtype, limit=None):
    """Write a stream of id arrays to path as dtype, stopping after limit ids. Returns the count."""
    n = 0
    with open(path, "wb") as f:
        for ids in chunks:
            if limit is not None:
                ids = ids[:limit - n]
            write_tokens(f, ids, dtype)
            n += len(ids)
            if limit is not None and n >= limit:
                break
    return n


def split_off_val(train_path, val_path, n, val_frac, dtype):
    """Move the last val_frac of the n ids in train_path into val_path. Returns (n_train, n_val)."""
    n_val = int(n * val_frac)
    if n_val < 2 or n - n_val < 2:
        raise DataError(f"only {n} tokens: too few to split into train and val; add text")
    ids = np.fromfile(train_path, dtype=dtype, offset=(n - n_val) * np.dtype(dtype).itemsize)
    with open(val_path, "wb") as f:
        write_tokens(f, ids, dtype)
    os.truncate(train_path, (n - n_val) * np.dtype(dtype).itemsize)
    return n - n_val, n_val


def read_bin(path, dtype):
    return np.memmap(path, dtype=dtype, mode="r")


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# ------------------------------------------------------------------------------------------------
# The dataset folder: built beside, swapped in whole

def _partial_prefix(out_root, name):
    return os.path.join(out_root, f".{name}.partial-")


def _recover(out_root, name):
    """Tidy up after an earlier run that was killed: drop its partial build, and finish (or undo)
    a swap that stopped between its two renames."""
    for path in glob.glob(glob.escape(_partial_prefix(out_root, name)) + "*"):
        shutil.rmtree(path, ignore_errors=True)
    out_dir, old = os.path.join(out_root, name), os.path.join(out_root, f".{name}.old")
    if os.path.exists(old):
        if os.path.exists(out_dir):
            shutil.rmtree(old)
        else:
            os.rename(old, out_dir)


def _swap_in(new, out_dir):
    old = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.old")
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(new, out_dir)
    if os.path.exists(old):
        shutil.rmtree(old)


def _up_to_date(out_dir, settings):
    """Whether out_dir holds a complete dataset made with these settings."""
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
        itemsize = np.dtype(meta["dtype"]).itemsize
        return meta.get("settings") == settings and all(
            os.path.getsize(os.path.join(out_dir, f"{split}.bin")) == meta[f"{split}_tokens"] * itemsize
            for split in ("train", "val"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_replaceable(out_dir):
    ours = {"meta.json", "train.bin", "val.bin"}
    if os.path.isdir(out_dir) and set(os.listdir(out_dir)) - ours:
        raise DataError(f"{out_dir}/ holds files that data.py did not write "
                        f"({', '.join(sorted(set(os.listdir(out_dir)) - ours)[:3])}); "
                        f"choose another --name or move them")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"{out_dir} exists and is not a folder; choose another --name")


# ------------------------------------------------------------------------------------------------

def prepare(source=None, input=None, name=None, tokenizer="char", vocab_size=None,
            val_frac=0.1, max_tokens=None, out_root=None, raw_dir=None, force=False):
    """Build data/<name>/ (under out_root) and return its path. See the module docstring."""
    # --- the arguments
    if tokenizer not in tok.KINDS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(tok.KINDS)}")
    if tokenizer == "bpe":
        vocab_size = vocab_size or tok.BPE_VOCAB
        if not 256 <= vocab_size <= 2**32:
            raise DataError(f"--vocab-size must be at least 256 (the byte values), got {vocab_size}")
    elif vocab_size is not None:
        raise DataError(f"--vocab-size is for --tokenizer bpe; the {tokenizer} tokenizer's is fixed")
    if not 0 < val_frac < 1:
        raise DataError(f"--val-frac must be between 0 and 1, got {val_frac}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"--max-tokens must be positive, got {max_tokens}")
    if input is not None:
        if source is not None:
            raise DataError(f"give either a source ({source}) or --input, not both")
        source, paths = "local", local_files(input)
    elif (source := source or "shakespeare") not in ("shakespeare", "tinystories"):
        raise DataError(f"unknown source {source!r}; choose shakespeare, tinystories, or --input PATH")
    out_root = os.path.abspath(out_root or os.path.join(ROOT, "data"))
    raw_dir = raw_dir or os.path.join(out_root, "raw")
    name = name or f"{source}_{tokenizer}"
    out_dir = os.path.join(out_root, name)
    if not name or name.startswith(".") or os.sep in name or os.path.abspath(out_dir) == os.path.abspath(raw_dir):
        raise DataError(f"--name {name!r} is not usable: give a plain folder name other than 'raw'")

    # --- already there?
    settings = {"format": FORMAT, "source": source, "input": input, "tokenizer": tokenizer,
                "vocab_size": vocab_size, "val_frac": val_frac, "max_tokens": max_tokens}
    if input is not None:
        settings["files"] = [[os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)] for p in paths]
    os.makedirs(out_root, exist_ok=True)
    _recover(out_root, name)
    if not force and _up_to_date(out_dir, settings):
        print(f"{out_dir}/ is up to date (same settings); nothing to do")
        return out_dir
    _check_replaceable(out_dir)

    # --- the text: train_texts() streams the training text, val_texts() the validation text
    val_limit, total_bytes = None, None
    if source == "tinystories":
        ts_dir = os.path.join(raw_dir, "tinystories")
        train_texts = lambda: tinystories_texts(ts_dir, "train")  # noqa: E731
        val_texts = lambda: tinystories_texts(ts_dir, "valid")  # noqa: E731
        val_limit = max(2, int(max_tokens * val_frac)) if max_tokens else None
    else:
        if source == "shakespeare":
            paths = [shakespeare_text(raw_dir)]
        train_texts, val_texts = (lambda: map(read_text, paths)), None
        total_bytes = sum(map(os.path.getsize, paths))
    if tokenizer == "char":  # n char tokens are the first n characters: cut the text itself, so
        # that the vocabulary is built from exactly the text that is encoded
        uncut_train, uncut_val = train_texts, val_texts
        train_texts = lambda: take_chars(uncut_train(), max_tokens)  # noqa: E731
        val_texts = val_texts and (lambda: take_chars(uncut_val(), val_limit))

    # --- the tokenizer
    try:
        if tokenizer == "char":
            tokenizer_obj = tok.train("char", lambda: itertools.chain(train_texts(), val_texts() if val_texts else ()))
        else:
            tokenizer_obj = tok.train(tokenizer, lambda: (p for t in take_chars(train_texts(), BPE_TRAIN_CHARS)
                                                          for p in split_pieces(t)), vocab_size)
    except tok.TokenizerError as e:
        raise DataError(str(e)) from None
    if tokenizer == "bpe" and tokenizer_obj.vocab_size < vocab_size:
        print(f"warning: the text allows only {tokenizer_obj.vocab_size} BPE tokens, fewer than "
              f"--vocab-size {vocab_size}", file=sys.stderr)
    dtype = token_dtype(tokenizer_obj.vocab_size)

    # --- the token files, in a hidden folder swapped in when complete
    tmp = tempfile.mkdtemp(prefix=os.path.basename(_partial_prefix(out_root, name)), dir=out_root)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset is an ordinary folder
    try:
        train_bin, val_bin = os.path.join(tmp, "train.bin"), os.path.join(tmp, "val.bin")
        try:
            n = write_split(train_bin, encode_texts(tokenizer_obj, train_texts(), "train", total_bytes), dtype,
                            max_tokens)
            if val_texts is None:
                n_train, n_val = split_off_val(train_bin, val_bin, n, val_frac, dtype)
            else:
                n_train = n
                n_val = write_split(val_bin, encode_texts(tokenizer_obj, val_texts(), "val"), dtype, val_limit)
        except tok.TokenizerError as e:
            raise DataError(str(e)) from None
        meta = {"tokenizer": tokenizer_obj.to_meta(), "vocab_size": tokenizer_obj.vocab_size,
                "dtype": np.dtype(dtype).name, "train_tokens": n_train, "val_tokens": n_val,
                "source": source, "settings": settings}
        write_json(os.path.join(tmp, "meta.json"), meta)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out_dir}/: {n_train:,} train + {n_val:,} val tokens, {tokenizer} tokenizer of "
          f"{tokenizer_obj.vocab_size} ids, {np.dtype(dtype).name}")
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", choices=["shakespeare", "tinystories"],
                   help="text to download (default shakespeare); or give --input instead")
    p.add_argument("--input", help="local text file(s) instead of a download: a path or a quoted glob")
    p.add_argument("--name", help="output folder under data/ (default: <source>_<tokenizer>)")
    p.add_argument("--tokenizer", default="char", choices=tok.KINDS)
    p.add_argument("--vocab-size", type=int, help=f"bpe only: vocabulary size to train (default {tok.BPE_VOCAB})")
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
    except OSError as e:  # disk full, permissions: say it in one line
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; the previous dataset, if any, is unchanged (run again to continue "
                 "a download)")


if __name__ == "__main__":
    main()
