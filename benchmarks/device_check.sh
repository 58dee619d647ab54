#!/usr/bin/env bash
# The one script to run on a GPU machine, from the repository root, in under 8 minutes:
#
#     bash benchmarks/device_check.sh [OUT_DIR]        # default ./device_check_out
#
# Parts, in this order, each under a timeout of its own and all under one deadline (what a part does not finish is
# recorded as exit 124 and the next one starts):
#   env             the devices JAX sees, the Python and package versions, nvidia-smi
#   bench_0.5b      benchmarks.bench_accelerator at Qwen1.5-0.5B (stage 2, QueCC V=16, bf16, remat as configured),
#                   with the attention check (the chosen kernel against XLA's float32 path, forward and gradients)
#   smoke           a 50-step smoke training run (configs/smoke.py, bf16) into a temporary run directory
#   prefill         benchmarks.bench_prefill_latency at Qwen1.5-0.5B, bf16: latency against V next to the FLOPs model
#   bench_1.8b      bench_accelerator at Qwen1.5-1.8B
#   bench_0.5b_xla  bench_0.5b again at the same batch with attention on XLA's path (cuDNN's gain), if time is left
# The per-device batches are fixed, since a search compiles the step several times at ~50 s each on an H200:
# 64 for 0.5B, the largest power of two that fits its 141 GB by XLA's memory analysis (9.5 GiB at 1 per device,
# 10.1 at 2, 118.5 at 128, against a limit of ~116; measured 2026-12-04), and 32 for 1.8B (28.4 GiB at 1; at 64 it
# would need ~137 GiB if an example costs twice the 0.5B's 0.86 GiB: an estimate). DEVICE_CHECK_SEARCH=1 searches
# instead (--batch=0; minutes); DEVICE_CHECK_BATCHES="A B" sets them.
# Everything measured lands in OUT_DIR: device_check.log (all output), one JSON per part, parts.tsv (exit status and
# seconds per part), summary.txt / summary.json (the table printed at the end).
#
# Wheels of pure-Python or binary packages the machine lacks (ml_collections, grain and their dependencies) travel
# in .whl/ at the repository root; they are installed into a temporary folder on PYTHONPATH first. It runs the
# machine's `python3` (PYTHON=... to choose another). DEVICE_CHECK_SIZE=small runs the small sizes (tiny models, a
# CPU in a few minutes) to check the script itself; DEVICE_CHECK_DEADLINE=seconds moves the overall deadline (460).

set -u
OUT=${1:-./device_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/device_check.log
PY=${PYTHON:-python3}
SIZE=${DEVICE_CHECK_SIZE:-full}
START=$(date +%s)
DEADLINE=$((START + ${DEVICE_CHECK_DEADLINE:-460}))
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}   # JAX's default pool is 75%
export VLM_JAX_COMPILATION_CACHE=   # nothing written outside OUT_DIR and the temporary folders
: > "$LOG"
printf 'part\trc\tseconds\n' > "$OUT/parts.tsv"

say() { echo "[device_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# run NAME TIMEOUT_S COMMAND...: under the smaller of its timeout and what is left before the deadline.
run() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    say "$name: skipped, ${left} s left before the deadline"
    printf '%s\t%s\t%s\n' "$name" skipped 0 >> "$OUT/parts.tsv"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  say "$name (timeout ${limit} s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t0))
  say "$name: exit $rc after ${dt} s$([ $rc -eq 124 ] && echo ' (timed out)')"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >> "$OUT/parts.tsv"
}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  SITE=$(mktemp -d /tmp/vlm-jax-site.XXXXXX)
  say "installing $(ls .whl/*.whl | wc -l) wheels from .whl into $SITE"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
      >> "$LOG" 2>&1; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  elif ! "$PY" -m pip --version > /dev/null 2>&1 && "$PY" -c "import sys, zipfile
[zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$SITE" .whl/*.whl >> "$LOG" 2>&1; then
    say "no pip: unpacked the wheels instead (a wheel unpacked is importable)"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  else
    say "installing the wheels failed (see above); going on without them"
  fi
fi

if [ "$SIZE" = small ]; then
  BENCH=(--size=small --max_batch=8 --steps=3); LLM_A=tiny; LLM_B=tiny-l; PREFILL=(--llm=tiny --repeats=5)
  read -r BATCH_A BATCH_B <<< "${DEVICE_CHECK_BATCHES:-8 8}"
else
  BENCH=(--size=full --steps=5 --warmup=1); LLM_A=qwen1.5-0.5b; LLM_B=qwen1.5-1.8b
  PREFILL=(--llm=qwen1.5-0.5b --repeats=20)
  read -r BATCH_A BATCH_B <<< "${DEVICE_CHECK_BATCHES:-64 32}"
fi
[ "${DEVICE_CHECK_SEARCH:-0}" = 1 ] && BATCH_A=0 && BATCH_B=0
say "size $SIZE; output in $OUT; deadline in $((DEADLINE - START)) s"

run env 60 "$PY" -c "
import importlib, platform, sys
from launch import runtime
runtime.skip_absent_tpu()
import jax
print('python', platform.python_version(), sys.executable)
print('jax', jax.__version__, 'backend', jax.default_backend(), 'devices', jax.devices())
for name in ('jaxlib', 'jax_cuda12_plugin', 'jax_cuda13_plugin', 'flax', 'optax', 'orbax.checkpoint', 'grain',
             'ml_collections', 'numpy', 'tokenizers', 'safetensors', 'PIL'):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, '__version__', '?'), module.__file__)
    except ImportError as error:
        print(name, 'missing:', error)
"
command -v nvidia-smi > /dev/null && nvidia-smi >> "$LOG" 2>&1

