"""Train a GPT on a dataset prepared by data/data.py.

    python train.py                                   # shakespeare-char on a GPU, cpu-tiny on a CPU
    python train.py --preset shakespeare-char --max_iters 2000 --lr 1e-3
    python train.py --preset gpt2-124m --dataset tinystories_gpt2
    python train.py --resume --out_dir out/cpu-tiny    # continue a run from its ckpt.pt

Every field of GPTConfig and TrainConfig (gpt/config.py) can be set with --key value; presets are
named sets of such values. The run writes out_dir/: config.json, log.jsonl (one JSON record per
logged step and per evaluation), loss.png (redrawn at each evaluation) and ckpt.pt (atomic).
"""

import argparse
import contextlib
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from gpt import checkpoint, config as cfg, plot
from gpt.loader import Loader, load_meta, open_split
from gpt.model import GPT, peak_flops
from gpt.optim import lr_at, make_optimizer, set_lr

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any config field: --key value (see gpt/config.py).")
    p.add_argument("--preset", choices=sorted(cfg.PRESETS), help="named configuration to start from")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its ckpt.pt")
    args, rest = p.parse_known_args(argv)
    try:
        overrides = cfg.parse_overrides(rest)
    except ValueError as e:
        p.error(str(e))
    return args, overrides


def pick_device(requested):
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def setup(args, overrides):
    """Configs, device, data and model for a new or resumed run."""
    device = pick_device(overrides.get("device", "auto"))
    preset = args.preset
    if preset is None and not args.resume:
        preset = "shakespeare-char" if device == "cuda" else "cpu-tiny"
        if device != "cuda":
            print(f"no CUDA GPU found ({device}): using --preset cpu-tiny (pass --preset to choose)")
    ckpt = None
    if args.resume:
        out_dir = overrides.get("out_dir") or cfg.PRESETS.get(preset or "", {}).get("out_dir", "out/run")
        ckpt = checkpoint.load(os.path.join(out_dir, "ckpt.pt"))
        # the run's own settings, then what this command line changes (training fields only)
        merged = {**ckpt["model_config"], **ckpt["train_config"], **overrides}
        model_kw, train_kw = cfg.split_fields(merged)
        mc, tc = cfg.GPTConfig(**model_kw), cfg.TrainConfig(**train_kw)
        checkpoint.check_compatible(ckpt, mc)
    else:
        mc, tc = cfg.build(preset, overrides)
    data_dir = os.path.join(ROOT, tc.data_dir, tc.dataset) if not os.path.isabs(tc.data_dir) \
        else os.path.join(tc.data_dir, tc.dataset)
    meta = load_meta(data_dir)
    if "vocab_size" not in overrides and ckpt is None:
        mc.vocab_size = -(-meta["vocab_size"] // 64) * 64  # pad to a multiple of 64: faster matmuls
    if meta["vocab_size"] > mc.vocab_size:
        raise ValueError(f"dataset vocabulary ({meta['vocab_size']}) > model vocab_size ({mc.vocab_size})")
    return mc, tc, device, data_dir, meta, ckpt


def main(argv=None):
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        mc, tc, device, data_dir, meta, ckpt = setup(args, overrides)
        train_data, val_data = open_split(data_dir, "train"), open_split(data_dir, "val")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(tc.seed)
    device_type = "cuda" if device.startswith("cuda") else device
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = tc.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())

    # --- data -----------------------------------------------------------------------------------
    try:
        loader = Loader(train_data, tc.batch_size, mc.block_size, seed=tc.seed, device=device)
        val_loader = Loader(val_data, tc.batch_size, mc.block_size, seed=0, device=device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    n_val_batches = max(1, min(tc.eval_iters, val_loader.n_chunks // tc.batch_size))

    # --- model and optimizer --------------------------------------------------------------------
    model = GPT(mc).to(device)
    optimizer = make_optimizer(model, tc, device_type)
    start_step, best_val = 0, float("inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device_type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        start_step, best_val = ckpt["step"], ckpt["best_val"]
    raw_model = model
    if tc.compile and device_type == "cuda":
        model = torch.compile(model)

    os.makedirs(tc.out_dir, exist_ok=True)
    with open(os.path.join(tc.out_dir, "config.json"), "w") as f:
        json.dump({"model": cfg.to_dict(mc), "train": cfg.to_dict(tc), "data": data_dir}, f, indent=2)
    log_path = os.path.join(tc.out_dir, "log.jsonl")
    records = plot.read_log(log_path) if ckpt is not None and os.path.exists(log_path) else []
    records = [r for r in records if r["step"] < start_step or (r["kind"] == "eval" and r["step"] == start_step)]
    with open(log_path, "w") as f:  # a resumed run drops what was logged after its checkpoint
        f.writelines(json.dumps(r) + "\n" for r in records)

    def log(record):
        records.append(record)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = torch.zeros(n_val_batches)
        for i in range(n_val_batches):
            x, y = val_loader.get(i)
            with autocast:
                _, loss = model(x, y)
            losses[i] = loss.item()
        model.train()
        return losses.mean().item()

    def save_checkpoint(step):
        rng = {"cpu": torch.get_rng_state()}
        if device_type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        checkpoint.save(os.path.join(tc.out_dir, "ckpt.pt"), {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "model_config": cfg.to_dict(mc), "train_config": cfg.to_dict(tc),
            "tokenizer": meta["tokenizer"], "loader": loader.state_dict(), "rng": rng,
            "step": step, "best_val": best_val,
        })

    # --- the loop -------------------------------------------------------------------------------
    tokens_per_step = tc.batch_size * mc.block_size * tc.grad_accum
    flops_per_step = raw_model.flops_per_token(mc.block_size) * tokens_per_step
    peak = peak_flops(device) if device_type == "cuda" else None
    print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {tokens_per_step} tokens/step, "
          f"device {device}, {dtype}, data {data_dir}")
    t_start = time.time()
    t_last, tokens_since = time.time(), 0
    bar = tqdm(range(start_step, tc.max_iters + 1), initial=start_step, total=tc.max_iters + 1,
               dynamic_ncols=True, disable=None)
    for step in bar:
        lr = lr_at(step, tc)
        set_lr(optimizer, lr)
        evaluated_at_resume = ckpt is not None and step == start_step
        if (step % tc.eval_interval == 0 or step == tc.max_iters) and not evaluated_at_resume:
            val_loss = evaluate()
            best_val = min(best_val, val_loss)
            log({"kind": "eval", "step": step, "tokens": step * tokens_per_step, "val_loss": val_loss,
                 "best_val": best_val, "time": time.time() - t_start})
            tqdm.write(f"step {step}: val loss {val_loss:.4f} (best {best_val:.4f}) "
                       f"at {time.time() - t_start:.1f}s")
            plot.loss_curves(records, os.path.join(tc.out_dir, "loss.png"), title=tc.out_dir)
            save_checkpoint(step)
        if step == tc.max_iters:
            break

        for _ in range(tc.grad_accum):
            x, y = loader.next()
            with autocast:
                _, loss = model(x, y)
                aux = raw_model.aux_loss()
                total = loss if aux is None else loss + aux
            (total / tc.grad_accum).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        raw_model.after_step()
        tokens_since += tokens_per_step

        if (step + 1) % tc.log_interval == 0:
            loss_value = loss.item()  # the one host sync of a logged step
            dt = time.time() - t_last
            tok_s = tokens_since / dt
            record = {"kind": "train", "step": step + 1, "tokens": (step + 1) * tokens_per_step,
                      "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                      "tok_per_s": tok_s, "time": time.time() - t_start}
            if peak:
                record["mfu"] = flops_per_step * (tokens_since / tokens_per_step) / dt / peak
            record.update({k: v.tolist() for k, v in raw_model.stats().items()})
            log(record)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}")
            t_last, tokens_since = time.time(), 0
    bar.close()
    print(f"done: best val loss {best_val:.4f}, {time.time() - t_start:.1f}s, run in {tc.out_dir}/")


if __name__ == "__main__":
    main()
