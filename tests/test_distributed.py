"""Distributed training on CPU with the gloo backend: torchrun launches 2 processes of train.py.

DDP 2 ranks x batch B follows 1 process x batch 2B; FSDP2 follows DDP and its checkpoint loads in
one process; DiLoCo with outer lr 1 and no momentum is plain averaging; bytes on the wire. Gradient
accumulation (in-process ranks): DDP skips the all-reduce until the last micro-step even through
torch.compile's wrapper; FSDP2 keeps its weights gathered until then, gathers the blocks in bf16
when training in bf16, and its gradients equal DDP's."""

import json
import os
import subprocess
import sys

import pytest
import torch

from gpt.loader import Loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "tiny_char", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16",
        "--max_iters", "12", "--eval_interval", "6", "--log_interval", "3", "--compile", "false",
        "--device", "cpu", "--dropout", "0.0"]


def run(tmp_path, data_root, name, batch, nproc=1, extra=()):
    out = str(tmp_path / name)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(29500 + os.getpid() % 1000 + hash(name) % 200)] if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = launcher + ["train.py", "--data_dir", data_root, *TINY, "--batch_size", str(batch),
                      "--out_dir", out, *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return out, [r for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("dist")
    return {
        "single": run(tmp, data_root, "single", batch=8),
        "ddp": run(tmp, data_root, "ddp", batch=4, nproc=2),
        "fsdp": run(tmp, data_root, "fsdp", batch=4, nproc=2, extra=["--parallel", "fsdp"]),
        "diloco": run(tmp, data_root, "diloco", batch=4, nproc=2,
                      extra=["--parallel", "diloco", "--diloco_inner_steps", "3"]),
    }


def losses(records):
    return [r["loss"] for r in records]


def test_rank_slices_are_disjoint_and_cover_the_epoch():
    data = torch.arange(16 * 40 + 1).numpy()
    B, T = 2, 16
    ranks = [Loader(data, B, T, seed=3, rank=r, world_size=2) for r in range(2)]
    single = Loader(data, 2 * B, T, seed=3)
    starts = {r: [] for r in range(2)}
    for i in range(ranks[0].n_chunks // (2 * B)):
        for r, loader in enumerate(ranks):
            starts[r] += loader.get(i)[0][:, 0].tolist()
        # together the ranks read exactly what one process with the doubled batch reads
        both = torch.cat([ranks[0].get(i)[0], ranks[1].get(i)[0]])
        assert torch.equal(both, single.get(i)[0])
    assert not set(starts[0]) & set(starts[1])
    assert len(set(starts[0]) | set(starts[1])) == 2 * B * (ranks[0].n_chunks // (2 * B))


def test_ddp_two_ranks_match_one_process_with_twice_the_batch(runs):
    single, ddp = losses(runs["single"][1]), losses(runs["ddp"][1])
    assert len(single) == len(ddp) == 4
    assert single == pytest.approx(ddp, rel=1e-4)


def test_fsdp_matches_ddp_and_its_checkpoint_loads_in_one_process(runs):
    assert losses(runs["fsdp"][1]) == pytest.approx(losses(runs["ddp"][1]), rel=1e-4)
    sys.path.insert(0, ROOT)
    from sampling import load_model
    fsdp_model, _ = load_model(runs["fsdp"][0])
    ddp_model, _ = load_model(runs["ddp"][0])
    for (name, a), b in zip(fsdp_model.state_dict().items(), ddp_model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_single_process_resumes_an_fsdp_checkpoint(runs, data_root, tmp_path):
    out = runs["fsdp"][0]
    r = subprocess.run([sys.executable, "train.py", "--resume", "--out_dir", out, "--max_iters", "15",
                        "--data_dir", data_root, "--batch_size", "8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done" in r.stdout


def test_fsdp_resumes_a_single_process_checkpoint(runs, data_root, tmp_path):
    import shutil
    out = str(tmp_path / "single_then_fsdp")
    shutil.copytree(runs["single"][0], out)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29800 + os.getpid() % 150), "train.py", "--resume",
                        "--out_dir", out, "--max_iters", "15", "--data_dir", data_root, "--batch_size", "4",
                        "--parallel", "fsdp"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "log.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert max(steps) == 15


def test_bytes_communicated_ddp_vs_diloco(runs):
    from sampling import load_model
    model, _ = load_model(runs["ddp"][0])
    n_bytes = 4 * model.num_params()  # fp32 gradients / parameter deltas
    ddp, diloco = runs["ddp"][1], runs["diloco"][1]
    steps = ddp[-1]["step"]
    assert ddp[-1]["comm_bytes"] == steps * n_bytes  # one all-reduce of every gradient per step
    assert diloco[-1]["comm_bytes"] == (steps // 3) * n_bytes  # one of the parameters per H=3 steps


def _average_worker(rank, port, result):
    import torch.distributed as dist
    from gpt.distributed import Dist, DiLoCo
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    diloco = DiLoCo(model, inner_steps=2, outer_lr=1.0, outer_momentum=0.0, d=Dist(rank, rank, 2))
    with torch.no_grad():  # two "inner steps" that move each worker somewhere different
        for p in model.parameters():
            p.add_(torch.full_like(p, rank + 1.0) * torch.arange(p.numel()).view_as(p))
    assert not diloco.after_inner_step(0)  # step 1 of H=2: no sync
    assert diloco.after_inner_step(1)
    result[rank] = [p.detach().clone() for p in model.parameters()]
    dist.destroy_process_group()


def test_diloco_with_outer_lr_1_and_no_momentum_is_parameter_averaging():
    import torch.multiprocessing as mp
    manager = mp.Manager()
    result = manager.dict()
    port = 29000 + os.getpid() % 500
    mp.spawn(_average_worker, args=(port, result), nprocs=2, join=True)
    torch.manual_seed(0)
    start = [p.detach() for p in torch.nn.Linear(4, 3).parameters()]
    for got0, got1, p0 in zip(result[0], result[1], start):
        offsets = torch.arange(p0.numel()).view_as(p0)
        expected = p0 + (1.0 + 2.0) / 2 * offsets  # the mean of the two workers' parameters
        assert torch.allclose(got0, expected) and torch.allclose(got1, expected)


def test_diloco_with_h_1_tracks_ddp(data_root, tmp_path, runs):
    _, h1 = run(tmp_path, data_root, "diloco_h1", batch=4, nproc=2,
                extra=["--parallel", "diloco", "--diloco_inner_steps", "1", "--diloco_outer_lr", "1.0",
                       "--diloco_outer_momentum", "0.0"])
    ddp = losses(runs["ddp"][1])
    assert losses(h1)[0] == pytest.approx(ddp[0], rel=1e-3)
    assert losses(h1) == pytest.approx(ddp, rel=0.03)


def _accumulate_worker(rank, port, result):
    """Three micro-steps of gradient accumulation under DDP and FSDP2 (fp32, then FSDP2 in bf16),
    the loop train.py runs, DDP called through torch.compile's wrapper."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from gpt.config import GPTConfig
    from gpt.distributed import CommCounter, Dist, grad_sync, wrap
    from gpt.model import GPT
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    d = Dist(rank, rank, 2)
    # RMSNorm: on CPU layer_norm rejects bf16 weights with fp32 inputs (bf16 gathers: CUDA only)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=32, dropout=0.0,
                       norm="rmsnorm")

    def wrapped(parallel, param_dtype=None):
        torch.manual_seed(0)  # the same initial weights for all three
        return wrap(GPT(config), parallel, d, "cpu", param_dtype)

    models = {"ddp": wrapped("ddp"), "fsdp": wrapped("fsdp"),
              "fsdp_bf16": wrapped("fsdp", torch.bfloat16)}
    counter = CommCounter()
    counter.attach(models["ddp"])
    compiled_ddp = torch.compile(models["ddp"], backend="eager")
    torch.manual_seed(1 + rank)  # each rank its own micro-batches
    batches = [torch.randint(0, 32, (2, 16)) for _ in range(3)]
    out = {"ddp_bytes": [], "kept": [], "sharded": None, "bf16_gathered": None}
    for name, model in models.items():
        call = compiled_ddp if name == "ddp" else model
        bf16 = name == "fsdp_bf16"
        losses = []
        for micro, x in enumerate(batches):
            last = micro == len(batches) - 1
            with grad_sync(call, last), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                _, loss = call(x, x)
            gathered = not any(isinstance(p, DTensor) for p in model.parameters())  # after forward
            (loss / len(batches)).backward()
            losses.append(loss.item())
            if name == "ddp":
                out["ddp_bytes"].append(counter.bytes)
            elif not last:  # every weight stays gathered through forward, backward, the next step
                after_backward = not any(isinstance(p, DTensor) for p in model.parameters())
                out["kept"].append(gathered and after_backward)
                if bf16:
                    out["bf16_gathered"] = ({p.dtype for p in model.blocks.parameters()},
                                            model.wte.weight.dtype)
        if name == "fsdp":  # after the last backward every weight is a shard again
            out["sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
        if bf16:  # what a checkpoint saves: the fp32 weights
            out["bf16_saves"] = {v.dtype for v in model.state_dict().values() if v.is_floating_point()}
        out[name] = (losses, [(p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                              for p in model.parameters()])
    result[rank] = out
    dist.destroy_process_group()


def test_grad_accumulation_ddp_fsdp_and_fsdp_bf16():
    import torch.multiprocessing as mp
    result = mp.Manager().dict()
    mp.spawn(_accumulate_worker, args=(29600 + os.getpid() % 300, result), nprocs=2, join=True)
    out = result[0]
    n_bytes = 4 * sum(g.numel() for g in out["ddp"][1])  # one fp32 all-reduce of the gradients
    assert out["ddp_bytes"] == [0, 0, n_bytes]  # no_sync seen through the compiled wrapper
    assert out["kept"] == [True, True, True, True] and out["sharded"]
    assert out["bf16_gathered"] == ({torch.bfloat16}, torch.float32)  # blocks bf16, embeddings fp32
    assert out["bf16_saves"] == {torch.float32}
    for r in (0, 1):
        ddp_losses, ddp_grads = result[r]["ddp"]
        assert result[r]["fsdp"][0] == pytest.approx(ddp_losses, rel=1e-5)
        assert result[r]["fsdp_bf16"][0] == pytest.approx(ddp_losses, rel=1e-2)
        for g_ddp, g_fsdp, g_bf16 in zip(ddp_grads, result[r]["fsdp"][1], result[r]["fsdp_bf16"][1]):
            assert torch.allclose(g_fsdp, g_ddp, rtol=1e-4, atol=1e-6)
            assert (g_bf16 - g_ddp).norm() <= 2e-2 * g_ddp.norm() + 1e-6
    assert torch.allclose(result[0]["ddp"][1][0], result[1]["ddp"][1][0])  # averaged over the ranks
