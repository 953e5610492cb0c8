"""One measured point of training scaling: the real UDEAN step at this job's rank count.

Run it under any launcher, once per rank count (`benchmarks/scaling.py train` does 1..N here):

    mpirun -n 2 python benchmarks/scaling.py train --data DIR --config tiny --mode weak
    srun python benchmarks/scaling.py train --data data/udean --config paper --mode weak

Every step goes through the project's own path: `udean.train.setup` (the real shards, sampler
and both DeepSpeed engines with Adam and the configured precision, as `udean train` builds
them), its `data_loader`, and `udean.steps.train_step`. Per step it times

- data wait: blocked in `next(batches)`;
- step: `train_step` (G and D forward, losses, both backwards with DeepSpeed's gradient
  all-reduce inside, both optimizer steps);

then, outside the steps, it times the gradient all-reduce alone (flat buffers of the real G and
D gradient sizes, in the engines' communication dtype, as DeepSpeed ZeRO-0 reduces them) and a
ladder of message sizes to fit the link's bandwidth and latency for the projection; a few extra
steps run under torch.profiler to read the all-reduce time inside the real step.
compute = step - gradient all-reduce (timed). Rank 0 writes one JSON per (mode, rank count).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LADDER_BYTES = (4 << 10, 64 << 10, 1 << 20, 8 << 20, 32 << 20, 128 << 20)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="preprocessed data folder (holds manifest.json)")
    p.add_argument("--config", default="tiny", help="model/train config (path or shipped name)")
    p.add_argument("--mode", choices=("weak", "strong"), default="weak",
                   help="weak: --batch per rank; strong: --batch in total, split over ranks")
    p.add_argument("--batch", type=int, default=None, help="default: the config's train.batch_size")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--profile-steps", type=int, default=2, help="extra steps under torch.profiler (0: off)")
    p.add_argument("--comm-repeats", type=int, default=5, help="repeats of each timed all-reduce")
    p.add_argument("--backend", default="auto", help="auto (nccl with CUDA, else gloo), gloo, nccl")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results folder")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_allreduce(dist, numel: int, dtype, repeats: int) -> float:
    """Median seconds of one all-reduce of `numel` elements, ranks lined up by a barrier."""
    import torch
    import torch.distributed as td

    if dist.world_size == 1 or numel == 0:
        return 0.0
    buf = torch.ones(numel, dtype=dtype, device=dist.device)
    td.all_reduce(buf)  # warm the connection
    times = []
    for _ in range(repeats):
        td.barrier()
        _sync(dist.device)
        t0 = time.perf_counter()
        td.all_reduce(buf)
        _sync(dist.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _profiled_allreduce_s(events) -> float:
    """All-reduce seconds inside the profiled steps: gloo's collective (CPU) or NCCL kernels."""
    total = 0.0
    for e in events:
        key = e.key.lower()
        if key.startswith("gloo:all_reduce"):
            total += e.cpu_time_total
        elif "allreduce" in key and "nccl" in key:
            total += getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
    return total / 1e6


