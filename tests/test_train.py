"""train.py end to end (issue 2): a few steps of a tiny model on the tiny dataset write config.json,
log.jsonl, loss.png and ckpt.pt; a bad command line fails clearly. Resume, signals, faults and
bad inputs are in test_reliability.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

import train
from gpt import checkpoint
from gpt.plot import read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_train(*argv, env=ENV):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, argv)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = run_train("--preset", "cpu-tiny", "--data_dir", data_root, "--dataset", "tiny_char", "--out_dir", out,
                     "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16",
                     "--batch_size", "8", "--max_iters", "20", "--eval_interval", "10", "--log_interval", "5",
                     "--lr", "3e-3", "--warmup_iters", "5", "--device", "cpu", "--compile", "false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_writes_config_log_plot_and_checkpoint(run):
    out, stdout = run
    assert sorted(os.listdir(out)) == ["ckpt.pt", "config.json", "log.jsonl", "loss.png"]
    assert "done: best val loss" in stdout

    config = json.loads((out / "config.json").read_text())
    assert config["model"]["n_layer"] == 2 and config["train"]["max_iters"] == 20
    assert config["model"]["vocab_size"] % 64 == 0  # the char vocabulary, padded

    records = read_log(out / "log.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert all(r["tok_per_s"] > 0 and r["bad_steps"] == 0 for r in train_records)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learns

    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = checkpoint.load(str(out / "ckpt.pt"))
    assert ckpt["step"] == 20 and ckpt["model_config"] == config["model"]
    model = train.GPT(checkpoint.model_config(ckpt))
    model.load_state_dict(ckpt["model"])  # the uncompiled model's own keys


@pytest.mark.parametrize("argv, message", [
    (["--n_embed", "64"], "error: unknown config key 'n_embed'. Did you mean n_embd"),
    (["--max_iters", "ten"], "error: --max_iters expects an int, got 'ten'"),
])
def test_bad_command_lines_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="picks shakespeare-char on a GPU")
def test_without_a_gpu_the_default_is_cpu_tiny(data_root, tmp_path, capsys):
    train.main(["--data_dir", data_root, "--dataset", "tiny_char", "--out_dir", str(tmp_path),
                "--max_iters", "1", "--eval_iters", "1"])
    assert "using --preset cpu-tiny" in capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["model"]["n_embd"] == 128


def test_plot_compares_runs_from_the_command_line(run, tmp_path):
    """python -m gpt.plot: two runs on one picture, against tokens and against FLOPs; a folder
    without a log is refused with a message."""
    from gpt import plot
    folder, _ = run
    out = str(tmp_path / "cmp.png")
    plot.main([out, f"a={folder}", f"b={folder}/log.jsonl", "--x", "flops"])
    assert os.path.getsize(out) > 10_000
    plot.main([out, f"a={folder}", "--val", "--ylim", "1", "5", "--x", "step"])  # val curves only, zoomed
    assert os.path.getsize(out) > 10_000
    with pytest.raises(SystemExit):
        plot.main([out, str(tmp_path)])


# ------------------------------------------------------------------------------------------------
# CUDA graphs (train.py --cuda_graph, model.graph_step)

def test_cuda_graph_refuses_compile_modes_that_make_their_own_graphs():
    from gpt import config as cfg
    cfg.TrainConfig(cuda_graph=True, compile=True)  # inductor's kernels are captured like eager ones
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="max-autotune-no-cudagraphs"):
            cfg.TrainConfig(cuda_graph=True, compile=True, compile_mode=mode)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("optimizer, grad_accum", [("adamw", 1), ("muon", 2)])
def test_gpu_cuda_graph_run_equals_the_eager_run(data_root, tmp_path, optimizer, grad_accum):
    """The same run (no dropout: the graph draws its own random numbers) eagerly and with the step
    replayed from CUDA graphs: the same losses, step by step, up to bf16 round-off; with two
    micro-steps the second replay must not overwrite the first one's gradients."""
    assert_graph_equals_eager(tmp_path, "--preset", "shakespeare-char-speedrun", "--data_dir", data_root,
                              "--dataset", "tiny_char", "--n_layer", "2", "--n_embd", "96", "--n_head", "2",
                              "--block_size", "64", "--batch_size", "16", "--dropout", "0", "--max_iters", "40",
                              "--eval_interval", "20", "--log_interval", "5", "--optimizer", optimizer,
                              "--grad_accum", grad_accum)


def assert_graph_equals_eager(tmp_path, *argv):
    """Runs train.py with argv twice, with --cuda_graph false and true (out dirs under tmp_path):
    the run learns (8 logged losses, the last 0.5 below the first) and the graphed run's losses
    equal the eager run's up to bf16 round-off. Returns the two out dirs (eager, graphed)."""
    losses, outs = {}, {}
    for graph in (False, True):
        outs[graph] = tmp_path / f"graph{graph}"
        proc = run_train(*argv, "--out_dir", outs[graph], "--cuda_graph", str(graph).lower())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        losses[graph] = [r["loss"] for r in read_log(outs[graph] / "log.jsonl") if r["kind"] == "train"]
    eager, graphed = torch.tensor(losses[False]), torch.tensor(losses[True])
    assert len(eager) == 8 and eager[-1] < eager[0] - 0.5  # it learnt
    torch.testing.assert_close(graphed, eager, rtol=2e-2, atol=0)
    return outs[False], outs[True]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("switches", [
    ("--ffn", "moe", "--n_expert", "8", "--n_expert_active", "2", "--compile", "true"),  # compiled, grouped GEMM
    ("--mod_every", "2", "--mod_capacity", "0.5", "--compile", "false"),  # eager, top-k routing
])
def test_gpu_cuda_graph_captures_routed_models(data_root, tmp_path, switches):
    """Routing layers have fixed shapes in training, so their step is captured too: the graphed
    run gives the losses of the same run without the graph, and the MoE balancing bias moves."""
    outs = assert_graph_equals_eager(tmp_path, "--preset", "cpu-tiny", "--device", "cuda", "--data_dir", data_root,
                                     "--dataset", "tiny_char", "--n_layer", "2", "--block_size", "64",
                                     "--batch_size", "16", "--max_iters", "40", "--eval_interval", "20",
                                     "--log_interval", "5", *switches)
    if "moe" in switches:
        for out in outs:
            bias = checkpoint.load(str(out / "ckpt.pt"))["model"]["blocks.0.ffn.router.expert_bias"]
            assert bias.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_skips_non_finite_steps(data_root, tmp_path):
    """Inside the captured step a NaN loss (injected at steps 3 and 4) is skipped on the device, by
    both Muon and fused AdamW, and counted; the run goes on learning and its checkpoint is finite."""
    proc = run_train("--preset", "shakespeare-char-speedrun", "--data_dir", data_root, "--dataset", "tiny_char",
                     "--out_dir", tmp_path, "--n_layer", "2", "--n_embd", "96", "--n_head", "2", "--block_size", "64",
                     "--batch_size", "16", "--max_iters", "30", "--eval_interval", "30", "--log_interval", "1",
                     "--cuda_graph", "true", env={**ENV, train.NAN_STEPS: "3,4"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [r for r in read_log(tmp_path / "log.jsonl") if r["kind"] == "train"]
    assert [r["bad_steps"] for r in records[:6]] == [0, 0, 0, 1, 2, 2] and records[-1]["bad_steps"] == 2
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    ckpt = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert all(t.isfinite().all() for t in ckpt["model"].values())
