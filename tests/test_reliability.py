"""Reliability (issue 11): exact resume, crash-safe checkpoints, safe loading, numerical faults,
bad inputs, and property tests of the token files and tokenizers.

The resume tests run train.py as real subprocesses, stopped by --max_iters and by SIGINT, and
compare the resumed run's log with an uninterrupted run's: every loss, learning rate, gradient
norm and validation loss must be equal (exactly: CPU, one thread each)."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import train
from data import data as data_py
from gpt import checkpoint
from gpt import tokenizer as tok
from gpt.plot import read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: fast for a tiny model, and the same in every run
TINY = ["--preset", "cpu-tiny", "--dataset", "tiny_char", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
        "--block_size", "16", "--batch_size", "4", "--eval_iters", "2", "--dropout", "0.1",
        "--device", "cpu", "--compile", "false"]


def args(data_root, out_dir, *extra):
    return ["--data_dir", data_root, "--out_dir", str(out_dir), *TINY, *extra]


def start(*argv):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, rc=0):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == rc, out + err
    return out, err


def curve(out_dir):
    """Every log record without its timings: (kind, step, loss, val loss, lr, grad norm)."""
    return [(r["kind"], r["step"], r.get("loss"), r.get("val_loss"), r.get("lr"), r.get("grad_norm"))
            for r in read_log(os.path.join(out_dir, "log.jsonl"))]


def in_process(*argv):
    """train.main in this process (no start-up cost); returns its exit message or code, None on success."""
    try:
        train.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return None


# ------------------------------------------------------------------------------------------------
# 1. Exact resume

RUN = ["--max_iters", "200", "--eval_interval", "100", "--log_interval", "1"]


def wait_for_train_records(out_dir, n):
    log, deadline = os.path.join(out_dir, "log.jsonl"), time.time() + 60
    while time.time() < deadline:
        if os.path.exists(log) and open(log).read().count('"train"') >= n:
            return
        time.sleep(0.005)


@pytest.fixture(scope="module")
def resumed(one_thread, data_root, tmp_path_factory):
    """Three runs of the same 200 steps. A train.py process stopped by SIGINT mid-run, resumed by
    another that is killed (SIGKILL) mid-run, then resumed here to the end. And, in this process,
    an uninterrupted run, and a run stopped by --max_iters 100 (the schedule's length pinned by
    --lr_decay_iters) then resumed. All on one thread (one_thread, ENV): bitwise equality needs the
    same kernels."""
    tmp = tmp_path_factory.mktemp("resume")
    proc = start(*args(data_root, tmp / "run", *RUN))
    wait_for_train_records(tmp / "run", 20)
    proc.send_signal(signal.SIGINT)
    sigint_out, _ = finish(proc)
    stopped_at = checkpoint.load(str(tmp / "run" / "ckpt.pt"))["step"]

    proc = start("--resume", "--out_dir", str(tmp / "run"))
    wait_for_train_records(tmp / "run", stopped_at + 20)
    time.sleep(random.uniform(0, 0.02))
    proc.kill()
    proc.communicate()
    killed = proc.returncode == -signal.SIGKILL
    assert in_process("--resume", "--out_dir", tmp / "run") is None

    assert in_process(*args(data_root, tmp / "ref", *RUN)) is None
    assert in_process(*args(data_root, tmp / "early", *RUN, "--max_iters", "100",
                            "--lr_decay_iters", "200")) is None
    assert in_process("--resume", "--out_dir", tmp / "early", "--max_iters", "200") is None
    return tmp, sigint_out, stopped_at, killed


def test_resume_after_max_iters_is_exact(resumed):
    tmp = resumed[0]
    reference = curve(tmp / "ref")
    assert len([r for r in reference if r[0] == "train"]) == 200
    assert curve(tmp / "early") == reference


def test_sigint_then_sigkill_then_resume_is_exact(resumed):
    tmp, out, stopped_at, killed = resumed
    assert 20 <= stopped_at < 200, "SIGINT should land mid-run"
    assert f"SIGINT: stopped at step {stopped_at}" in out and "--resume" in out
    assert killed, "SIGKILL should land mid-run"
    assert curve(tmp / "run") == curve(tmp / "ref")


def test_larger_max_iters_on_resume_stretches_the_schedule(data_root, tmp_path, capsys):
    assert in_process(*args(data_root, tmp_path, "--max_iters", "4", "--eval_interval", "4",
                            "--log_interval", "1")) is None
    assert in_process("--resume", "--out_dir", tmp_path, "--max_iters", "6") is None
    assert "note: max_iters 4 -> 6" in capsys.readouterr().out
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl") if r["kind"] == "train"] == list(range(1, 7))
    assert "past --max_iters" in in_process("--resume", "--out_dir", tmp_path, "--max_iters", "5")


# ------------------------------------------------------------------------------------------------
# 2. Crash-safe checkpoints

WRITER = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from gpt import checkpoint
path, keep = sys.argv[2], int(sys.argv[3])
w = torch.arange(1_000_000, dtype=torch.float32)  # 4 MB: the loop's time is almost all in the save
for step in range(1, 10**9):
    checkpoint.save(path, {"step": step, "w": w}, keep=keep)
    print(step, flush=True)
"""


