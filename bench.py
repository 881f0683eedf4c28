"""Speed table: training steps (forward + backward + optimizer) and decoding, one row per named
configuration.

    python bench.py                           # every row on the GPU (slow rows only when named)
    python bench.py --rows gpt2,gpt2-fused-ce --json bench.json
    python bench.py --list                    # the rows and what each changes
    python bench.py --quick                   # CPU smoke run: tiny sizes, two steps (the tests use it)
    python bench.py --dist                    # bytes on the wire per token: DDP vs DiLoCo (CPU)
    python bench.py --rows gpt2 --profile 3   # also where a step's time goes: the top kernels

A row is a name and a dict of overrides of GPTConfig / TrainConfig fields (gpt/config.py), plus the
knobs in KNOBS below. To benchmark a concept, append a row to ROWS, usually {**GPT2, "field": value}.

Per row: a model and optimizer are built, random token batches are put on the GPU, and the training
step runs `warmup` times (the first, which compiles, is timed on its own as `first_s`), then `steps`
times between CUDA events with no host sync; the table gives the median. tok/s = tokens per step /
median step time. MFU = GPT.flops_per_token (PaLM: 6 per weight + attention) * tok/s / the GPU's
bf16 peak (gpt.model.peak_flops, or --peak-tflops). Peak memory is torch.cuda.max_memory_allocated
over the timed steps. Decode (rows with "decode": True): a bf16 copy of the model greedily generates
`--decode-tokens` tokens after a 16-token prompt, batch 1, eager, with the KV cache and without (the
whole window recomputed each token); `cache KB/seq` is Cache.nbytes() of a block_size cache / batch.
With --profile N, N more steps run under torch.profiler after the timed ones, and the operators and
kernels that took the most device time (self time, summed over the N steps) are printed per row.
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

from gpt import attention, config as cfg, moe
from gpt.generate import generate
from gpt.model import GPT, compile_model, graph_step, peak_flops
from gpt.optim import make_optimizer

# ------------------------------------------------------------------------------------------------
# The rows. Shapes first, then variants of them; the default run goes top to bottom, so the rows
# that matter most come first.

# GPT-2 small at nanoGPT's bench.py settings: 12 layers, 12 heads, 768 wide, context 1024, batch 12.
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0,
            batch_size=12, grad_accum=1, compile=True)
# nanoGPT's baby GPT for shakespeare-char (vocabulary 65 padded to 128), batch 64.
BABY = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=128, dropout=0.2,
            batch_size=64, grad_accum=1, compile=True)
# The shakespeare-char-speedrun preset's model and optimizer (gpt/config.py): eager, with the
# whole training step replayed as one CUDA graph.
SPEEDRUN = {**BABY, **{k: v for k, v in cfg.PRESETS["shakespeare-char-speedrun"].items()
                       if k in ("pos", "qk_norm", "activation", "norm", "optimizer", "muon_lr",
                                "dropout", "batch_size", "compile", "compile_blocks", "cuda_graph")}}

# GPT-2 small at a context of 8192, batch 2; LOCAL: 5 local layers (window 1024) : 1 global.
GPT2_8K = {**GPT2, "block_size": 8192, "batch_size": 2}
LOCAL = {"layers": "LLLLLG", "window": 1024, "quick": {"window": 8}}
# Routed layers at GPT-2-124M (issues 6, 7; the rows below say more), each with and without the
# whole training step replayed as one CUDA graph: MoE with the default 64 experts (top 6 + 2
# shared), MoE with 16 or 8 experts as wide as the model (top 2 + 2 shared), MoD.
MOE = {"ffn": "moe", "quick": {"n_expert": 8}}
MOE16 = {"ffn": "moe", "n_expert": 16, "n_expert_active": 2, "moe_hidden": 768,
         "quick": {"n_expert": 4, "moe_hidden": 64}}
MOE8 = {**MOE16, "n_expert": 8}
MOD = {"mod_every": 2, "mod_capacity": 0.125}
GRAPH = {"cuda_graph": True, "slow": True}

ROWS = {
    "gpt2": {**GPT2, "decode": True},                        # compiled, reference loss: nanoGPT's setup
    "gpt2-fused-ce": {**GPT2, "loss": "fused"},             # head + cross-entropy in chunks
    "gpt2-eager": {**GPT2, "compile": False},
    "speedrun": {**SPEEDRUN, "decode": True},                # the speedrun preset as it stands
    "speedrun-eager": {**SPEEDRUN, "cuda_graph": False},    # what the CUDA graphs buy
    "speedrun-compiled": {**SPEEDRUN, "cuda_graph": False, "compile": True, "compile_blocks": False},
    "speedrun-blocks": {**SPEEDRUN, "cuda_graph": False, "compile": True, "compile_blocks": True},
    "speedrun-adamw": {**SPEEDRUN, "optimizer": "adamw"},   # what Muon's step costs
    "baby-eager": {**BABY, "compile": False, "decode": True},  # nanoGPT's shakespeare-char model
    "gpt2-cudnn": {**GPT2, "sdpa": "cudnn"},                 # SDPA backend forced (default: flash)
    "gpt2-blocks": {**GPT2, "compile_blocks": True},
    # second rank (marked slow, so out of the default run to keep it within bench/gpu_check.sh's
    # budget): python bench.py --rows baby,gpt2-fused-ce-blocks,gpt2-muon,gpt2-foreach-adamw,...
    "baby": {**BABY, "slow": True},
    "gpt2-fused-ce-blocks": {**GPT2, "loss": "fused", "compile_blocks": True, "slow": True},
    "gpt2-muon": {**GPT2, "optimizer": "muon", "slow": True},
    "gpt2-foreach-adamw": {**GPT2, "adamw": "foreach", "slow": True},
    "gpt2-fused-ce-eager": {**GPT2, "loss": "fused", "compile": False, "slow": True},
    "speedrun-reduce-overhead": {**SPEEDRUN, "cuda_graph": False, "compile": True,
                                 "compile_mode": "reduce-overhead", "slow": True},
    "gpt2-efficient": {**GPT2, "sdpa": "efficient", "slow": True},
    # issue 4, context 8192: all global vs 5 local (window 1024) : 1 global, then + GQA 12 -> 4 and
    # kv_share=2 (cache KB/seq from the allocated caches; decode with --decode-tokens 1024)
    "gpt2-8k": {**GPT2_8K, "decode": True},
    "gpt2-8k-local": {**GPT2_8K, **LOCAL, "decode": True},
    "gpt2-8k-local-gqa-share": {**GPT2_8K, **LOCAL, "n_kv_head": 4, "kv_share": 2, "decode": True,
                                "quick": {"window": 8, "n_kv_head": 1}},
    # Mamba-2 (gpt/mamba.py) at context 8192, GPT-2-124M width, batch 2: all-global attention, the
    # Samba-style hybrid (Mamba-2 and sliding-window attention alternating) and a pure Mamba-2 stack.
    # Slow (a minute or more each): python bench.py --rows ctx8k-attn,ctx8k-samba,ctx8k-mamba
    "ctx8k-attn": {**GPT2, "block_size": 8192, "batch_size": 2, "decode": True, "slow": True},
    "ctx8k-samba": {**GPT2, "block_size": 8192, "batch_size": 2, "layers": "ML", "window": 1024,
                    "decode": True, "slow": True},
    "ctx8k-mamba": {**GPT2, "block_size": 8192, "batch_size": 2, "layers": "M", "decode": True,
                    "slow": True},
    # issue 6, sparse experts against "gpt2" (python bench.py --rows gpt2,gpt2-moe,gpt2-peer):
    # MoE in every layer, 64 routed experts (top 6) + 2 shared, each 384 wide (gpt/moe.py): the same
    # active parameters per token as the dense MLP, 4.3x the parameters, grouped GEMM dispatch;
    # PEER: one 1024^2 = 1M-expert layer (the last MLP; 1.6 B parameters), 8 heads x top 16.
    "gpt2-moe": {**GPT2, **MOE, "slow": True},
    # the configuration that beat dense at equal tokens on the CPU (RESULTS.md, fourth session):
    # 16 experts as wide as the model, top 2 + 2 shared (the same active parameters; 2.6x the total)
    "gpt2-moe-16": {**GPT2, **MOE16, "slow": True},
    # the whole training step replayed as one CUDA graph on top of compile (train.py --cuda_graph true)
    "gpt2-graph": {**GPT2, **GRAPH},
    # the residual stream in bf16 instead of fp32 (residual_fp32=False): half the bytes of every
    # residual add and norm, forward and backward
    "gpt2-bf16-stream": {**GPT2, "residual_fp32": False, "slow": True},
    "gpt2-bf16-stream-graph": {**GPT2, "residual_fp32": False, **GRAPH, "slow": True},
    "gpt2-moe-graph": {**GPT2, **MOE, **GRAPH},
    "gpt2-moe-16-graph": {**GPT2, **MOE16, **GRAPH},
    "gpt2-moe-8-graph": {**GPT2, **MOE8, **GRAPH},
    "gpt2-moe-8-nk-graph": {**GPT2, **MOE8, **GRAPH, "grouped_layout": "nk"},  # experts' weights d_in-contiguous
    "gpt2-peer": {**GPT2, "ffn": "peer", "moe_every": 12, "slow": True, "quick": {"peer_keys": 32}},
    # one optimizer step per 40 micro-batches, as the gpt2-124m preset trains: PEER's per-step cost
    # (AdamW, zeroing and clipping 1.6 B parameters: RESULTS.md, eighth session) spread over 40
    "gpt2-accum40": {**GPT2, "grad_accum": 40, "slow": True, "quick": {"grad_accum": 2}},
    "gpt2-peer-accum40": {**GPT2, "ffn": "peer", "moe_every": 12, "grad_accum": 40, "slow": True,
                          "quick": {"peer_keys": 32, "grad_accum": 2}},
    # issue 7, mixture-of-depths against "gpt2" (python bench.py --rows gpt2,gpt2-mod): every other
    # block routed at capacity 0.125 (gpt/mod.py; 67.6% of dense FLOPs per token). Issue target:
    # tok/s >= 1.3x dense. Decode: batch 1, the causal predictor routes, routed layers cache their tokens.
    "gpt2-mod": {**GPT2, **MOD, "decode": True, "slow": True},
    "gpt2-mod-graph": {**GPT2, **MOD, **GRAPH},
    # slow: only when named in --rows
    # the sliding-window kernels of gpt/attention.py (WINDOW_KERNEL) against each other
    "gpt2-8k-local-flash-split": {**GPT2_8K, **LOCAL, "window_kernel": "flash_split", "slow": True},
    "gpt2-8k-local-flex": {**GPT2_8K, **LOCAL, "window_kernel": "flex", "slow": True},
    "gpt2-8k-local-chunked": {**GPT2_8K, **LOCAL, "window_kernel": "chunked", "slow": True},
    "gpt2-8k-local-mask": {**GPT2_8K, **LOCAL, "window_kernel": "mask", "slow": True},
    "gpt2-max-autotune": {**GPT2, "compile_mode": "max-autotune-no-cudagraphs", "slow": True},
    "gpt2-fused-ce-max-autotune": {**GPT2, "loss": "fused", "compile_mode": "max-autotune-no-cudagraphs",
                                   "slow": True},
    # Multi-head latent attention (gpt/mla.py, r = 256, d_r = 32) against MHA at GPT-2-124M width, both
    # with RoPE: training at context 1024, then cached decoding of 32 sequences at context 8192 (MLA:
    # the absorbed path against its latent cache). python bench.py --rows gpt2-rope,gpt2-mla
    "gpt2-rope": {**GPT2, "pos": "rope", "decode": True, "decode_at": (8192, 32), "slow": True},
    "gpt2-mla": {**GPT2, "pos": "rope", "attn": "mla", "kv_lora_rank": 256, "qk_rope_head_dim": 32,
                 "decode": True, "decode_at": (8192, 32), "slow": True,
                 "quick": {"kv_lora_rank": 64, "qk_rope_head_dim": 16}},  # 4 d_h, d_h / 2 of QUICK
    # BitNet b1.58 (gpt/bitnet.py): ternary MLPs, attention in bf16, against the bf16 "gpt2" row
    # (issue 8 goal: >= 0.75x its tokens/s). python bench.py --rows gpt2,gpt2-bitnet,gpt2-bitnet-all
    "gpt2-bitnet": {**GPT2, "bitnet": "all_but_attention", "slow": True},
    "gpt2-bitnet-all": {**GPT2, "bitnet": "all", "slow": True},
    # Linear attention (gpt/linear_attention.py): every layer H, Hedgehog feature maps and a softmax
    # window of 64 (LoLCATs), GPT-2-124M width. Training against "gpt2-rope" / "ctx8k-attn"; cached
    # decoding of 32 sequences at context 8192 against gpt2-rope's KV cache (the H cache does not grow).
    # python bench.py --rows gpt2-rope,gpt2-hedgehog,ctx8k-attn,ctx8k-hedgehog
    "gpt2-hedgehog": {**GPT2, "pos": "rope", "layers": "H", "linear_window": 64, "decode": True,
                      "decode_at": (8192, 32), "slow": True, "quick": {"linear_window": 8}},
    "ctx8k-hedgehog": {**GPT2, "block_size": 8192, "batch_size": 2, "layers": "H", "linear_window": 64,
                       "decode": True, "slow": True, "quick": {"linear_window": 8}},
}

# Knobs a row may set besides config fields, with their defaults.
KNOBS = {
    "sdpa": None,       # None (PyTorch picks) | "flash" | "cudnn" | "efficient" | "math": SDPA backend
    "adamw": "fused",   # "fused" | "foreach": AdamW's implementation on the GPU
    "decode": False,    # also time decoding, with and without the KV cache
    "slow": False,      # left out of the default run (named rows always run)
    "decode_at": None,  # (context, batch): decode timing there instead, cached only (bench_decode_at)
    "quick": {},        # overrides of QUICK for this row under --quick (e.g. sizes a concept needs)
    "window_kernel": None,  # None (attention.WINDOW_KERNEL as set) | "flash_split" | "flex" | "chunked" | "mask"
    "grouped_layout": None,  # None (moe.GROUPED_LAYOUT as set) | "kn" | "nk": experts' weights, grouped GEMM
}

# --quick: tiny sizes on the CPU, so that every row's code path runs in a test in seconds.
QUICK = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=128, batch_size=2,
             compile=False)

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


# ------------------------------------------------------------------------------------------------

def split_row(row, quick):
    """(config overrides, knobs) of a row; under quick, the tiny sizes replace the row's."""
    overrides = {k: v for k, v in row.items() if k not in KNOBS}
    knobs = {**KNOBS, **{k: v for k, v in row.items() if k in KNOBS}}
    if quick:
        overrides.update(QUICK, **knobs["quick"])
    return overrides, knobs


