"""Distributed training on CPU with the gloo backend: torchrun launches 2 processes of train.py.

DDP 2 ranks x batch B follows 1 process x batch 2B; FSDP2 follows DDP and its checkpoint loads in
one process; DiLoCo with outer lr 1 and no momentum is plain averaging; bytes on the wire."""

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
