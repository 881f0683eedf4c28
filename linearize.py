"""Linearize a model trained by train.py (LoLCATs): its attention layers become Hedgehog linear
attention with a small softmax window (layer letter H), in two cheap stages; the result is an
ordinary checkpoint that sampling.py loads, and whose decoding memory does not grow with the context.

    python linearize.py --ckpt out/shakespeare-char              # -> out/shakespeare-char-linear/
    python linearize.py --ckpt out/run/ckpt.pt --out_dir out/lin --window 64 --finetune_iters 500
    python sampling.py --out_dir out/shakespeare-char-linear

Stage 1, attention transfer: the teacher is frozen; each H layer starts from its softmax layer's
q, k, v and output weights, and only its feature maps (and window factor) train, to match that
layer's output on the teacher's own input to it (MSE per layer; AdamW at lr 1e-2, as in LoLCATs).
Stage 2, LoRA: adapters (rank 8, alpha 16) on every H layer's c_attn and c_proj train on the next-
token loss of the teacher's dataset, then fold into the weights. Both stages read batches of the
teacher's block_size from its training split. Writes out_dir/: ckpt.pt (the model, its config with
layers "H", the teacher's tokenizer), log.jsonl, transfer.png (MSE per layer) and loss.png; prints
both models' validation loss and the tokens each stage read against the teacher's.
The algorithms live in gpt/linear_attention.py and gpt/lora.py.
"""

import argparse
import contextlib
import json
import os
import sys
import time

import torch