def sdpa_context(backend, device_type):
    """Force one SDPA backend for the row (None: PyTorch's own choice)."""
    if backend is None or device_type != "cuda":
        return contextlib.nullcontext()
    return torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, SDPA_BACKENDS[backend]))


class Timer:
    """Per-step times: CUDA events on a GPU (no host sync until read), perf_counter on a CPU."""

    def __init__(self, device_type):
        self.cuda = device_type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self):
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def sync(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()


def profile_steps(train_step, n, device_type, top=25):
    """The table of what n more steps spend their time in, most first (GPU: device self time)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            train_step()
        sync(device_type)
    key = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70)


def bench_train(mc, tc, knobs, device, steps, warmup, peak, profile=0):
    device_type = torch.device(device).type
    bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
    graphed = tc.cuda_graph and device_type == "cuda"  # train.py's --cuda_graph: one graph per step
    # a captured step cannot use autocast's weight-cast cache
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=not graphed) if bf16
                else contextlib.nullcontext())
    model = GPT(mc).to(device)
    # AdamW is fused when make_optimizer is told the device is CUDA; "cpu" gives the foreach kernels
    opt = make_optimizer(model, tc, device_type if knobs["adamw"] == "fused" else "cpu")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, mc.vocab_size, (tc.batch_size, mc.block_size), generator=g).to(device),
                torch.randint(0, mc.vocab_size, (tc.batch_size, mc.block_size), generator=g).to(device))
               for _ in range(4)]  # rotated, so no step reads the same batch as the one before
    run = model
    if tc.compile and device_type == "cuda":
        run = compile_model(model, tc.compile_mode, tc.compile_blocks)

    def step(micro_batches):
        opt.zero_grad(set_to_none=True)
        for x, y in micro_batches:
            with autocast:
                _, loss = run(x, y)
                aux = model.aux_loss()
                if aux is not None:
                    loss = loss + aux
            (loss / tc.grad_accum).backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        return (loss.detach(),)

    counter = iter(range(10 ** 9))

    def train_step():
        step([batches[next(counter) % len(batches)] for _ in range(tc.grad_accum)])
        model.after_step()

    with sdpa_context(knobs["sdpa"], device_type):
        t0 = time.perf_counter()
        if graphed:  # warm-up and capture (compiling, when compiling) count in the first step
            torch.cuda.reset_peak_memory_stats()  # the graph's memory is taken at its capture
            step = graph_step(model, opt, step, [batches[0]] * tc.grad_accum)
        train_step()  # compiles, when compiling
        sync(device_type)
        first_s = time.perf_counter() - t0
        for _ in range(warmup - 1):
            train_step()
        sync(device_type)
        if device_type == "cuda" and not graphed:  # peak of the steps, not of compiling
            torch.cuda.reset_peak_memory_stats()
        timer = Timer(device_type)
        timer.mark()
        for _ in range(steps):
            train_step()
            timer.mark()
        times = timer.intervals_ms()
        table = profile_steps(train_step, profile, device_type) if profile else None
    ms = statistics.median(times)
    tokens = tc.batch_size * mc.block_size * tc.grad_accum
    tok_s = tokens / (ms / 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [ms] * 9
    return {
        "params_M": model.num_params() / 1e6, "tokens_per_step": tokens, "ms_per_step": ms,
        "ms_p10": q[0], "ms_p90": q[-1], "tok_per_s": tok_s,
        "mfu": model.flops_per_token(mc.block_size) * tok_s / peak if peak else None,
        "peak_mem_GB": torch.cuda.max_memory_allocated() / 2 ** 30 if device_type == "cuda" else None,
        "first_step_s": first_s, **({"profile": table} if table else {}),
    }


@torch.no_grad()
def bench_decode(mc, device, n_new):
    device_type = torch.device(device).type
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    model = GPT(mc).to(device=device, dtype=dtype).eval()
    prompt_len = min(16, mc.block_size // 2)
    n_new = max(1, min(n_new, mc.block_size - prompt_len))  # the cached run never slides its window
    prompt = torch.randint(0, mc.vocab_size, (1, prompt_len), device=device)
    out = {}
    for use_cache in (True, False):
        generate(model, prompt, 2, temperature=0, use_cache=use_cache)  # warm-up
        sync(device_type)
        t0 = time.perf_counter()
        generate(model, prompt, n_new, temperature=0, use_cache=use_cache)
        sync(device_type)
        out["decode_tok_s_cached" if use_cache else "decode_tok_s_uncached"] = n_new / (time.perf_counter() - t0)
    out["cache_bytes_per_seq"] = model.new_cache(1, mc.block_size).nbytes()
    return out


@torch.no_grad()
def bench_decode_at(mc, device, n_new, context, batch, compile=False):
    """Cached greedy decoding of `batch` sequences at `context` tokens: a random prompt fills the
    cache (prefill, timed apart), untimed warm-up steps, then n_new timed steps ending one token
    short of `context` (a full cache is a contiguous tensor: the compiled step would recompile).
    tok/s counts the tokens of all sequences. No uncached run (a whole window per token).
    compile: the decode step through torch.compile (dynamic shapes, as the cache grows by a token
    each step), compiled during the warm-up; eager, a decode step of a small model is bound by
    the host launching its kernels one by one, not by reading the cache."""
    device_type = torch.device(device).type
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    model = GPT(dataclasses.replace(mc, block_size=context)).to(device=device, dtype=dtype).eval()
    step_fn = torch.compile(model) if compile else model
    warmup = 3 if compile else 1
    prompt = torch.randint(0, mc.vocab_size, (batch, context - n_new - warmup - 1), device=device)
    cache = model.new_cache(batch, context)
    t0 = time.perf_counter()
    logits, _ = model(prompt, cache=cache)
    sync(device_type)
    prefill_s = time.perf_counter() - t0
    next_id = logits.argmax(-1)  # (B, 1)
    with attention.decoding_kernels():  # as generate() decodes
        for step in range(n_new + warmup):
            if step == warmup:
                sync(device_type)
                t0 = time.perf_counter()
            logits, _ = step_fn(next_id, cache=cache)
            next_id = logits.argmax(-1)
    sync(device_type)
    return {"decode_tok_s_cached": batch * n_new / (time.perf_counter() - t0), "prefill_s": prefill_s,
            "decode_context": context, "decode_batch": batch, "cache_bytes_per_seq": cache.nbytes() / batch,
            "decode_compiled": compile}


def run_row(name, row, args, device, peak):
    overrides, knobs = split_row(row, args.quick)
    result = {"row": name, "overrides": {k: v for k, v in row.items() if k != "quick"}}
    default_window_kernel, default_layout = attention.WINDOW_KERNEL, moe.GROUPED_LAYOUT
    try:
        attention.WINDOW_KERNEL = knobs["window_kernel"] or default_window_kernel
        moe.GROUPED_LAYOUT = knobs["grouped_layout"] or default_layout
        mc, tc = cfg.build(None, overrides)
        if not args.decode_only:
            result.update(bench_train(mc, tc, knobs, device, args.steps, args.warmup, peak, args.profile))
        if knobs["decode"] and not args.no_decode and knobs["decode_at"]:
            context, batch = (4 * mc.block_size, 2) if args.quick else knobs["decode_at"]
            result.update(bench_decode_at(mc, device, args.decode_tokens, context, batch, args.decode_compile))
        elif knobs["decode"] and not args.no_decode:
            result.update(bench_decode(mc, device, args.decode_tokens))
    except Exception as e:  # one row's failure (OOM, a missing kernel) must not end the table
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    finally:
        attention.WINDOW_KERNEL, moe.GROUPED_LAYOUT = default_window_kernel, default_layout
        gc.collect()
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------

def fmt(value, spec, scale=1.0):
    return "" if value is None else format(value * scale, spec)


def table(results):
    head = ("| row | ms/step | tok/s | MFU | peak mem GB | first step s | decode tok/s (cache) "
            "| decode tok/s (no cache) | cache KB/seq |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['error']} |" + " |" * 7)
            continue
        lines.append(" | ".join([
            f"| {r['row']}", fmt(r.get("ms_per_step"), ".2f"), fmt(r.get("tok_per_s"), ",.0f"),
            fmt(r.get("mfu"), ".1%"), fmt(r.get("peak_mem_GB"), ".2f"), fmt(r.get("first_step_s"), ".1f"),
            fmt(r.get("decode_tok_s_cached"), ",.0f"), fmt(r.get("decode_tok_s_uncached"), ",.0f"),
            fmt(r.get("cache_bytes_per_seq"), ",.1f", 1 / 1024)]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# --dist: bytes on the wire, DDP vs DiLoCo

def bench_dist(nproc=2, steps=24, inner_steps=8):
    """Bytes each rank all-reduces per step and per token under DDP and DiLoCo, counted by
    gpt/distributed.py's CommCounter in short CPU runs of train.py under torchrun (gloo), on
    random text (the bytes do not depend on what is learnt). Returns {mode: bytes per token}."""
    import subprocess
    import tempfile

    from data import data as data_py
    root = os.path.dirname(os.path.abspath(__file__))
    size = ["--n_layer", "2", "--n_head", "4", "--n_embd", "128", "--block_size", "64", "--batch_size", "8"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "words.txt")
        with open(text, "w") as f:
            rng = torch.Generator().manual_seed(0)
            words = ["the", "king", "and", "queen", "of", "night", "day", "sword", "love", "death"]
            f.write(" ".join(words[i] for i in torch.randint(len(words), (60_000,), generator=rng).tolist()))
        data_py.prepare(input=text, name="words", tokenizer="byte", out_root=tmp)
        print("| mode | ranks | bytes per step per rank | bytes per token | vs DDP |\n|---|---|---|---|---|")
        for mode in ("ddp", "diloco"):
            run_dir = os.path.join(tmp, mode)
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "train.py",
                   "--data_dir", tmp, "--dataset", "words", *size, "--max_iters", str(steps),
                   "--eval_interval", str(steps), "--log_interval", str(steps), "--compile", "false",
                   "--device", "cpu", "--parallel", mode, "--diloco_inner_steps", str(inner_steps),
                   "--out_dir", run_dir]
            subprocess.run(cmd, cwd=root, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            with open(os.path.join(run_dir, "log.jsonl")) as f:
                last = [r for r in map(json.loads, f) if r["kind"] == "train"][-1]
            out[mode] = last["comm_bytes"] * nproc / last["tokens"]
            print(f"| {mode}{f' (H={inner_steps})' if mode == 'diloco' else ''} | {nproc} | "
                  f"{last['comm_bytes'] / last['step']:,.0f} | {out[mode]:,.1f} | {out[mode] / out['ddp']:.3f} |")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dist", action="store_true",
                   help="bytes all-reduced per token, DDP vs DiLoCo (CPU, 2 processes under torchrun)")
    p.add_argument("--rows", help="comma-separated row names (default: every row not marked slow)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny sizes, 2 timed steps")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--peak-tflops", type=float, help="the GPU's bf16 peak (default: looked up by name)")
    p.add_argument("--steps", type=int, help="timed steps per row (default 30; 2 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed steps first, the compiling one included (default 5)")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens to generate in the decode timing")
    p.add_argument("--no-decode", action="store_true", help="skip the decode timings")
    p.add_argument("--decode-only", action="store_true", help="skip the training timings")
    p.add_argument("--decode-compile", action="store_true",
                   help="decode at a row's decode_at context through torch.compile (default: eager)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile N more steps per row and print the operators that took longest")
    p.add_argument("--budget-s", type=float, help="start no new row after this many seconds")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 30)
    args.warmup = max(1, args.warmup or (1 if args.quick else 5))
    if args.quick:
        args.decode_tokens = min(args.decode_tokens, 4)
    names = args.rows.split(",") if args.rows else [n for n, r in ROWS.items() if not r.get("slow")]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(ROWS)}")
    args.names = names
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dist:
        return bench_dist()
    if args.list:
        for name, row in ROWS.items():
            print(f"{name:28s} {row}")
        return
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cpu" and not args.quick:
        print("no CUDA GPU: timing on the CPU (use --quick for the smoke run)")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(device) if device == "cuda" else None)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "command": "python " + " ".join([os.path.basename(__file__)] + sys.argv[1:]),
            "peak_tflops": peak / 1e12 if peak else None, "steps": args.steps, "warmup": args.warmup}
    print(f"{meta['date']}  {meta['device']}  torch {meta['torch']}  peak "
          f"{fmt(meta['peak_tflops'], '.0f') or '?'} TFLOP/s  {args.steps} timed steps after {args.warmup}")
    results, t_start = [], time.time()
    for name in args.names:
        if args.budget_s and time.time() - t_start > args.budget_s:
            results.append({"row": name, "error": f"skipped: --budget-s {args.budget_s:.0f} spent"})
            continue
        t0 = time.time()
        results.append(run_row(name, ROWS[name], args, device, peak))
        r = results[-1]
        status = r.get("error") or ", ".join(
            ([f"{r['ms_per_step']:.2f} ms/step, {r['tok_per_s']:,.0f} tok/s"] if "ms_per_step" in r else [])
            + ([f"MFU {r['mfu']:.1%}"] if r.get("mfu") else [])
            + ([f"decode {r['decode_tok_s_cached']:,.0f} tok/s"] if "decode_tok_s_cached" in r else []))
        print(f"  {name}: {status}  ({time.time() - t0:.0f}s)", flush=True)
        if r.get("profile"):
            print(r["profile"], flush=True)
        if args.json:  # rewritten after every row: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": results}, f, indent=1)
    print()
    print(table(results))
    return results


if __name__ == "__main__":
    main()
