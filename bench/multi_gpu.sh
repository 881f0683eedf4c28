#!/usr/bin/env bash
# Two GPUs against one (issue 13): GPT-2-124M on tiny shakespeare in GPT-2 tokens, the same global
# batch (12 sequences x ACCUM micro-steps x 1024 tokens) and the same steps on one GPU, then with
# DDP, FSDP2 and DiLoCo (H=50) on NGPU GPUs through torchrun and NCCL (NVLink multicast off).
# Writes to $OUT: multi_gpu.txt (per run: best val loss, tokens/s per GPU, bytes all-reduced per
# token), multi_gpu_loss.png (all four runs against tokens), diloco_vs_ddp.png, multi_gpu_logs.tar.gz.
#
#   bash bench/multi_gpu.sh                      # on a machine with 2 GPUs, ~6 minutes
#   RUNS=single bash bench/multi_gpu.sh          # some of the runs (the summary reads every run made)
#   STEPS=6 ACCUM=2 EXTRA="--device cpu --n_layer 2 --n_head 2 --n_embd 64 --block_size 64 \
#     --batch_size 2" bash bench/multi_gpu.sh    # the same logic on CPU processes (gloo)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
PY=${PYTHON:-python3}
NGPU=${NGPU:-2}
STEPS=${STEPS:-150}
ACCUM=${ACCUM:-8}
LIMIT=${RUN_LIMIT:-150}  # seconds per run
TXT=${DATA_TXT:-../shared/data/tinyshakespeare.txt}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
RUNS=" ${RUNS:-single ddp fsdp diloco} "
mkdir -p "$OUT" out

$PY data/data.py --input "$TXT" --name shakespeare_gpt2 --tokenizer gpt2 || exit 1
COMMON=(--preset gpt2-124m --dataset shakespeare_gpt2 --max_iters "$STEPS" --warmup_iters 30
        --eval_interval 25 --eval_iters 10 --log_interval 5 --save_interval "$STEPS" ${EXTRA:-})
TORCHRUN=(torchrun --standalone --nproc_per_node="$NGPU")

run() {  # run NAME CMD...: one training run into out/mg-NAME, its output in out/mg-NAME.log
  local name=$1
  shift
  [[ $RUNS == *" $name "* ]] || return 0
  echo "=== $name: $*"
  timeout -s INT --kill-after=15 "$LIMIT" "$@" "${COMMON[@]}" --out_dir "out/mg-$name" --overwrite \
    > "out/mg-$name.log" 2>&1
  echo "$name: rc=$?"
  tail -n 2 "out/mg-$name.log"
}
CUDA_VISIBLE_DEVICES=${SINGLE_GPU:-0} run single $PY train.py --grad_accum "$ACCUM"
run ddp "${TORCHRUN[@]}" train.py --grad_accum $((ACCUM / NGPU))
run fsdp "${TORCHRUN[@]}" train.py --grad_accum $((ACCUM / NGPU)) --parallel fsdp
run diloco "${TORCHRUN[@]}" train.py --grad_accum $((ACCUM / NGPU)) --parallel diloco --diloco_inner_steps 50

$PY - "$OUT" "$NGPU" <<'EOF' | tee "$OUT/multi_gpu.txt"
import json, os, statistics, sys
sys.path.insert(0, os.getcwd())
from gpt import plot
out, ngpu = sys.argv[1], int(sys.argv[2])
runs = {}
for name in ("single", "ddp", "fsdp", "diloco"):
    path = os.path.join("out", f"mg-{name}", "log.jsonl")
    if os.path.exists(path):
        runs[name] = plot.read_log(path)
base = None
for name, recs in runs.items():
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    gpus = 1 if name == "single" else ngpu
    # tokens/s is the whole run's (all ranks); per GPU, the median over the logged intervals after
    # the first quarter (compilation, warm-up)
    steady = train[len(train) // 4:] or train
    per_gpu = statistics.median(r["tok_per_s"] for r in steady) / gpus if steady else float("nan")
    base = per_gpu if name == "single" else base
    ratio = f" ({per_gpu / base:.1%} of one GPU's)" if base and name != "single" else ""
    comm = f"{train[-1]['comm_bytes'] / train[-1]['tokens']:.2f} bytes all-reduced per token" if train else ""
    if name == "fsdp":  # its all-gathers and reduce-scatters run inside FSDP2, uncounted
        comm = "FSDP2's all-gathers and reduce-scatters not counted"
    best = min((r["val_loss"] for r in evals), default=float("nan"))
    last = evals[-1]["val_loss"] if evals else float("nan")
    print(f"{name:7s} {gpus} GPU: val {last:.4f} at step {evals[-1]['step'] if evals else '-'} "
          f"(best {best:.4f}); {per_gpu:,.0f} tok/s per GPU{ratio}; {comm}")
if runs:
    print("plot:", plot.compare(runs, os.path.join(out, "multi_gpu_loss.png"),
                                title=f"GPT-2-124M, tiny shakespeare: 1 GPU vs {ngpu} GPUs, same global batch"))
if "ddp" in runs and "diloco" in runs:
    print("plot:", plot.compare({"DDP": runs["ddp"], "DiLoCo H=50": runs["diloco"]},
                                os.path.join(out, "diloco_vs_ddp.png"), title="DiLoCo (H=50) vs DDP"))
EOF
tar -czf "$OUT/multi_gpu_logs.tar.gz" out/mg-*.log out/mg-*/log.jsonl
