"""Train a GPT on a dataset prepared by data/data.py.

    python train.py                                   # shakespeare-char on a GPU, cpu-tiny on a CPU
    python train.py --preset shakespeare-char --max_iters 2000 --lr 1e-3
    python train.py --preset gpt2-124m --dataset tinystories_gpt2
    python train.py --resume --out_dir out/cpu-tiny    # continue a run from its ckpt.pt

Every field of GPTConfig and TrainConfig (gpt/config.py) can be set with --key value; presets are
named sets of such values. The run writes out_dir/: config.json, log.jsonl (one JSON record per
logged step and per evaluation), loss.png (redrawn at each evaluation) and ckpt.pt (atomic; written
at each evaluation and when the run is stopped; --keep_checkpoints K keeps the last K).

Stopping and resuming. Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes ckpt.pt and
exits with status 0; a second Ctrl-C aborts at once (the last checkpoint stays whole). --resume
continues exactly: the checkpoint holds the model, the optimizer, the step, the loader's position
and the RNG states, so every later step's loss is the uninterrupted run's (bit for bit on a CPU).
The learning rate is a function of the step and of the schedule's length, lr_decay_iters (0: use
max_iters). So resuming with a larger --max_iters stretches the schedule from the resumed step on
(train.py says so); to stop early and continue on the planned schedule, set --lr_decay_iters to the
planned length from the start. A new run refuses an out_dir holding a checkpoint (--resume it, or
--overwrite).

Numerical faults. A step whose loss or gradient norm is not finite is skipped (no update) and
counted ("bad_steps" in the log); after max_bad_steps such steps in a row the run stops with an
error, its last checkpoint untouched.
"""

import argparse
import contextlib
import glob
import json
import math
import os
import signal
import sys
import time

LAUNCHED = time.time()  # before torch is imported: "since_launch" in the log counts from here

import torch  # noqa: E402
from tqdm import tqdm

from gpt import checkpoint, config as cfg, distributed, moe
from gpt.loader import Loader, load_meta, open_split
from gpt.model import GPT, compile_model, graph_step, peak_flops
from gpt.optim import Muon, lr_at, make_optimizer, set_lr

