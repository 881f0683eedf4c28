"""Shared test fixtures: a small text corpus written by the test itself (nothing is downloaded),
a dataset prepared from it through data/data.py, and a tiny model config."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import data as data_py  # noqa: E402
from gpt.config import GPTConfig  # noqa: E402

TEXT = "".join(
    f"{who}:\nI pray you, sir, what is the hour? It is {n} of the clock, and the {thing} is {state}.\n\n"
    for n in range(60)
    for who, thing, state in [("ROMEO", "moon", "bright"), ("JULIET", "night", "young"),
                              ("NURSE", "day", "done")][n % 3:n % 3 + 1]
)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT * 4, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory, text_file):
    """A data folder holding `tiny_char`, prepared from text_file by data/data.py."""
    root = tmp_path_factory.mktemp("data")
    data_py.prepare(input=text_file, name="tiny_char", tokenizer="char", out_root=str(root))
    return str(root)


def tiny_config(**kw):
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    base.update(kw)
    return GPTConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
