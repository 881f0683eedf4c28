"""sampling.py (issues 2 and 11): it prints text from a trained run; a missing checkpoint, a prompt
outside a char vocabulary and a window longer than the context are handled clearly."""

import os
import re
import subprocess
import sys

import pytest
import torch

import sampling
import train
from gpt import tokenizer as tok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(one_thread, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_run")
    train.main(["--preset", "cpu-tiny", "--data_dir", data_root, "--dataset", "tiny_char", "--out_dir", str(out),
                "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "8",
                "--max_iters", "30", "--eval_interval", "30", "--eval_iters", "2", "--device", "cpu"])
    return str(out)


def samples(stdout):
    """The texts of the samples sampling.py printed (prompt included)."""
    return [s[:-1] for s in re.split(r"--- sample \d+ \(.*?\) ---\n", stdout)[1:]]


def test_sampling_prints_text(run_dir):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sampling.py"), "--out_dir", run_dir,
                           "--prompt", "ROMEO:", "--num-samples", "2", "--max-new-tokens", "12"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    texts = samples(proc.stdout)
    assert len(texts) == 2 and all(t.startswith("ROMEO:") and len(t) == 6 + 12 for t in texts)


def run_sampling(*argv):
    """sampling.main in this process: its exit message, or None."""
    try:
        sampling.main(list(argv))
    except SystemExit as e:
        return e.code
    return None


def test_missing_checkpoint_fails_clearly(tmp_path):
    msg = run_sampling("--out_dir", str(tmp_path))
    assert msg.startswith(f"error: no checkpoint at {tmp_path}/ckpt.pt") and "python train.py" in msg


def test_prompt_outside_the_char_vocabulary_names_the_characters(run_dir):
    msg = run_sampling("--out_dir", run_dir, "--prompt", "Zoë says §")
    assert "not in this char-level vocabulary" in msg and "'ë'" in msg and "'§'" in msg


def test_more_new_tokens_than_the_context_slides_the_window(run_dir, capsys):
    """50 new tokens through a context of 16; greedy decoding gives the same text with and without
    the cache (which is refilled when the window slides)."""
    common = ["--out_dir", run_dir, "--prompt", "JULIET:", "--num-samples", "1", "--max-new-tokens", "50",
              "--temperature", "0"]
    assert run_sampling(*common) is None
    out, err = capsys.readouterr()
    assert "the window slides" in err
    assert run_sampling(*common, "--no-cache") is None
    cached, uncached = samples(out), samples(capsys.readouterr().out)
    assert len(cached[0]) == len("JULIET:") + 50 and cached == uncached


def test_streaming_never_splits_a_character(capsys):
    """Byte tokens arrive one at a time; what is printed is always whole characters."""
    text = "naïve € 😀 ok"
    on_token, flush = sampling.stream_printer(tok.ByteTokenizer())
    printed = ""
    for b in text.encode("utf-8"):
        on_token(torch.tensor([[b]]))
        printed += capsys.readouterr().out
        assert "\ufffd" not in printed
    flush()
    assert printed + capsys.readouterr().out == text
