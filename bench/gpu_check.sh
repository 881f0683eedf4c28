#!/usr/bin/env bash
# The GPU check: every helper's GPU tests, the speed table, and the shakespeare-char runs, in about
# 8 minutes on one H100. Each step has its own time limit and the run goes on past a failure; the
# summary comes last.
#
#   bash bench/gpu_check.sh                  # all parts: pytest bench train bpe
#   bash bench/gpu_check.sh pytest bpe       # only some parts (pytest, bench, train, bpe, and
#                                            # modflops, kernels, peer, moe, which the default
#                                            # leaves out)
#
# Needs: python3 with torch (CUDA), numpy, tqdm, matplotlib, tiktoken; pytest for the tests
# (carried wheels on PYTHONPATH); tiny shakespeare as text at $DATA_TXT or one of the paths below.
# Results go to $OUT (default bench/out): summary.txt, bench.md, bench.json, speedrun_loss.png,
# muon_vs_adamw.png, gpt2_mod_vs_dense_flops.png, logs.tar.gz (every log, log.jsonl, loss.png and
# config.json, and the other parts' bench JSON): 7 files at most, under the device tool's 8.
# A dry run of the script's logic on a CPU, in a minute or two:
#   OUT=/tmp/gc BENCH_ARGS="--quick --rows gpt2,speedrun" TRAIN_ARGS="--device cpu --max_iters 20
#   --eval_interval 10 --n_layer 2 --n_head 2 --n_embd 64 --block_size 64" bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-510}  # seconds for the whole check; a step never runs past it
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PARTS=" ${*:-pytest bench train bpe} "
T0=$(date +%s)
SUMMARY=()

# step NAME SECONDS CMD...: run CMD with a time limit (cut to what is left of LIMIT), log to $LOGS/NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((LIMIT - ($(date +%s) - T0)))
  if [ "$left" -lt 15 ]; then
    SUMMARY+=("$name: SKIPPED (check's ${LIMIT}s spent)")
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  local t=$(date +%s)
  timeout -s INT --kill-after=15 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local note=""
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && note=" TIMED OUT"
  SUMMARY+=("$name: rc=$rc$note, $(( $(date +%s) - t ))s")
  tail -n 4 "$LOGS/$name.log"
  collect
  return $rc
}

