#!/usr/bin/env bash
# One prepared GPU check, at most 8 minutes, so a short GPU lease is used at once. On one GPU:
#
#   bash benchmarks/gpu_check.sh                 # results in benchmarks/results/gpu_check/
#   bash benchmarks/gpu_check.sh --smoke --out DIR   # the same stages on CPU, tiny (what CI runs)
#
# Stages (each bounded by `timeout`; a stage that fails or times out is recorded, the rest run):
#   1 correctness  bf16 vs fp32 of the real training step, before anything is timed
#                  (benchmarks/gpu_check.py; exit 1 there skips the timings)                 45 s
#   2 train_step   benchmarks/train_step.py at the paper's size, thin slab and 3D, fp32/bf16 120 s
#   3 zero_cudnn   benchmarks/train_step.py, bf16, at ZeRO 0 and 1 x cudnn.benchmark on and off
#                  (--zero-stage, --cudnn-benchmark; zero_cudnn/zero<Z>_cudnn_<on|off>.json)  110 s
#   4 train_run    `udean train` on the demo cohort with loader workers for 105 s (stopped by
#                  SIGUSR1 through its own preemption path), GPU utilisation sampled by nvidia-smi:
#                  the share of samples with the GPU idle                                   135 s
#   5 infer        benchmarks/infer.py: whole-volume inference, thin slab and 3D            60 s
# summary.json in the output folder: per stage its exit code, seconds and JSON file.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0 out=""
while (( $# )); do
    case "$1" in
        --smoke) smoke=1 ;;
        --out) out=$2; shift ;;
        *) echo "usage: $0 [--smoke] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
out=${out:-benchmarks/results/gpu_check}
mkdir -p "$out"
PY=${PYTHON:-python}
BIN=$(dirname "$(command -v "$PY")")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$( ((smoke)) && echo 1 || echo 8)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stages=()

stage() {  # stage NAME BUDGET_S COMMAND...: run it bounded, record rc and seconds
    local name=$1 budget=$2; shift 2
    local t0=$SECONDS rc=0
    echo "== gpu_check: $name (at most ${budget} s): $*" >&2
    timeout --kill-after=10 "$budget" "$@" > "$out/$name.log" 2>&1 || rc=$?
    echo "== gpu_check: $name: exit $rc after $((SECONDS - t0)) s (log $out/$name.log)" >&2
    stages+=("{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"log\": \"$out/$name.log\"}")
    return $rc
}

if ((smoke)); then
    small=(--smoke)
    step_args=(--smoke --variants thin_slab --setups fp32 --batches 2 --steps 1 --warmup 0)
    zero_args="${step_args[*]}"
    infer_args=(--smoke --variants thin_slab --setups fp32 --repeats 1)
    cohort="--n 6 --shape 48 48 48" config=tiny run_s=20 loader=train.num_workers=2
else
    small=()
    step_args=(--variants thin_slab 3d --setups fp32 bf16 --batches 8)
    zero_args="--variants thin_slab 3d --setups bf16 --batches 8 --steps 3 --warmup 1"
    infer_args=(--variants thin_slab 3d --setups fp32 bf16_autocast)
    cohort="--n 11" config=demo run_s=105 loader=train.num_workers=4
fi

zero_cudnn() {  # the step at ZeRO 0 and 1, cudnn.benchmark on and off: one train_step.py JSON each
    local rc=0 zero bench
    for zero in 0 1; do
        for bench in on off; do
            # shellcheck disable=SC2086
            "$PY" benchmarks/train_step.py $zero_args --zero-stage "$zero" --cudnn-benchmark "$bench" \
                --out "$out/zero_cudnn/zero${zero}_cudnn_${bench}.json" || rc=1
        done
    done
    return $rc
}
export -f zero_cudnn
export PY out zero_args

if stage correctness 45 "$PY" benchmarks/gpu_check.py "${small[@]}" --out "$out/correctness.json"; then
    stage train_step 120 "$PY" benchmarks/train_step.py "${step_args[@]}" --out "$out/train_step.json"
    stage zero_cudnn 110 bash -c zero_cudnn
fi

train_run() {  # cohort -> preprocess -> train for run_s seconds; GPU utilisation sampled meanwhile
    # shellcheck disable=SC2086
    "$BIN/udean" cohort $cohort --out "$work/hcp" --no-progress &&
        "$BIN/udean" preprocess --config "$config" --data-root "$work/hcp" --out "$work/data" --no-progress || return 1
    local sampler=""
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 > "$work/util.csv" &
        sampler=$!
    fi
    local rc=0
    # SIGUSR1 after run_s: the preemption path checkpoints and exits 75 (hpc.signals)
    timeout --preserve-status -s USR1 --kill-after=30 "$run_s" "$BIN/udean" train --config "$config" "data.out=$work/data" \
        "train.out=$work/run" train.val_every=0 train.log_every=10 train.epochs=1 train.steps_per_epoch=100000 \
        train.checkpoint_every=100000 "$loader" || rc=$?
    [[ -n "$sampler" ]] && kill "$sampler"
    "$PY" - "$work" "$out/train_run.json" "$rc" "$run_s" <<'EOF'
import json, sys
from pathlib import Path
work, dest, rc, run_s = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
train = [r for r in rows if r.get("kind") == "train"]
util = [float(x) for x in (work / "util.csv").read_text().split()] if (work / "util.csv").is_file() else []
steady = util[len(util) // 4:]  # skip start-up (imports, engine build, first batches)
out = {"run_s": run_s, "exit_code": rc, "stopped_by_signal": rc == 75, "steps": train[-1]["step"] if train else 0,
       "patches_per_s_last": train[-1].get("patches_per_s") if train else None,
       "gpu_util_samples": len(util), "gpu_idle_share": (sum(u < 5 for u in steady) / len(steady)) if steady else None,
       "gpu_util_mean": (sum(steady) / len(steady)) if steady else None}
Path(dest).write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out))
sys.exit(0 if rc == 75 and train else 1)
EOF
}
export -f train_run
export BIN work cohort config run_s loader
stage train_run $((run_s + 30 + (smoke ? 60 : 0))) bash -c train_run
stage infer 60 "$PY" benchmarks/infer.py "${infer_args[@]}" --out "$out/infer.json"

summary=$(IFS=,; echo "[${stages[*]}]")
"$PY" - "$out" "$smoke" "$summary" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
from benchmarks.common import provenance, write_json
out, smoke, stages = Path(sys.argv[1]), sys.argv[2] == "1", json.loads(sys.argv[3])
write_json(out / "summary.json", {"provenance": provenance(), "smoke": smoke, "stages": stages,
                                  "passed": all(s["rc"] == 0 for s in stages)})
EOF
failed=0
for s in "${stages[@]}"; do [[ "$s" == *'"rc": 0,'* ]] || failed=1; done
echo "gpu_check: $( ((failed)) && echo 'some stages failed' || echo 'all stages passed'): $out/summary.json" >&2
exit "$failed"