ROOT = os.path.dirname(os.path.abspath(__file__))
NAN_STEPS = "GPT_TEST_NAN_STEPS"  # testing hook: "3,4" makes the loss of steps 3 and 4 (0-based) NaN


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any config field: --key value (see gpt/config.py).")
    p.add_argument("--preset", choices=sorted(cfg.PRESETS), help="named configuration to start from")
    p.add_argument("--resume", nargs="?", const=True, metavar="CKPT",
                   help="continue the run in --out_dir from its ckpt.pt, or from the checkpoint file CKPT")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an out_dir that holds a run, deleting its checkpoints")
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
    """Configs, device, data and checkpoint (None for a new run) of a new or resumed run."""
    device = pick_device(overrides.get("device", "auto"))
    preset = args.preset or ("shakespeare-char" if device == "cuda" else "cpu-tiny")
    ckpt = None
    if args.resume:
        path = args.resume if isinstance(args.resume, str) else \
            overrides.get("out_dir") or cfg.PRESETS[preset]["out_dir"]
        if not path.endswith(".pt"):
            path = os.path.join(path, "ckpt.pt")
        ckpt = checkpoint.load(path)
        # the run's own settings, then what this command line changes (training fields only)
        saved = {**ckpt["model_config"], **ckpt["train_config"]}
        merged = {**saved, "out_dir": os.path.dirname(path) or ".", **overrides}
        model_kw, train_kw = cfg.split_fields(merged)
        mc, tc = cfg.GPTConfig(**model_kw), cfg.TrainConfig(**train_kw)
        checkpoint.check_compatible(ckpt, mc)
        device = pick_device(tc.device)
        if tc.max_iters < ckpt["step"]:
            raise ValueError(f"{path} is at step {ckpt['step']}, past --max_iters {tc.max_iters}")
        if tc.max_iters != saved["max_iters"] and not tc.lr_decay_iters:
            print(f"note: max_iters {saved['max_iters']} -> {tc.max_iters}: the learning-rate schedule "
                  f"now spans {tc.max_iters} steps, so the lr changes from step {ckpt['step']} on "
                  f"(--lr_decay_iters {saved['max_iters']} keeps the old schedule)")
    else:
        if args.preset is None and device != "cuda":
            print(f"no CUDA GPU found ({device}): using --preset cpu-tiny (pass --preset to choose)")
        mc, tc = cfg.build(preset, overrides)
        if os.path.exists(os.path.join(tc.out_dir, "ckpt.pt")) and not args.overwrite:
            raise ValueError(f"{tc.out_dir}/ already holds a run (ckpt.pt): continue it with --resume, "
                             f"start another with --out_dir DIR, or replace it with --overwrite")
    data_dir = os.path.join(ROOT, tc.data_dir, tc.dataset)  # an absolute data_dir stays as it is
    meta = load_meta(data_dir)
    if ckpt is not None and ckpt["tokenizer"] != meta["tokenizer"]:
        raise ValueError(f"{data_dir} is not tokenized like the checkpoint's run; resume on the run's "
                         f"own dataset (--dataset {ckpt['train_config']['dataset']})")
    if "vocab_size" not in overrides and ckpt is None:
        mc.vocab_size = -(-meta["vocab_size"] // 128) * 128  # pad to a multiple of 128: faster matmuls
    if meta["vocab_size"] > mc.vocab_size:
        raise ValueError(f"dataset vocabulary ({meta['vocab_size']}) > model vocab_size ({mc.vocab_size})")
    return mc, tc, device, data_dir, meta, ckpt


def step_if_finite(optimizer, ok):
    """optimizer.step(), skipped when `ok` (a 0-d bool tensor on the device) is False.

    Fused AdamW (ours on CUDA) reads the verdict on the device, as `found_inf`, the tensor through
    which torch.amp.GradScaler skips steps, and so does our Muon: no host sync. Other optimizers
    (AdamW off CUDA) need it on the host: one sync per step, which costs nothing on a CPU.
    """
    optimizers = getattr(optimizer, "optimizers", [optimizer])  # optim.Optimizers holds several
    if all(getattr(opt, "defaults", {}).get("fused") or isinstance(opt, Muon) for opt in optimizers):
        found_inf = (~ok).float()
        for opt in optimizers:
            opt.found_inf = found_inf
        optimizer.step()
    elif ok.item():
        optimizer.step()


class BadSteps:
    """Counts the steps whose loss or gradient norm was not finite. Each step's verdict stays on the
    device until it is read (at a log step or a checkpoint), so counting adds no host sync."""

    def __init__(self, total=0, streak=0):
        self.total, self.streak = total, streak  # bad steps in all, and in a row up to now
        self.longest = streak  # the longest run of bad steps seen
        self.pending = []

    def add(self, ok):
        self.pending.append(ok)

    def count(self):
        """Bad steps so far (reads the pending verdicts)."""
        if self.pending:
            for good in torch.stack(self.pending).tolist():
                self.streak = 0 if good else self.streak + 1
                self.total += not good
                self.longest = max(self.longest, self.streak)
            self.pending.clear()
        return self.total


def main(argv=None):
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        mc, tc, device, data_dir, meta, ckpt = setup(args, overrides)
        d, device = distributed.setup(device)  # under torchrun: this rank's place and GPU
        loader = Loader(open_split(data_dir, "train"), tc.batch_size, mc.block_size, seed=tc.seed,
                        rank=d.rank, world_size=d.world_size, device=device, name="train")
        val_loader = Loader(open_split(data_dir, "val"), tc.batch_size, mc.block_size, seed=0,
                            device=device, name="val")
        if ckpt is not None:
            loader.load_state_dict(ckpt["loader"])
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
    # the whole step as one CUDA graph (model.graph_step), compiled or not
    graphed = tc.cuda_graph and device_type == "cuda"
    # a captured step cannot use autocast's weight-cast cache (its casts would not be replayed)
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=not graphed)
                if dtype == "bfloat16" else contextlib.nullcontext())
    n_val_batches = max(1, min(tc.eval_iters, val_loader.n_chunks // tc.batch_size))

    # --- model and optimizer --------------------------------------------------------------------
    raw_model = GPT(mc).to(device)  # the same seed on every rank: the same initial weights
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
    # DDP / FSDP2 under torchrun; FSDP2 gathers the blocks in bf16 when training in bf16 on CUDA
    # (on CPU, layer_norm rejects bf16 weights with fp32 inputs)
    param_dtype = torch.bfloat16 if dtype == "bfloat16" and device_type == "cuda" else None
    model = distributed.wrap(raw_model, tc.parallel, d, device_type, param_dtype)
    comm = distributed.CommCounter()  # bytes all-reduced by this rank
    if isinstance(model, distributed.DDP):
        comm.attach(model)
    optimizer = make_optimizer(raw_model, tc, device_type)
    diloco = (distributed.DiLoCo(raw_model, tc.diloco_inner_steps, tc.diloco_outer_lr,
                                 tc.diloco_outer_momentum, d, comm) if tc.parallel == "diloco" else None)
    start_step, best_val, last_eval, bad = 0, float("inf"), -1, BadSteps()
    if ckpt is not None:
        try:
            distributed.load_optimizer_state(model, optimizer, ckpt["optimizer"])
            if diloco is not None:
                diloco.load_state_dict(ckpt["diloco"])
        except (ValueError, KeyError, RuntimeError) as e:
            sys.exit(f"error: the checkpoint's optimizer state does not fit this optimizer: {e}")
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device_type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        start_step, best_val, last_eval = ckpt["step"], ckpt["best_val"], ckpt["last_eval"]
        bad = BadSteps(ckpt["bad_steps"], ckpt["bad_streak"])
    wrapped = model  # what the state-dict helpers take (they see through DDP / FSDP2)
    if tc.compile and device_type == "cuda":
        # under FSDP2 Dynamo skips GPT.forward (FSDP's hooks break its block loop) and compiles each
        # Block.forward and the loss apart: regional compilation, with the loss compiled as well
        model = compile_model(model, tc.compile_mode, tc.compile_blocks)
    if graphed and d.enabled and tc.parallel != "diloco":
        sys.exit("error: cuda_graph runs on one GPU (or under DiLoCo); DDP and FSDP2 hook into "
                 "backward: pass --cuda_graph false")

    # --- the run's folder -----------------------------------------------------------------------
    os.makedirs(tc.out_dir, exist_ok=True)
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    main_rank = d.is_main  # only rank 0 writes files and prints
    if args.overwrite and ckpt is None and main_rank:
        for old in glob.glob(os.path.join(tc.out_dir, "ckpt*.pt")):
            os.remove(old)
    if main_rank:
        checkpoint.write_text(os.path.join(tc.out_dir, "config.json"), json.dumps(
            {"model": cfg.to_dict(mc), "train": cfg.to_dict(tc), "data": data_dir}, indent=2))
    log_path = os.path.join(tc.out_dir, "log.jsonl")
    records = []
    if ckpt is not None and os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a crash
                    records.append(json.loads(line))
    # a resumed run drops what was logged after its checkpoint
    records = [r for r in records if r["step"] < start_step or
               (r["step"] == start_step and (r["kind"] == "train" or last_eval == start_step))]
    if main_rank:
        checkpoint.write_text(log_path, "".join(json.dumps(r) + "\n" for r in records))

    def log(record):
        records.append(record)
        if not main_rank:
            return
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate():
        model.eval()
        total = torch.zeros((), device=device)  # summed on the device: one host sync, at the end
        for i in range(n_val_batches):
            x, y = val_loader.get(i)
            with autocast:
                _, loss = model(x, y)
            total += loss.float()
        model.train()
        return (total / n_val_batches).item()

    def save_checkpoint(step):
        rng = {"cpu": torch.get_rng_state()}
        if device_type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        bad_steps = bad.count()
        model_state, optim_state = distributed.full_state(wrapped, optimizer)  # every rank takes part
        if not main_rank:
            return
        checkpoint.save(ckpt_path, {
            "model": model_state, "optimizer": optim_state,
            **({"diloco": diloco.state_dict()} if diloco is not None else {}),
            "model_config": cfg.to_dict(mc), "train_config": cfg.to_dict(tc),
            "tokenizer": meta["tokenizer"], "loader": loader.state_dict(), "rng": rng,
            "step": step, "best_val": best_val, "last_eval": last_eval,
            "bad_steps": bad_steps, "bad_streak": bad.streak,
        }, keep=tc.keep_checkpoints)

    # Ctrl-C (SIGINT) and SIGTERM ask the loop to stop at the next step boundary, with a checkpoint.
    stop = []  # the name of the signal that asked

    def request_stop(signum, frame):
        if stop:
            raise KeyboardInterrupt  # asked twice: abort now (the last checkpoint stays whole)
        stop.append(signal.Signals(signum).name)

    handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    # --- the loop -------------------------------------------------------------------------------
    tokens_per_step = tc.batch_size * mc.block_size * tc.grad_accum * d.world_size
    flops_per_step = raw_model.flops_per_token(mc.block_size) * tokens_per_step
    peak = peak_flops(device) if device_type == "cuda" else None
    nan_steps = {int(s) for s in os.environ.get(NAN_STEPS, "").split(",") if s}
    poison = torch.ones((), device=device) if nan_steps else None  # NaN at those steps (a test hook)

    def train_step(batches):
        """One optimizer step on grad_accum micro-batches [(x, y), ...]. Returns the last micro-step's
        loss, the gradient norm and the verdict `ok` (all on the device: no host sync)."""
        optimizer.zero_grad(set_to_none=True)
        for micro, (x, y) in enumerate(batches):
            # gradients are all-reduced on the last micro-step only
            with distributed.grad_sync(model, micro == tc.grad_accum - 1), autocast:
                _, loss = model(x, y)
                if poison is not None:
                    loss = loss * poison
                aux = raw_model.aux_loss()
                total = loss if aux is None else loss + aux
            (total / tc.grad_accum).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        grad_norm = getattr(grad_norm, "full_tensor", lambda: grad_norm)()  # FSDP2: a sharded norm
        ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        step_if_finite(optimizer, ok)  # a non-finite loss or gradient changes nothing
        return loss.detach(), grad_norm, ok

    if graphed:  # the whole step as one CUDA graph, replayed at each step (model.graph_step)
        shape = (tc.batch_size, mc.block_size)
        try:
            train_step = graph_step(raw_model, optimizer, train_step, [
                (torch.zeros(shape, dtype=torch.long, device=device),) * 2 for _ in range(tc.grad_accum)])
        except ValueError as e:
            sys.exit(f"error: {e}")
    if main_rank:
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {tokens_per_step} tokens/step, "
              f"device {device}, {dtype}, data {data_dir}"
              + (f", {d.world_size} ranks ({tc.parallel})" if d.enabled else ""))
    saved_step = start_step if ckpt is not None else None
    agreed = False
    t_start = time.time()
    t_last, tokens_since = time.time(), 0
    bar = tqdm(range(start_step, tc.max_iters + 1), initial=start_step, total=tc.max_iters + 1,
               dynamic_ncols=True, disable=None if main_rank else True)
    for step in bar:  # step = optimizer steps done so far
        # under torchrun all ranks stop together, at a log step where they agreed (below)
        if (stop and (agreed or not d.enabled)) or bad.longest >= tc.max_bad_steps:
            break
        lr = lr_at(step, tc)
        set_lr(optimizer, lr)
        if (step % tc.eval_interval == 0 or step == tc.max_iters) and step != last_eval:
            val_loss = evaluate()
            best_val = min(best_val, val_loss)
            last_eval = step
            log({"kind": "eval", "step": step, "tokens": step * tokens_per_step,
                 "flops": step * flops_per_step, "val_loss": val_loss,
                 "best_val": best_val, "time": time.time() - t_start,
                 "since_launch": time.time() - LAUNCHED})
            if main_rank:
                tqdm.write(f"step {step}: val loss {val_loss:.4f} (best {best_val:.4f}) "
                           f"at {time.time() - t_start:.1f}s")
            # loss.png and ckpt.pt (~0.5 s): at every evaluation, or with save_interval at the steps it
            # divides (step 0, where nothing is learnt yet, left out) and at the end
            if not tc.save_interval or (step and step % tc.save_interval == 0) or step == tc.max_iters:
                if main_rank:
                    from gpt import plot  # matplotlib, imported when first needed: ~0.7 s of startup
                    plot.loss_curves(records, os.path.join(tc.out_dir, "loss.png"), title=tc.out_dir)
                    moe.save_usage_heatmaps(records, tc.out_dir)  # experts_*.png when the model routes
                if math.isfinite(val_loss):  # never replace a checkpoint with a broken model
                    save_checkpoint(step)
                    saved_step = step
        if step == tc.max_iters:
            break

        if poison is not None:
            poison.fill_(float("nan") if step in nan_steps else 1.0)
        loss, grad_norm, ok = train_step([loader.next() for _ in range(tc.grad_accum)])
        raw_model.after_step()
        if diloco is not None:
            diloco.after_inner_step(step)  # every diloco_inner_steps: average the workers
        bad.add(ok)
        tokens_since += tokens_per_step

        if (step + 1) % tc.log_interval == 0:
            loss_value = distributed.mean_across_ranks(loss.item(), d)  # the host sync of a logged step
            if d.enabled:
                agreed = distributed.any_rank(bool(stop), d)  # a signal seen by any rank stops all
                if agreed and not stop:
                    stop.append("SIGINT")
            dt = time.time() - t_last
            tok_s = tokens_since / dt
            record = {"kind": "train", "step": step + 1, "tokens": (step + 1) * tokens_per_step,
                      "flops": (step + 1) * flops_per_step,
                      "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                      "bad_steps": bad.count(), "tok_per_s": tok_s, "time": time.time() - t_start,
                      "comm_bytes": comm.bytes}
            if peak:
                record["mfu"] = flops_per_step * (tokens_since / tokens_per_step) / dt / peak
            record.update({k: v.tolist() for k, v in raw_model.stats().items()})
            log(record)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}")
            t_last, tokens_since = time.time(), 0
    bar.close()
    for s, handler in handlers.items():
        signal.signal(s, handler)

    bad.count()
    if bad.longest >= tc.max_bad_steps:
        last = f"{ckpt_path} (step {saved_step})" if saved_step is not None else "none was written"
        sys.exit(f"error: {tc.max_bad_steps} steps in a row had a non-finite loss or gradient norm "
                 f"({bad.total} skipped in all); stopped at step {step}. Last good checkpoint: {last}. "
                 f"Lower --lr, set --grad_clip, or check the data")
    if stop:
        if saved_step != step:
            save_checkpoint(step)
        if main_rank:
            print(f"{stop[0]}: stopped at step {step}, checkpoint saved to {ckpt_path}; continue with "
                  f"python train.py --resume --out_dir {tc.out_dir}")
    elif main_rank:
        print(f"done: best val loss {best_val:.4f}, {time.time() - t_start:.1f}s, run in {tc.out_dir}/")
    distributed.teardown(d)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("aborted: the last checkpoint written is intact")