def test_sigkill_during_checkpoint_writes_leaves_the_previous_one(tmp_path):
    """Writers that save back to back, killed at random moments: whatever the moment, ckpt.pt (and
    every numbered one) is a whole checkpoint at least as new as the last save that completed."""
    mid_write = 0
    for i in range(12):  # rounds until a kill has landed mid-write (a random moment may miss the writes)
        if i >= 2 and mid_write:
            break
        folder, keep = tmp_path / f"r{i}", (1, 3)[i % 2]
        proc = subprocess.Popen([sys.executable, "-c", WRITER, ROOT, str(folder / "ckpt.pt"), str(keep)],
                                stdout=subprocess.PIPE, text=True, env=ENV)
        last = [int(proc.stdout.readline()) for _ in range(3)][-1]  # three saves complete
        time.sleep(random.uniform(0, 0.05))
        proc.kill()
        proc.wait()
        mid_write += bool(glob.glob(str(folder / "*.tmp")))
        state = checkpoint.load(str(folder / "ckpt.pt"))
        assert state["step"] >= last
        for path in glob.glob(str(folder / "*.pt")):
            state = checkpoint.load(path)
            assert torch.equal(state["w"], torch.arange(1_000_000, dtype=torch.float32))
        if keep > 1:
            assert 1 <= len(glob.glob(str(folder / "ckpt-*.pt"))) <= keep + 1  # + 1: killed before pruning
    assert mid_write, "no kill landed during a write"


def test_keep_checkpoints_and_resume_from_an_older_one(data_root, tmp_path):
    assert in_process(*args(data_root, tmp_path, "--max_iters", "6", "--eval_interval", "2",
                            "--keep_checkpoints", "3")) is None
    kept = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "ckpt*.pt")))
    assert kept == ["ckpt-0000002.pt", "ckpt-0000004.pt", "ckpt-0000006.pt", "ckpt.pt"]
    assert os.path.samefile(tmp_path / "ckpt.pt", tmp_path / "ckpt-0000006.pt")
    # go back to step 2 and train on: the log drops the later records, the files rotate
    assert in_process("--resume", tmp_path / "ckpt-0000002.pt", "--max_iters", "8") is None
    kept = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "ckpt*.pt")))
    assert kept == ["ckpt-0000004.pt", "ckpt-0000006.pt", "ckpt-0000008.pt", "ckpt.pt"]
    assert checkpoint.load(str(tmp_path / "ckpt.pt"))["step"] == 8
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl") if r["kind"] == "eval"] == [0, 2, 4, 6, 8]


# ------------------------------------------------------------------------------------------------
# 3. Safe loading

class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would create a file
        return (open, (self.path, "w"))