from gpt import checkpoint, config as cfg, linear_attention, lora, plot
from gpt.loader import Loader, open_split
from gpt.model import GPT
from gpt.optim import lr_at, set_lr

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the teacher: a run folder (its ckpt.pt) or a checkpoint file")
    p.add_argument("--out_dir", help="where the linearized run goes (default: the teacher's folder + '-linear')")
    p.add_argument("--window", type=int, default=64, help="softmax window of the H layers (0: linear only)")
    p.add_argument("--features", type=int, default=0, help="feature-map width per sign (0: head_dim)")
    p.add_argument("--transfer_iters", type=int, default=300, help="stage 1 steps")
    p.add_argument("--transfer_lr", type=float, default=1e-2)
    p.add_argument("--finetune_iters", type=int, default=300, help="stage 2 steps")
    p.add_argument("--lr", type=float, default=1e-3, help="stage 2 peak learning rate (LoRA)")
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--batch_size", type=int, default=0, help="sequences per step (0: the teacher's)")
    p.add_argument("--eval_iters", type=int, default=20, help="validation batches per evaluation")
    p.add_argument("--eval_interval", type=int, default=100, help="stage 2 steps between evaluations")
    p.add_argument("--log_interval", type=int, default=10)
    p.add_argument("--data_dir", help="where the teacher's dataset lives (default: as it was trained)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1337)
    a = p.parse_args(argv)
    for name in ("transfer_iters", "finetune_iters", "lora_rank", "eval_iters", "eval_interval", "log_interval"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    path = a.ckpt if a.ckpt.endswith(".pt") else os.path.join(a.ckpt, "ckpt.pt")
    try:
        ckpt = checkpoint.load(path)
        teacher_config = checkpoint.model_config(ckpt)
        student_config = linear_attention.linearized_config(teacher_config, a.window, a.features)
        tc = ckpt["train_config"]
        data_dir = os.path.join(ROOT, a.data_dir or tc["data_dir"], tc["dataset"])
        device, T, B = a.device, teacher_config.block_size, a.batch_size or tc["batch_size"]
        loader = Loader(open_split(data_dir, "train"), B, T, seed=a.seed, device=device, name="train")
        val_loader = Loader(open_split(data_dir, "val"), B, T, seed=0, device=device, name="val")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    val_batches = [val_loader.get(i) for i in range(max(1, min(a.eval_iters, val_loader.n_chunks // B)))]
    out_dir = a.out_dir or os.path.dirname(os.path.abspath(path)).rstrip("/") + "-linear"
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(a.seed)
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    teacher = GPT(teacher_config)
    teacher.load_state_dict(ckpt["model"])
    teacher.to(device).eval().requires_grad_(False)
    student = linear_attention.linearized(teacher, a.window, a.features)
    student_config = student.config
    records = []

    def log(record):
        records.append(record)
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def val_loss(model):
        was_training = model.training
        model.eval()
        with autocast:
            loss = sum(model(x, y)[1].float() for x, y in val_batches) / len(val_batches)
        model.train(was_training)
        return loss.item()

    def schedule(iters, lr):  # cosine to lr / 10 after a warmup of a tenth (gpt/optim.py)
        return cfg.TrainConfig(lr=lr, min_lr=lr / 10, warmup_iters=iters // 10, max_iters=iters)

    open(os.path.join(out_dir, "log.jsonl"), "w").close()
    t0 = time.time()
    teacher_val = val_loss(teacher)
    log({"kind": "eval", "stage": "teacher", "step": 0, "tokens": 0, "val_loss": teacher_val})
    print(f"teacher {path}: {teacher.num_params() / 1e6:.2f}M parameters, layers {teacher_config.layers!r}, "
          f"val loss {teacher_val:.4f}; linearized: layers {student_config.layers!r}, window {a.window}")

    # --- stage 1: attention transfer -------------------------------------------------------------
    student.eval().requires_grad_(False)
    params = linear_attention.transfer_parameters(student)
    for p_ in params:
        p_.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=a.transfer_lr, weight_decay=0.0)
    sched = schedule(a.transfer_iters, a.transfer_lr)
    for step in range(a.transfer_iters):
        set_lr(opt, lr_at(step, sched))
        x, _ = loader.next()
        with autocast:
            mse = linear_attention.transfer_loss(teacher, student, x)  # (n_layers,)
        mse.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0 or (step + 1) % a.log_interval == 0 or step + 1 == a.transfer_iters:
            log({"kind": "transfer", "step": step + 1, "tokens": (step + 1) * B * T, "mse": mse.tolist()})
    first, last = (r["mse"] for r in (records[1], records[-1]))  # the first and the last transfer record
    print(f"stage 1, attention transfer ({a.transfer_iters} steps): MSE per layer "
          + ", ".join(f"{f:.2e} -> {l_:.2e}" for f, l_ in zip(first, last))
          + f"; val loss {val_loss(student):.4f} ({time.time() - t0:.0f}s)")

    # --- stage 2: LoRA fine-tune on the next-token loss -------------------------------------------
    student.train()
    adapters = lora.apply(student, a.lora_rank, a.lora_alpha, targets=("mixer.c_attn", "mixer.c_proj"))
    opt = torch.optim.AdamW(adapters, lr=a.lr, weight_decay=0.0)
    sched = schedule(a.finetune_iters, a.lr)
    transfer_tokens = a.transfer_iters * B * T
    for step in range(a.finetune_iters):
        set_lr(opt, lr_at(step, sched))
        x, y = loader.next()
        with autocast:
            _, loss = student(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapters, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens = transfer_tokens + (step + 1) * B * T
        if (step + 1) % a.log_interval == 0:
            log({"kind": "train", "stage": "finetune", "step": step + 1, "tokens": tokens, "loss": loss.item()})
        if (step + 1) % a.eval_interval == 0 or step + 1 == a.finetune_iters:
            log({"kind": "eval", "stage": "finetune", "step": step + 1, "tokens": tokens,
                 "val_loss": val_loss(student)})
    lora.merge(student)
    student.eval()

    # --- the result ------------------------------------------------------------------------------
    final_val = val_loss(student)
    teacher_tokens = ckpt.get("step", 0) * tc["batch_size"] * tc.get("grad_accum", 1) * T
    used = transfer_tokens + a.finetune_iters * B * T
    summary = {"teacher": path, "teacher_val_loss": teacher_val, "val_loss": final_val,
               "tokens": used, "teacher_tokens": teacher_tokens, "args": vars(a)}
    log({"kind": "summary", "step": a.finetune_iters, **summary})
    checkpoint.save(os.path.join(out_dir, "ckpt.pt"), {
        "model": student.state_dict(), "model_config": cfg.to_dict(student_config),
        "train_config": {**tc, "out_dir": out_dir}, "tokenizer": ckpt["tokenizer"], "linearize": summary})
    checkpoint.write_text(os.path.join(out_dir, "config.json"), json.dumps(
        {"model": cfg.to_dict(student_config), "linearize": vars(a), "data": data_dir}, indent=2))
    transfer_plot(records, student_config, os.path.join(out_dir, "transfer.png"),
                  title=f"attention transfer: {path}")
    plot.loss_curves([r for r in records if r.get("stage") == "finetune"], os.path.join(out_dir, "loss.png"),
                     title=f"LoRA fine-tune of the linearized {path}")
    share = f" ({used / teacher_tokens:.1%} of the teacher's {teacher_tokens:,})" if teacher_tokens else ""
    print(f"val loss: teacher {teacher_val:.4f}, linearized {final_val:.4f} "
          f"({final_val / teacher_val - 1:+.1%}); tokens read: {used:,}{share}; {time.time() - t0:.0f}s")
    print(f"saved {out_dir}/ckpt.pt; sample with: python sampling.py --out_dir {out_dir}")
    return summary


def transfer_plot(records, config, path, title):
    """Stage 1's MSE per layer against steps, log scale."""
    steps = [r["step"] for r in records if r["kind"] == "transfer"]
    mse = [r["mse"] for r in records if r["kind"] == "transfer"]
    layers = [i for i, c in enumerate(config.layer_kinds()) if c == "H"]
    plot.lines({f"layer {layer}": (steps, curve) for layer, curve in zip(layers, zip(*mse))}, path,
               title, "attention-transfer step", "MSE to the softmax layer's output", logy=True)


if __name__ == "__main__":
    main()
