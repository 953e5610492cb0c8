"""A tiny stand-in for `udean train` (for SLURM/submitit tests): N steps of `sleep`, a step
counter checkpointed on SIGUSR1/SIGTERM, exit REQUEUE_EXIT_CODE after the checkpoint, resume
from the checkpoint on the next start. Every rank agrees on the stop through hpc.dist.

    python tests/hpc/jobs/preemptible.py OUT_DIR STEPS [SLEEP_S]
"""
import json
import sys
import time
from pathlib import Path

from hpc.atomic import atomic_write_text
from hpc.dist import init
from hpc.signals import REQUEUE_EXIT_CODE, Preemption


def main() -> int:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    sleep_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
    dist = init("gloo")
    preempt = Preemption.install()
    ckpt = out / "checkpoint.json"
    start = json.loads(ckpt.read_text())["step"] if ckpt.is_file() else 0
    log = out / f"events-rank{dist.rank}.jsonl"
    try:
        with log.open("a") as f:
            f.write(json.dumps({"event": "start", "step": start, "world": dist.world_size}) + "\n")
        for step in range(start + 1, steps + 1):
            time.sleep(sleep_s)
            with log.open("a") as f:
                f.write(json.dumps({"event": "step", "step": step}) + "\n")
            if dist.all_reduce_flag(preempt.requested):
                if dist.is_main:
                    atomic_write_text(ckpt, json.dumps({"step": step}))
                    with log.open("a") as f:
                        f.write(json.dumps({"event": "preempted", "step": step, "signal": preempt.signal_name}) + "\n")
                dist.barrier()
                return REQUEUE_EXIT_CODE
        if dist.is_main:
            atomic_write_text(ckpt, json.dumps({"step": steps}))
            atomic_write_text(out / "done.json", json.dumps({"step": steps, "world": dist.world_size}))
        return 0
    finally:
        preempt.uninstall()
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