def measure(args: argparse.Namespace) -> dict | None:
    import torch

    from hpc.dist import init
    from udean.config import load
    from udean.steps import train_step
    from udean.train import data_loader, setup

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist = init(args.backend)
    try:
        cfg = load(args.config, list(args.overrides))
        batch = args.batch or cfg.train.batch_size
        per_rank = batch if args.mode == "weak" else batch // dist.world_size
        if per_rank < 1 or (args.mode == "strong" and batch % dist.world_size):
            raise ValueError(f"strong scaling: --batch {batch} does not split evenly over {dist.world_size} ranks")
        n_steps = args.warmup + args.steps + args.profile_steps
        # one epoch of exactly the measured steps: the sampler's length and the LR schedule's
        cfg = load(args.config, list(args.overrides) + [f"train.batch_size={per_rank}", f"data.out={args.data}",
                                                        "train.epochs=1", f"train.steps_per_epoch={n_steps}"])
        t = cfg.train
        run = setup(cfg, dist)
        engines = run.engines
        batches = iter(data_loader(run.dataset, run.sampler, t, dist.device))
        comm_dtype = engines.g.communication_data_type
        numel = {"g": sum(p.numel() for p in engines.generator.parameters() if p.requires_grad),
                 "d": sum(p.numel() for p in engines.discriminators.parameters() if p.requires_grad)}

        data_s, step_s = [], []
        profiled = None
        for i in range(n_steps):
            profiling = args.profile_steps and i == args.warmup + args.steps
            if profiling:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dist.device.type == "cuda" else [])
                prof = profile(activities=acts)
                prof.__enter__()
            _sync(dist.device)
            t0 = time.perf_counter()
            y_s, x_t = next(batches)
            t1 = time.perf_counter()
            train_step(engines, y_s, x_t, cfg.loss, dist)
            _sync(dist.device)
            t2 = time.perf_counter()
            if args.warmup <= i < args.warmup + args.steps:
                data_s.append(t1 - t0)
                step_s.append(t2 - t1)
        if args.profile_steps:
            prof.__exit__(None, None, None)
            profiled = _profiled_allreduce_s(prof.key_averages()) / args.profile_steps

        dist.barrier()
        comm = {k: _timed_allreduce(dist, n, comm_dtype, args.comm_repeats) for k, n in numel.items()}
        ladder = [_timed_allreduce(dist, b // 4, torch.float32, args.comm_repeats) for b in LADDER_BYTES]

        mine = {"rank": dist.rank, "data_wait_s": statistics.median(data_s), "step_s": statistics.median(step_s),
                "step_s_all": step_s, "data_wait_s_all": data_s, "allreduce_profiled_s": profiled,
                "allreduce_g_s": comm["g"], "allreduce_d_s": comm["d"], "ladder_s": ladder}
        ranks = dist.gather_object(mine)
        if not dist.is_main:
            return None
        from benchmarks.common import provenance, write_json

        # the job goes at the pace of its slowest rank
        slow = max(ranks, key=lambda r: r["step_s"] + r["data_wait_s"])
        allreduce = max(r["allreduce_g_s"] + r["allreduce_d_s"] for r in ranks)
        elem = torch.tensor([], dtype=comm_dtype).element_size()
        step_total = slow["step_s"] + slow["data_wait_s"]
        result = {
            "kind": "train", "mode": args.mode, "ranks": dist.world_size, "backend": dist.backend,
            "device": str(dist.device), "launcher": dist.launcher, "config": args.config,
            "overrides": list(args.overrides), "precision": t.precision, "variant": cfg.model.variant,
            "batch_per_rank": per_rank, "global_batch": per_rank * dist.world_size,
            "patch_lr": list(run.dataset.target[0].shape), "patch_hr": list(run.dataset.source[0].shape),
            "steps": args.steps, "warmup": args.warmup,
            "params": numel, "comm_dtype": str(comm_dtype).replace("torch.", ""),
            "grad_bytes": {k: n * elem for k, n in numel.items()},
            "step_total_s": step_total,
            # least-disturbed step of the slowest rank: on a shared machine the median carries other jobs' load
            "step_total_min_s": max(min(a + b for a, b in zip(r["step_s_all"], r["data_wait_s_all"])) for r in ranks),
            "data_wait_s": slow["data_wait_s"], "train_step_s": slow["step_s"],
            "allreduce_s": allreduce, "compute_s": slow["step_s"] - allreduce,
            "allreduce_profiled_s": (max((r["allreduce_profiled_s"] or 0.0) for r in ranks)
                                     if args.profile_steps else None),
            "throughput_samples_per_s": per_rank * dist.world_size / step_total,
            "ladder_bytes": list(LADDER_BYTES),
            "ladder_s": [max(r["ladder_s"][i] for r in ranks) for i in range(len(LADDER_BYTES))],
            "per_rank": ranks,
            "provenance": provenance(),
        }
        path = write_json(Path(args.out) / f"scaling_train_{args.mode}_n{dist.world_size}.json", result)
        print(f"scaling train {args.mode} n={dist.world_size}: step {step_total * 1e3:.1f} ms "
              f"(compute {result['compute_s'] * 1e3:.1f}, all-reduce {allreduce * 1e3:.1f}, "
              f"data {slow['data_wait_s'] * 1e3:.1f}) -> {path}", flush=True)
        return result
    finally:
        dist.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scaling.py train", description=__doc__.split("\n")[0])
    add_arguments(p)
    measure(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
