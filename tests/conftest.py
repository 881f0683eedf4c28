"""Shared test fixtures: a small text corpus written by the test itself (nothing is downloaded),
a dataset prepared from it through data/data.py, and a tiny model config."""

import os
import re
import subprocess
import sys
import tempfile

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


def assert_causal(model, T=20, cut=12, vocab=64):
    """Changing the tokens from position `cut` on leaves every earlier logit unchanged; returns both
    logits, (2, T, V) each."""
    a = torch.randint(0, vocab, (2, T))
    b = a.clone()
    b[:, cut:] = torch.randint(0, vocab, (2, T - cut))
    la, _ = model(a, a)
    lb, _ = model(b, b)
    torch.testing.assert_close(la[:, :cut], lb[:, :cut])
    return la, lb


def tiny_config(**kw):
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    base.update(kw)
    return GPTConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """torch on one thread in every test module: tiny models run faster so on a shared CPU (a second
    thread only adds synchronisation), and a bitwise comparison with train.py processes started with
    OMP_NUM_THREADS=1 needs the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def full_fp32():
    """fp32 matmuls at full precision (bench.py and train.py allow TF32 on the GPU), restored after."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


@pytest.fixture
def fresh_compile():
    """torch.compile from a clean slate: earlier tests' compiled frames (other shapes of the same
    functions) would otherwise turn on dynamic shapes, whose symbolic compile is far slower."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def triton_kernels(monkeypatch):
    """The Triton kernels of loss.py, mamba.py and peer.py switched on for CUDA tensors, as
    GPT_TRITON=1 does (they are opt-in until their speed is measured)."""
    from gpt import loss, mamba, peer
    for module in (loss, mamba, peer):
        monkeypatch.setattr(module, "TRITON", True)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (bench/gpu_check.sh runs `pytest -m gpu`)")


def hopper_build(kernel, signature, constexprs, num_warps=4, aligned=()):
    """Compile a Triton kernel for the H100 (sm_90a) on any machine, GPU or not, and read ptxas's
    report: (registers per thread, spilled bytes). Catches what the CPU interpreter cannot: a kernel
    that does not lower for Hopper, or a tile too large for the register file. Skips where Triton is
    not installed (CI installs it: .ci/run). aligned: the arguments a launch would find divisible by
    16 (pointers from torch's allocator, sizes such as 50304), which Triton's launcher specialises
    on; without it, loads whose alignment is unknown stay scalar (ld.global.b16, not vectorised)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = triton.compiler.ASTSource(fn=kernel, constexprs=constexprs, attrs=attrs,
                                    signature={**signature, **{name: "constexpr" for name in constexprs}})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(d, "kernel.cubin")],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spilled = sum(int(n) for n in re.findall(r"(\d+) bytes spill", report))
    return registers, spilled