# collect: every run's log.jsonl, pictures and config into $LOGS, packed into $OUT/logs.tar.gz after
# each step, so that a check cut short by its caller still returns what it did so far
collect() {
  local d n f
  for d in out/gpu-*; do
    [ -d "$d" ] || continue
    n=$(basename "$d")
    for f in "$d"/log.jsonl "$d"/*.png "$d"/config.json; do [ -f "$f" ] && cp "$f" "$LOGS/${n}_$(basename "$f")"; done
  done
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
}

# --- preflight -----------------------------------------------------------------------------------
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.limit --format=csv,noheader 2>&1 | head -2
$PY - <<'EOF' 2>&1 | tee "$LOGS/preflight.log"
import importlib.util, torch
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
missing = [m for m in ("numpy", "tqdm", "matplotlib", "tiktoken", "pytest") if importlib.util.find_spec(m) is None]
print("missing modules:", ", ".join(missing) or "none")
EOF

# --- data ----------------------------------------------------------------------------------------
if [[ $PARTS == *" train "* || $PARTS == *" bpe "* ]]; then
  TXT=""
  for c in "${DATA_TXT:-}" bench/data/tinyshakespeare.txt shared/data/tinyshakespeare.txt \
           ../shared/data/tinyshakespeare.txt data/raw/tinyshakespeare.txt; do
    if [ -n "$c" ] && [ -f "$c" ]; then TXT=$c; break; fi
  done
  if [ -z "$TXT" ]; then
    SUMMARY+=("data: NO TEXT FOUND (set DATA_TXT, or copy tinyshakespeare.txt to bench/data/)")
  elif [[ $PARTS == *" train "* ]]; then
    step data 60 $PY data/data.py --input "$TXT" --name shakespeare_char
  fi
fi

# --- the shakespeare-char baseline (learned positions) and the same with RoPE, same budget --------------
run() {  # run NAME SECONDS ARGS...: train.py into out/gpu-NAME
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" $PY train.py --out_dir "out/gpu-$name" --overwrite "$@" ${TRAIN_ARGS:-}
}
if [[ $PARTS == *" train "* ]]; then
  run baseline 80 --preset shakespeare-char
  step sample 30 $PY sampling.py --out_dir out/gpu-baseline --num-samples 1 --max-new-tokens 400
  run rope 80 --preset shakespeare-char --pos rope
fi

# --- GPU tests of every concept --------------------------------------------------------------------
# SIGINT first, so that pytest still prints its summary; pytest-timeout (when installed) dumps the
# stack of a test that runs past PYTEST_TIMEOUT seconds; log_level keeps torch.compile's DEBUG trace
# lines, which pytest would print with a failure, from burying its report (seen 2026-12-08).
if [[ $PARTS == *" pytest "* ]]; then
  PT_TIMEOUT=()
  $PY -c "import pytest_timeout" 2>/dev/null && PT_TIMEOUT=(--timeout "${PYTEST_TIMEOUT:-90}")
  step pytest "${PYTEST_LIMIT:-240}" $PY -m pytest -m gpu -q -rfE -p no:cacheprovider --durations=15 -o log_level=WARNING \
    "${PT_TIMEOUT[@]}" --ignore=tests/test_notebooks.py  # rc 5: no GPU test was collected
fi

# --- the concepts against the dense baby GPT on tiny shakespeare in BPE tokens ----------------------
# (issues 6, 7, 8, 9, 14): the same preset, one switch each; MoD gets the dense run's training FLOPs
# (1.69x its steps); the linearized model reads 10% of the teacher's tokens (40 + 40 steps of 800).
if [[ $PARTS == *" bpe "* && -n "$TXT" ]]; then
  step data-bpe 60 $PY data/data.py --input "$TXT" --name shakespeare_bpe --tokenizer bpe --vocab-size 2048
  run bpe-dense 60 --preset shakespeare-bpe
  run bpe-moe 90 --preset shakespeare-bpe --ffn moe
  run bpe-bitnet 60 --preset shakespeare-bpe --bitnet all_but_attention
  run bpe-samba 90 --preset shakespeare-bpe --layers ML --window 128
  run bpe-mod 90 --preset shakespeare-bpe --mod_every 2 --mod_capacity 0.125 --max_iters 1354
  step linearize 90 $PY linearize.py --ckpt out/gpu-bpe-dense --out_dir out/gpu-bpe-linear \
    --transfer_iters 40 --finetune_iters 40 --eval_interval 20
  step sample-linear 30 $PY sampling.py --out_dir out/gpu-bpe-linear --num-samples 1 --max-new-tokens 200
fi

# --- MoD against dense at equal training FLOPs at the GPT-2-124M shape (issue 7) ----------------------
# Corpus: the .py files of the Python standard library beside the interpreter (no download; ~10M GPT-2
# tokens in its first 23.5 MB). Dense 500 steps of 12 x 1024 tokens; MoD (capacity 0.125 on every other
# block, 0.676x the FLOPs per token) 740 steps, the same training FLOPs; one plot against FLOPs.
if [[ $PARTS == *" modflops "* ]]; then
  STDLIB=$($PY -c "import os, sysconfig; print(sysconfig.get_paths()['stdlib'])")
  find "$STDLIB" -name "*.py" -not -path "*/site-packages/*" | sort | xargs cat 2>/dev/null | head -c 23500000 > "$LOGS/stdlib.txt"
  step data-stdlib 90 $PY data/data.py --input "$LOGS/stdlib.txt" --name pystdlib_gpt2 --tokenizer gpt2 --val-frac 0.06
  G7="--preset gpt2-124m --dataset pystdlib_gpt2 --grad_accum 1 --warmup_iters 50 --eval_iters 10"
  run gpt2-dense 150 $G7 --max_iters 500 --eval_interval 50 --save_interval 500
  run gpt2-mod 200 $G7 --max_iters 740 --eval_interval 74 --save_interval 740 --mod_every 2 --mod_capacity 0.125
  $PY -m gpt.plot "$OUT/gpt2_mod_vs_dense_flops.png" dense=out/gpu-gpt2-dense mod=out/gpu-gpt2-mod --x flops \
    --title "GPT-2-124M shape: MoD vs dense at equal training FLOPs" >> "$LOGS/modflops.log" 2>&1
fi

# --- the opt-in Triton kernels (GPT_TRITON=1) against PyTorch's path, same rows, same call; and the
# bf16 residual stream against fp32 (issue 10)
if [[ $PARTS == *" kernels "* ]]; then
  step kernels-torch 150 $PY bench.py --no-decode --steps 15 --warmup 3 --rows ctx8k-samba,gpt2-fused-ce \
    --json "$LOGS/kernels_torch.json" ${BENCH_ARGS:-}
  step kernels-triton 150 env GPT_TRITON=1 $PY bench.py --no-decode --steps 15 --warmup 3 \
    --rows ctx8k-samba,gpt2-fused-ce --json "$LOGS/kernels_triton.json" ${BENCH_ARGS:-}
  step bf16-stream 150 $PY bench.py --no-decode --steps 20 --warmup 4 --rows gpt2-graph,gpt2-bf16-stream-graph \
    --json "$LOGS/bf16_stream.json" ${BENCH_ARGS:-}  # residual_fp32=false (issue 10)
fi

# --- PEER (issue 6): its kernels on and off, and dense vs PEER at nanoGPT's GPT-2 accumulation (40) ---
if [[ $PARTS == *" peer "* ]]; then
  step peer-triton 150 env GPT_TRITON=1 $PY bench.py --no-decode --steps 10 --warmup 3 --rows gpt2-peer \
    --json "$LOGS/peer_triton.json" ${BENCH_ARGS:-}
  step peer-torch 120 $PY bench.py --no-decode --steps 10 --warmup 3 --rows gpt2-peer \
    --json "$LOGS/peer_torch.json" ${BENCH_ARGS:-}
  step accum40 200 env GPT_TRITON=1 $PY bench.py --no-decode --steps 3 --warmup 1 \
    --rows gpt2-peer-accum40,gpt2-accum40 --json "$LOGS/accum40.json" ${BENCH_ARGS:-}
fi

# --- MoE-8 (issue 6): the experts' weights as stored and d_in-contiguous in the grouped GEMM --------
if [[ $PARTS == *" moe "* ]]; then
  step moe 200 $PY bench.py --no-decode --steps 20 --warmup 4 \
    --rows gpt2-moe-8-graph,gpt2-moe-8-nk-graph,gpt2-graph --json "$LOGS/moe.json" ${BENCH_ARGS:-}
fi

# --- speed table -----------------------------------------------------------------------------------
if [[ $PARTS == *" bench "* ]]; then
  step bench 200 $PY bench.py ${BENCH_ARGS:-} --json "$OUT/bench.json" --budget-s "${BENCH_BUDGET:-150}"
  sed -n '/^| row/,$p' "$LOGS/bench.log" > "$OUT/bench.md"
fi

# --- the speedrun preset, Muon and AdamW ---------------------------------------------------------------
if [[ $PARTS == *" train "* ]]; then
  run speedrun 50 --preset shakespeare-char-speedrun
  run speedrun-adamw 50 --preset shakespeare-char-speedrun --optimizer adamw
fi

# --- results -----------------------------------------------------------------------------------------
collect
[ -f out/gpu-speedrun/loss.png ] && cp out/gpu-speedrun/loss.png "$OUT/speedrun_loss.png"
[ -f "$OUT/bench.json" ] && cp "$OUT/bench.json" "$LOGS/"
$PY - "$OUT" "$LOGS" > "$LOGS/summary_runs.txt" 2>&1 <<'EOF'
import glob, os, sys
sys.path.insert(0, os.getcwd())
from gpt import plot
out, logs = sys.argv[1], sys.argv[2]
runs = {}
for path in sorted(glob.glob("out/gpu-*/log.jsonl")):
    name = os.path.basename(os.path.dirname(path))[len("gpu-"):]
    recs = plot.read_log(path)
    runs[name] = recs
    evals = [r for r in recs if r["kind"] == "eval"]
    train = [r for r in recs if r["kind"] == "train"]
    if not evals:
        print(f"{name:15s} no evaluations logged")
        continue
    best = min(evals, key=lambda r: r["val_loss"])
    hit = next((r for r in evals if r["val_loss"] <= 1.47), None)  # the shakespeare-char goal
    hit_s = f"val<=1.47 at step {hit['step']}, {hit.get('since_launch', float('nan')):.1f}s from launch" \
        if hit else "val never <= 1.47"
    speed = f", {train[-1]['tok_per_s']:,.0f} tok/s" if train and "tok_per_s" in train[-1] else ""
    print(f"{name:15s} best val {best['val_loss']:.4f} (step {best['step']}); {hit_s}; "
          f"last step {evals[-1]['step']} at {evals[-1].get('since_launch', float('nan')):.1f}s{speed}")
if runs.get("speedrun") and runs.get("speedrun-adamw"):
    plot.compare({"Muon": runs["speedrun"], "AdamW": runs["speedrun-adamw"]},
                 os.path.join(out, "muon_vs_adamw.png"),
                 title="shakespeare-char-speedrun: Muon vs AdamW, same model and tokens")
    print("plot:", os.path.join(out, "muon_vs_adamw.png"))
EOF
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
{
  echo "=== gpu_check summary ($(( $(date +%s) - T0 ))s in all; logs in $OUT/logs.tar.gz)"
  head -2 "$LOGS/preflight.log"
  printf '%s\n' "${SUMMARY[@]}"
  [ -f "$LOGS/pytest.log" ] && echo "pytest: $(grep -E '(passed|failed|error|no tests ran)' "$LOGS/pytest.log" | tail -1)"
  [ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
  for k in kernels-torch kernels-triton bf16-stream peer-triton peer-torch accum40 moe; do
    [ -f "$LOGS/$k.log" ] && { echo "--- $k"; sed -n '/^| row/,$p' "$LOGS/$k.log"; }
  done
  [ -f "$LOGS/modflops.log" ] && cat "$LOGS/modflops.log"
  cat "$LOGS/summary_runs.txt"
  [ -f "$LOGS/sample.log" ] && { echo "--- sample from out/gpu-baseline"; tail -c 700 "$LOGS/sample.log"; }
} | tee "$OUT/summary.txt"