def test_loading_refuses_code_and_damaged_files(tmp_path):
    torch.save({"model": {}, "x": Payload(str(tmp_path / "pwned"))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to load.*weights_only"):
        checkpoint.load(str(tmp_path / "evil.pt"))
    assert not os.path.exists(tmp_path / "pwned")
    torch.save({"w": torch.ones(1000)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    for name, content in [("cut.pt", data[: len(data) // 2]), ("empty.pt", b""), ("junk.pt", b"hello" * 50)]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="damaged or not a checkpoint"):
            checkpoint.load(str(tmp_path / name))


@pytest.fixture(scope="module")
def small_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    assert in_process(*args(data_root, out, "--max_iters", "6", "--eval_interval", "3")) is None
    return out


def test_checkpoint_holds_plain_data(small_run):
    ckpt = checkpoint.load(str(small_run / "ckpt.pt"))

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(map(plain, x))
        return x is None or isinstance(x, (str, int, float, bool, torch.Tensor))
    assert plain(ckpt)
    assert ckpt["tokenizer"]["kind"] == "char" and ckpt["model_config"]["n_embd"] == 32
    assert {"loader", "rng", "optimizer", "step", "last_eval", "bad_steps"} <= set(ckpt)


def test_mismatching_config_names_the_fields(small_run):
    before = snapshot(small_run)
    msg = in_process("--resume", "--out_dir", small_run, "--n_embd", "64", "--n_layer", "3")
    assert "n_embd (checkpoint 32, now 64)" in msg and "n_layer (checkpoint 1, now 3)" in msg
    assert snapshot(small_run) == before


# ------------------------------------------------------------------------------------------------
# 4. Numerical faults

def test_non_finite_step_is_skipped_and_counted(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv(train.NAN_STEPS, "4")
    assert in_process(*args(data_root, tmp_path, "--max_iters", "8", "--eval_interval", "8",
                            "--log_interval", "1")) is None
    train_records = [r for r in read_log(tmp_path / "log.jsonl") if r["kind"] == "train"]
    assert [r["bad_steps"] for r in train_records] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert not np.isfinite(train_records[4]["loss"])
    ckpt = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert ckpt["bad_steps"] == 1 and all(t.isfinite().all() for t in ckpt["model"].values())


def test_consecutive_bad_steps_stop_the_run_keeping_the_checkpoint(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv(train.NAN_STEPS, ",".join(map(str, range(5, 20))))
    msg = in_process(*args(data_root, tmp_path, "--max_iters", "40", "--eval_interval", "4",
                           "--log_interval", "2", "--max_bad_steps", "3"))
    # steps 5, 6, 7 are bad; the log at step 8 reads their verdicts, and the run stops there
    assert "3 steps in a row had a non-finite loss" in msg and "stopped at step 8" in msg
    assert "ckpt.pt (step 4)" in msg
    ckpt = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 4 and all(t.isfinite().all() for t in ckpt["model"].values())


@pytest.mark.parametrize("fused", [False, True])
def test_step_if_finite_skips_exactly(fused):
    """Both paths: the host check (plain AdamW) and found_inf on the device (fused AdamW)."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=0.1, fused=fused)
    w.grad = torch.randn(4, 3)
    opt.step()
    before = (w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()})
    w.grad = torch.full((4, 3), float("nan"))
    train.step_if_finite(opt, torch.tensor(False))
    assert torch.equal(w, before[0]) and all(torch.equal(v, before[1][k]) for k, v in opt.state[w].items())
    w.grad = torch.ones(4, 3)
    train.step_if_finite(opt, torch.tensor(True))
    assert not torch.equal(w, before[0]) and opt.state[w]["step"].item() == 2


def test_step_if_finite_hands_muon_the_verdict_on_the_device(monkeypatch):
    """Fused AdamW + Muon (the muon optimizer on CUDA): neither reads the verdict on the host."""
    from gpt.optim import Muon, Optimizers
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    opt = Optimizers(Muon([w], lr=0.05), torch.optim.AdamW([b], lr=0.1, fused=True))
    w.grad, b.grad = torch.full((4, 3), float("nan")), torch.full((3,), float("nan"))
    before = w.detach().clone(), b.detach().clone()
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("host read of the verdict"))
    train.step_if_finite(opt, torch.tensor(False))
    monkeypatch.undo()
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])


# ------------------------------------------------------------------------------------------------
# 5. Bad inputs: one line, non-zero exit, nothing written or changed

def snapshot(folder):
    return {p: open(p, "rb").read() for p in sorted(glob.glob(os.path.join(folder, "*")))}


def test_missing_dataset_names_the_data_py_command(tmp_path):
    msg = in_process("--data_dir", tmp_path, "--dataset", "shakespeare_bpe", "--out_dir", tmp_path / "o")
    assert "python data/data.py --tokenizer bpe" in msg and "\n" not in msg
    msg = in_process("--data_dir", tmp_path, "--dataset", "mine", "--out_dir", tmp_path / "o")
    assert "--input PATH_OR_GLOB --name mine" in msg
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("extra, expect", [
    (["--block_size", "5000"], "the val split has"),
    (["--lr", "-1"], "lr > 0"),
    (["--n_embd", "30", "--n_head", "4"], "n_embd (30) must be divisible by n_head (4)"),
    (["--keep_checkpoints", "0"], "keep_checkpoints must be positive"),
])
def test_bad_values_fail_in_one_line(data_root, tmp_path, extra, expect):
    msg = in_process(*args(data_root, tmp_path / "o", *extra))
    assert expect in msg and msg.startswith("error:") and "\n" not in msg
    assert not os.path.exists(tmp_path / "o")


def test_mistyped_key_lists_close_matches(data_root, tmp_path, capsys):
    assert in_process(*args(data_root, tmp_path, "--n_layers", "2")) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'n_layers'. Did you mean n_layer" in err


def test_errors_leave_an_existing_run_untouched(small_run, data_root, text_file, tmp_path):
    before = snapshot(small_run)
    assert "already holds a run" in in_process(*args(data_root, small_run, "--max_iters", "6"))
    assert "lr > 0" in in_process("--resume", "--out_dir", small_run, "--lr", "-1")
    data_py.prepare(input=text_file, name="tiny_char", tokenizer="byte", out_root=str(tmp_path))
    assert "not tokenized like" in in_process("--resume", "--out_dir", small_run, "--data_dir", tmp_path)
    assert snapshot(small_run) == before


# ------------------------------------------------------------------------------------------------
# 6. Property tests

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vocab=st.integers(1, 2**32), data=st.data())
def test_bin_files_round_trip(vocab, data, tmp_path):
    dtype = data_py.token_dtype(vocab)
    ids = np.array(data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=300)), dtype=np.int64)
    path = str(tmp_path / "split.bin")
    assert data_py.write_split(path, [ids[: len(ids) // 2], ids[len(ids) // 2:]], dtype) == len(ids)
    assert np.array_equal(np.asarray(data_py.read_bin(path, dtype)), ids)


CORPUS = "Hello, world! Ça va? 日本語のテキスト.\n" * 20


@pytest.fixture(scope="module")
def tokenizers():
    made = {"char": tok.train("char", lambda: iter([CORPUS])), "byte": tok.train("byte", None),
            "bpe": tok.train("bpe", lambda: iter([CORPUS]), 300)}
    try:
        made["gpt2"] = tok.train("gpt2", None)
    except tok.TokenizerError:  # its BPE files are neither packaged nor cached: nothing to test offline
        pass
    # each as sampling.py gets it: rebuilt from the plain data stored in meta.json and ckpt.pt
    return {k: tok.from_meta(json.loads(json.dumps(t.to_meta()))) for k, t in made.items()}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=sorted(set(CORPUS)), max_size=200))
def test_char_round_trips_text_over_its_vocabulary(tokenizers, text):
    t = tokenizers["char"]
    assert t.decode(t.encode(text)) == text


@pytest.mark.parametrize("kind", ["byte", "bpe", "gpt2"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_byte_level_tokenizers_round_trip_any_text(tokenizers, kind, text):
    if kind not in tokenizers:
        pytest.skip(f"{kind} tokenizer unavailable offline")
    t = tokenizers[kind]
    ids = t.encode(text)
    assert all(0 <= i < t.vocab_size for i in ids)
    assert t.decode(ids) == text


# ------------------------------------------------------------------------------------------------
# On a CUDA GPU (pytest -m gpu): fused AdamW skips a bad step on the device, with no host sync

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_gpu_bad_step_is_skipped_without_a_host_sync(optimizer):
    """Fused AdamW, and Muon for the weight with fused AdamW for the bias (the muon optimizer)."""
    from gpt.optim import Muon, Optimizers
    model = torch.nn.Linear(8, 8).cuda()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    else:
        opt = Optimizers(Muon([model.weight], lr=0.05), torch.optim.AdamW([model.bias], lr=0.1, fused=True))
    bad = train.BadSteps()

    def step(poison):
        loss = model(torch.randn(4, 8, device="cuda")).square().mean() * (float("nan") if poison else 1.0)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        train.step_if_finite(opt, ok)
        opt.zero_grad(set_to_none=True)
        bad.add(ok)

    step(False)
    before = [p.detach().clone() for p in model.parameters()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in here raises
    try:
        step(True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    step(False)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert bad.count() == 1 and bad.streak == 0
    adamw = opt if optimizer == "adamw" else opt.optimizers[1]
    assert all(s["step"].item() == 2 for s in adamw.state.values())


@pytest.mark.gpu
@needs_cuda
def test_gpu_run_skips_nan_steps_and_resumes(data_root, tmp_path, monkeypatch):
    """train.py on CUDA (bf16, fused AdamW): injected NaN steps are skipped and counted; a run stopped
    by --max_iters and resumed follows the uninterrupted one (to 1e-3: GPU kernels may not be
    bitwise deterministic)."""
    gpu_args = [a for a in TINY if a not in ("--device", "cpu")]
    gpu_args += ["--device", "cuda", "--log_interval", "1", "--eval_interval", "10", "--data_dir", data_root]
    monkeypatch.setenv(train.NAN_STEPS, "3,4")
    assert in_process(*gpu_args, "--out_dir", tmp_path / "nan", "--max_iters", "10") is None
    records = [r for r in read_log(tmp_path / "nan" / "log.jsonl") if r["kind"] == "train"]
    assert [r["bad_steps"] for r in records] == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2]
    assert np.isfinite(records[-1]["loss"])
    monkeypatch.delenv(train.NAN_STEPS)
    assert in_process(*gpu_args, "--out_dir", tmp_path / "ref", "--max_iters", "30") is None
    assert in_process(*gpu_args, "--out_dir", tmp_path / "early", "--max_iters", "10",
                      "--lr_decay_iters", "30") is None
    assert in_process("--resume", "--out_dir", tmp_path / "early", "--max_iters", "30") is None
    ref, got = curve(tmp_path / "ref"), curve(tmp_path / "early")
    assert [r[:2] + r[4:5] for r in ref] == [r[:2] + r[4:5] for r in got]  # same records, same lr
    for a, b in zip(ref, got):
        assert np.isclose(a[2] or a[3], b[2] or b[3], rtol=1e-3), (a, b)
