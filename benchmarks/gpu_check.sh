#!/usr/bin/env bash
# One prepared GPU check, at most 8 minutes, so a short GPU lease is used at once. On one GPU:
#
#   bash benchmarks/gpu_check.sh                 # results in benchmarks/results/gpu_check/
#   bash benchmarks/gpu_check.sh --smoke --out DIR   # the same stages on CPU, tiny (what CI runs)
#
# Without CUDA the full check stops before anything with one line and exit 3 (on a CPU it would
# only time out). The default recipe (`recommended`: the paper's sizes, bf16, ZeRO-1) comes first,
# the most important measurements first; each stage is bounded by `timeout`, and a stage that
# fails or times out is recorded while the rest run:
#   1 correctness  the recipe's training step in bf16 vs fp32 (benchmarks/gpu_check.py; exit 1
#                  there skips the timings: they would time wrong arithmetic)              60 s
#   2 host_cost    the recipe's step, bf16 ZeRO-1 and fp32 ZeRO-0: dispatched ops and host syncs
#                  per step, step time, GPU idle share (benchmarks/host_cost.py)           100 s
#   3 train_run    `udean train` of the recipe on a small real-anatomy cohort with loader
#                  workers for 100 s (stopped by SIGUSR1 through its own preemption path), GPU
#                  utilisation sampled by nvidia-smi: patches/s, the share of samples idle  170 s
#   4 train_step   benchmarks/train_step.py at the paper's size, thin slab and 3D, fp32/bf16   70 s
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
PY=${PYTHON:-python}
BIN=$(dirname "$(command -v "$PY")")
if ! "$PY" -c 'import torch' > /dev/null 2>&1; then
    echo "gpu_check: $PY cannot import torch: run it in the suite's environment (PYTHON=.venv/bin/python, after ./install.sh)" >&2
    exit 3
fi
if ((! smoke)); then
    why=$("$PY" -c 'import torch; print("" if torch.cuda.is_available() else f"torch {torch.__version__}, CUDA build {torch.version.cuda}")' 2>&1 | tail -1)
    if [[ -n "$why" ]]; then
        echo "gpu_check: no CUDA device ($why): run it on a GPU node, or with --smoke on a CPU" >&2
        exit 3
    fi
fi
out=${out:-benchmarks/results/gpu_check}
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$( ((smoke)) && echo 1 || echo 8)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stages=()

stage() {  # stage NAME BUDGET_S COMMAND...: run it bounded, record rc and seconds
    local name=$1 budget=$2; shift 2
    ((smoke)) && budget=600  # smoke: the paths, not the GPU's 8 minutes (a shared CPU is slow)
    local t0=$SECONDS rc=0
    echo "== gpu_check: $name (at most ${budget} s): $*" >&2
    timeout --kill-after=10 "$budget" "$@" > "$out/$name.log" 2>&1 || rc=$?
    echo "== gpu_check: $name: exit $rc after $((SECONDS - t0)) s (log $out/$name.log)" >&2
    stages+=("{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"log\": \"$out/$name.log\"}")
    return $rc
}

if ((smoke)); then
    small=(--smoke)
    cost_args=(--smoke --warmup 1)
    step_args=(--smoke --variants thin_slab --setups fp32 --batches 2 --steps 1 --warmup 0)
    infer_args=(--smoke --variants thin_slab --setups fp32 --repeats 1)
    # the loop and its signal path on tiny shapes: the tiny config, a phantom cohort
    cohort="--n 6 --anatomy phantom --shape 48 48 48" config=tiny prep="" run_s=20
    recipe="train.num_workers=2"
else
    small=()
    cost_args=(--paper-size --steps 20)
    step_args=(--variants thin_slab 3d --setups fp32 bf16 --batches 8 --steps 5 --warmup 2)
    infer_args=(--variants thin_slab 3d --setups fp32 bf16_autocast)
    # the recipe at the paper's sizes on 11 real-anatomy subjects (4 source / 4 target / 1 / 2)
    cohort="--n 11" config=recommended prep="data.split.preset=counts data.split.counts=[4,4,1,2]" run_s=100
    recipe="train.num_workers=4"
fi

if stage correctness 60 "$PY" benchmarks/gpu_check.py "${small[@]}" --out "$out/correctness.json"; then
    stage host_cost 100 "$PY" benchmarks/host_cost.py "${cost_args[@]}" --label gpu_check --out "$out/host_cost.json"
fi

train_run() {  # cohort -> preprocess -> train for run_s seconds; GPU utilisation sampled meanwhile
    # shellcheck disable=SC2086
    "$BIN/udean" cohort $cohort --out "$work/hcp" --no-progress &&
        "$BIN/udean" preprocess --config "$config" --data-root "$work/hcp" --out "$work/data" --no-progress $prep || return 1
    local sampler=""
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 > "$work/util.csv" &
        sampler=$!
    fi
    local rc=0
    # SIGUSR1 after run_s: the preemption path checkpoints and exits 75 (hpc.signals)
    # shellcheck disable=SC2086
    timeout --preserve-status -s USR1 --kill-after=30 "$run_s" "$BIN/udean" train --config "$config" "data.out=$work/data" \
        "train.out=$work/run" train.val_every=0 train.log_every=10 train.epochs=1 train.steps_per_epoch=100000 \
        train.checkpoint_every=100000 $recipe || rc=$?
    [[ -n "$sampler" ]] && kill "$sampler"
    "$PY" - "$work" "$out/train_run.json" "$rc" "$run_s" "$config" <<'EOF'
import json, sys
from pathlib import Path
work, dest, rc, run_s, config = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
train = [r for r in rows if r.get("kind") == "train"]
util = [float(x) for x in (work / "util.csv").read_text().split()] if (work / "util.csv").is_file() else []
steady = util[len(util) // 4:]  # skip start-up (imports, engine build, first batches)
out = {"config": config, "run_s": run_s, "exit_code": rc, "stopped_by_signal": rc == 75,
       "steps": train[-1]["step"] if train else 0,
       "patches_per_s_last": train[-1].get("patches_per_s") if train else None,
       "gpu_util_samples": len(util), "gpu_idle_share": (sum(u < 5 for u in steady) / len(steady)) if steady else None,
       "gpu_util_mean": (sum(steady) / len(steady)) if steady else None}
Path(dest).write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out))
sys.exit(0 if rc == 75 and train else 1)
EOF
}
export -f train_run
export PY BIN out work cohort config prep run_s recipe
stage train_run $((run_s + 70)) bash -c train_run
stage train_step 70 "$PY" benchmarks/train_step.py "${step_args[@]}" --out "$out/train_step.json"
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