run "bench_$LLM_A" 180 "$PY" -m benchmarks.bench_accelerator "${BENCH[@]}" --llm="$LLM_A" --batch="$BATCH_A" \
  --check_attention --json="$OUT/bench_$LLM_A.json"

SMOKE_DIR=$(mktemp -d /tmp/vlm-jax-smoke.XXXXXX)
run smoke 60 "$PY" -m launch.train --config=configs/smoke.py --config.train.steps=50 --config.train.log_every=10 \
  --config.model.dtype=bfloat16 --config.run_dir="$SMOKE_DIR/run"
[ -f "$SMOKE_DIR/run/metrics.jsonl" ] && cp "$SMOKE_DIR/run/metrics.jsonl" "$OUT/smoke_metrics.jsonl"

run prefill 60 "$PY" -m benchmarks.bench_prefill_latency "${PREFILL[@]}" --dtype=bfloat16 --json="$OUT/prefill.json"

run "bench_$LLM_B" 180 "$PY" -m benchmarks.bench_accelerator "${BENCH[@]}" --llm="$LLM_B" --batch="$BATCH_B" \
  --json="$OUT/bench_$LLM_B.json"

# at the batch bench_0.5b ran (searched again if it failed)
BATCH=$("$PY" -c "import json; print(json.load(open('$OUT/bench_$LLM_A.json'))['per_device_batch'])" 2> /dev/null \
  || echo "$BATCH_A")
run "bench_${LLM_A}_xla" 150 "$PY" -m benchmarks.bench_accelerator "${BENCH[@]}" --llm="$LLM_A" --batch="$BATCH" \
  --attention=xla --json="$OUT/bench_${LLM_A}_xla.json"

# --- summary (plain Python: it reads the JSON files, whatever failed above) ---------------------------------------
"$PY" - "$OUT" "$((($(date +%s) - START)))" <<'EOF' 2>&1 | tee -a "$LOG"
import csv, json, os, sys

out, total = sys.argv[1], sys.argv[2]
parts = list(csv.DictReader(open(os.path.join(out, "parts.tsv")), delimiter="\t"))
rows, summary = [], {"total_s": int(total), "parts": parts}

def load(name):
    path = os.path.join(out, name)
    try:
        return json.load(open(path)) if os.path.exists(path) else None
    except ValueError:
        return None

gib = lambda n: "n/a" if n is None else f"{n / 2**30:.1f} GiB"
for part in parts:
    r = load(part["part"] + ".json") if part["part"].startswith("bench_") else None
    if not r:
        continue
    key = part["part"]
    if "step_time_s" in r:
        summary[key] = {k: r.get(k) for k in ("device_kind", "llm", "per_device_batch", "step_time_s",
                                              "tokens_per_s", "mfu", "peak_memory_bytes", "attention", "loss")}
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        rows.append((key, f"{r['device_kind']}; batch {r['per_device_batch']}/device, step "
                          f"{r['step_time_s'] * 1e3:.0f} ms, {r['tokens_per_s']:,.0f} tok/s, MFU {mfu}, peak mem "
                          f"{gib(r['peak_memory_bytes'])}, attention {r['attention']['llm']}"))
    else:
        rows.append((key, "no step time (see device_check.log)"))
    for c in r.get("attention_check", []):
        if "error" in c:
            rows.append((f"  attention {c['case']}", f"{c['implementation']} failed: {c['error'][:200]}"))
            continue
        rows.append((f"  attention {c['case']}", f"{c['implementation']}: out err {c['out_max_abs_err']:.3g} "
                     f"(of {c['out_max_abs']:.3g}), dq err {c['dq_max_abs_err']:.3g} (of {c['dq_max_abs']:.3g}), "
                     f"fwd+bwd {c['fwd_bwd_ms']:.2f} ms"))
metrics = os.path.join(out, "smoke_metrics.jsonl")
if os.path.exists(metrics):
    lines = [json.loads(l) for l in open(metrics) if l.strip()]
    train = [l for l in lines if "loss" in l]
    if train:
        first, last = train[0], train[-1]
        summary["smoke"] = {"first": first, "last": last}
        fmt = lambda v, f: "-" if v is None else format(v, f)
        rows.append(("smoke", f"step {last.get('step')}: loss {fmt(first.get('loss'), '.3f')} -> "
                              f"{fmt(last.get('loss'), '.3f')}, {fmt(last.get('tokens_per_s'), ',.0f')} tok/s"))
prefill = load("prefill.json")
if prefill:
    summary["prefill"] = prefill
    rows.append(("prefill", f"{prefill['llm']} {prefill['dtype']}: " + ", ".join(
        f"V={r['v']} {r['latency_s'] * 1e3:.2f} ms ({r['latency_ratio']:.2f}; flops {r['with_attention_ratio']:.2f}, "
        f"{r['attention']})" for r in prefill["rows"])))
xla = [k for k in summary if k.endswith("_xla")]
for k in xla:
    base = summary.get(k[:-4])
    if base:
        kernels = f"{base['attention']['llm']} / {summary[k]['attention']['llm']}"
        rows.append(("attention", f"{k[:-4]}: step time with XLA's attention / as chosen ({kernels}) = "
                                  f"{summary[k]['step_time_s'] / base['step_time_s']:.2f}"))

width = max([len(p["part"]) for p in parts] + [len(r[0]) for r in rows] + [4])
lines = [f"device check: {total} s in all", f"{'part':<{width}}  exit  seconds"]
lines += [f"{p['part']:<{width}}  {p['rc']:>4}  {p['seconds']:>7}" for p in parts]
lines += [""] + [f"{name:<{width}}  {text}" for name, text in rows]
text = "\n".join(lines)
print(text)
open(os.path.join(out, "summary.txt"), "w").write(text + "\n")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
EOF
