"""`udean train`: UDEAN with DeepSpeed on preprocessed shards; resumes by itself.

    udean train --config demo                              # one process
    torchrun --nproc_per_node=2 -m udean train --config demo
    mpirun -n 2 udean train --config demo train.backend=gloo
    srun udean train --config paper                        # slurm/train_udean.sh

Every start resumes from the newest valid checkpoint in `train.out` (model, optimizers, LR
schedules, step, sampler position, RNG), if that run has this start's config and data
(udean/checkpoint.py; docs/architecture.md "Resume"): a changed config, checkpoints that exist
but do not load, or a ZeRO checkpoint at another world size stop the start with the reason
(exit 2), before any work where they can be told. `--restart` moves the old run aside
(`<train.out>.old-<time>`, nothing is deleted) and starts over. Before the engines are built,
train.out is locked (one writer, `hpc.lock`) and checked writable, and every source/target
shard is checked against its manifest sha256 (split across ranks). SIGTERM / SIGUSR1 are agreed
on by all ranks in the next step's flag all-reduce (udean/steps.py); that step finishes, every
rank writes the checkpoint and exits with `hpc.signals.REQUEUE_EXIT_CODE` (75), which asks the
launcher to requeue. torch's threads are sized to the CPUs this process owns (`hpc.threads`)
unless OMP_NUM_THREADS is set. `setup` builds what the loop runs on (manifest -> shards ->
sampler -> models -> engines; benchmarks/scaling_train.py and loader.py build theirs with it
too); `data_loader` is the one DataLoader; `train` below is the whole training procedure, top
to bottom.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from hpc.signals import ignore_in_worker
from udean import checkpoint
from udean.config import Config, TrainConfig, save as save_config
from udean.data.sampler import UnpairedSampler
from udean.data.shards import PatchShards, UnpairedPatches, check_source_margin
from udean.engines import Engines, build_engines, check_precision
from udean.logs import Logs
from udean.models.udean import build, built_parts
from udean.losses import adapt_scale, model_parts
from udean.steps import CRITERIA, SCORE_OF, criterion, train_step, validate

EXIT_NONFINITE = 3  # too many non-finite losses in a row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (f"{parser.description}. Reads data.out/manifest.json, writes train.out "
                          "(checkpoints/, best/, metrics.jsonl, tb/, config.yaml).")
    parser.add_argument("--restart", action="store_true",
                        help="start over: move the run in train.out aside to <train.out>.old-<time> (kept, "
                             "not deleted); default: resume it (same config only)")


def run(args: argparse.Namespace) -> int:
    return train(args.cfg, restart=args.restart)


# --------------------------------------------------------------------------- setup
def patch_data(source: PatchShards | Sequence[str | os.PathLike], target: PatchShards | Sequence[str | os.PathLike],
               train: TrainConfig, steps_per_epoch: int = 0, rank: int = 0,
               world_size: int = 1) -> tuple[UnpairedPatches, UnpairedSampler]:
    """Source HR and target LR patch shards (or their paths) -> (dataset, this rank's sampler);
    `steps_per_epoch` 0: one pass over the target patches."""
    src, tgt = (x if isinstance(x, PatchShards) else PatchShards(x) for x in (source, target))
    steps = steps_per_epoch or UnpairedSampler.default_steps(len(tgt), train.batch_size, world_size)
    sampler = UnpairedSampler(len(src), len(tgt), train.batch_size, steps, train.seed, rank, world_size, train.augment,
                              train.augment_source)
    return UnpairedPatches(src, tgt), sampler


def data_loader(dataset: UnpairedPatches, sampler: UnpairedSampler, train: TrainConfig,
                device: torch.device) -> DataLoader:
    """The one DataLoader of training, made once: each epoch iterates it again, from where the
    sampler is set to start. Its workers persist across epochs (restarting them reopened every
    shard each epoch) and ignore the preemption signals, so only the main process checkpoints
    on them."""
    return DataLoader(dataset, batch_size=train.batch_size, sampler=sampler, num_workers=train.num_workers,
                      pin_memory=device.type == "cuda", drop_last=False, worker_init_fn=ignore_in_worker,
                      persistent_workers=train.num_workers > 0,
                      generator=torch.Generator().manual_seed(train.seed))  # keep the global RNG untouched


@dataclass
class Setup:
    """What the training loop runs on."""

    dataset: UnpairedPatches
    sampler: UnpairedSampler
    engines: Engines
    val_volumes: list[str]
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch


def _patch_shards(manifest, group: str, root: Path) -> PatchShards:
    """The group's shards under `root`, sized by the manifest's rows (no file opened)."""
    rows = [r for r in manifest.shards if r.group == group and r.kind != "volume"]
    if not rows:
        from preprocessing.manifest import manifest_path

        failed = sum(r.status == "failed" for r in manifest.subjects if r.group == group)
        raise ValueError(f"{manifest_path(manifest.out)}: no {group} shards to train on (group {group!r}: "
                         f"{failed} failed subject(s)); check `udean shards verify {manifest.out}`")
    return PatchShards([root / r.path for r in rows], [r.patches for r in rows])


def setup(cfg: Config, dist, data: Data | None = None) -> Setup:
    """Seeds, data of `cfg.data.out`'s manifest sharded for this rank, the same initial models on
    every rank (seeded; DeepSpeed also broadcasts rank 0's), both engines. `data`: what
    `check_data` returned (where to read; None: the manifest of `cfg.data.out`, read here)."""
    from preprocessing.manifest import load_manifest

    t = cfg.train
    _seed_everything(t.seed, t.deterministic)
    torch.backends.cudnn.benchmark = t.cudnn_benchmark  # fixed patch shapes; off when deterministic
    manifest = data.manifest if data is not None else load_manifest(cfg.data.out)
    root = data.root if data is not None else manifest.out
    check_source_margin(cfg.model.source_margin, manifest)
    dataset, sampler = patch_data(_patch_shards(manifest, "source", root), _patch_shards(manifest, "target", root), t,
                                  t.steps_per_epoch, dist.rank, dist.world_size)
    val_volumes = [str(root / r.path) for r in manifest.shards if r.group == "val" and r.kind == "volume"] \
        if t.val_every else []
    if t.val_subjects:
        val_volumes = val_volumes[:t.val_subjects]
    total_steps = t.epochs * sampler.steps_per_epoch
    gen, discs = build(cfg.model, slab=cfg.data.patches.slab, **model_parts(cfg.loss))
    engines = build_engines(cfg, gen, discs, total_steps, dist.device, dist.deepspeed_args())
    return Setup(dataset, sampler, engines, val_volumes, total_steps)


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism needs it
        torch.use_deterministic_algorithms(True)


def train(cfg: Config, dist=None, preempt=None, restart: bool = False) -> int:
    """Train UDEAN on `cfg.data.out` into `cfg.train.out` (resuming); returns the exit code (0,
    EXIT_NONFINITE, or REQUEUE_EXIT_CODE after a checkpoint on a signal). ValueError (on every
    rank) for what the user must fix: the config differs from the run in train.out, its
    checkpoints do not load, train.out is locked or unwritable, the shards do not verify.

    dist: hpc.dist.Dist (None: initialised here from the launcher's environment and shut down
    at the end); preempt: anything with `.requested` (None: SIGTERM / SIGUSR1 handlers);
    restart: move the run in train.out aside and start over."""
    from hpc.dist import init
    from hpc.signals import Preemption

    check_precision(cfg.train.precision)  # before any work: DeepSpeed would refuse it at initialize, after setup
    own_dist, own_preempt = dist is None, preempt is None
    dist = init(cfg.train.backend) if own_dist else dist
    preempt = Preemption.install() if own_preempt else preempt
    try:
        with contextlib.ExitStack() as held:
            _claim_out(cfg, dist, restart, held)
            code = _loop(cfg, dist, preempt)
    except BaseException:
        if own_dist and dist.world_size == 1:  # no peer to wait for: end the group, put the environment back
            dist.shutdown()
        raise  # more ranks: shutdown's barrier would wait forever for a rank that died; the process exits
    finally:
        if own_preempt:
            preempt.uninstall()
    if own_dist:
        dist.shutdown()
    return code


# --------------------------------------------------------------------------- before any work
def _claim_out(cfg: Config, dist, restart: bool, held: contextlib.ExitStack) -> None:
    """Collective, before the engines: (restart: move the old run aside), lock train.out (rank 0
    holds it in `held`), check it is writable, and refuse a run of another config there. The
    run's config.yaml is written once, when it starts from nothing; a resume never rewrites it."""
    from hpc.atomic import OutputError
    from hpc.lock import folder_lock
    from udean.config import load as load_config

    out = Path(cfg.train.out)
    err = None
    if dist.is_main:
        try:
            if restart and out.exists() and any(out.iterdir()):
                with folder_lock(out, "udean train --restart"):
                    aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                    out.rename(aside)
                print(f"udean train: --restart: moved the previous run to {aside}", flush=True)
            held.enter_context(folder_lock(out, "udean train"))
            saved = out / "config.yaml"
            if saved.exists():
                try:
                    previous = load_config(saved).to_dict()
                except ValueError as exc:
                    raise ValueError(f"{saved} (the config of the run in {out}): {exc}; use --restart or another "
                                     "train.out") from None
                keys = checkpoint.resume_mismatch(previous, cfg.to_dict())
                if keys:
                    raise checkpoint.ResumeRefused(
                        f"{out} holds a run of another config ({saved}): {', '.join(keys[:10])} differ; resume it "
                        "with its config, start over with --restart (the old run is moved aside, not deleted), or "
                        "use another train.out")
            elif not list(checkpoint.list_checkpoints(out)):
                save_config(cfg, saved)
        except (OSError, OutputError) as exc:
            err = f"train.out {out} is not writable: {getattr(exc, 'strerror', None) or exc}"
        except ValueError as exc:
            err = str(exc)
    err = dist.broadcast_object(err)
    if err:
        raise ValueError(err)


def data_fingerprint(manifest) -> str:
    """sha256 over the source/target shard rows (group, sha256, patches): what training learns from."""
    rows = sorted((r.group, r.sha256, r.patches) for r in manifest.shards if r.group in ("source", "target"))
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@dataclass
class Data:
    """What `check_data` found: the manifest, the folder to read its files from (data.out, or this
    node's staged copy), the data fingerprint, and what the check did (a metrics.jsonl event)."""

    manifest: object
    root: Path
    fingerprint: str
    report: dict

    def describe(self) -> str:
        r = self.report
        if "staged" not in r:
            return (f"data: {r['files']} files match the manifest, {r['hashed']} hashed and {r['files'] - r['hashed']} "
                    f"unchanged since they were ({r['seconds']:.1f} s)")
        text = (f"data: staged to {r['staged']} on {r['nodes']} node(s), read from there: {r['fetched']} files fetched "
                f"({r['bytes_fetched'] / 2**20:.1f} MiB), {r['hashed']} copies hashed ({r['seconds']:.1f} s)")
        for host, paths in r["refetched"].items():
            text += (f"\n  {host}: {len(paths)} staged copies did not match the manifest and were fetched again: "
                     f"{', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}")
        return text


def check_data(cfg: Config, dist) -> Data:
    """Collective: every source/target shard and val volume matches its manifest row (size,
    sha256), checked by stamps or hashed (udean/data/stage.py), split over the ranks, or on each
    node's staged copy (`train.stage_dir`, fetched where missing or wrong); ValueError naming the
    first bad ones. Rank 0 reads the manifest and sends it to every rank (one read of it, not
    one per rank). A shard that changed under a resumed run is caught here."""
    import socket

    from hpc.atomic import OutputError
    from preprocessing.manifest import load_manifest, manifest_path
    from udean.data import stage as staging

    t = cfg.train
    out = Path(t.out)
    err = payload = None
    if dist.is_main:
        try:
            manifest = load_manifest(cfg.data.out)
            rows = [r for r in manifest.shards if r.group in ("source", "target") or (r.group == "val" and t.val_every)]
            stamps = {} if t.stage_dir else staging.load_stamps(out, manifest.out.absolute())
            payload = (manifest, rows, stamps)
        except ValueError as exc:
            err = str(exc)
    err, payload = dist.broadcast_object((err, payload))
    if err:
        raise ValueError(err)
    manifest, rows, stamps = payload
    root, problem, result = manifest.out, None, None
    try:
        if t.stage_dir:
            root = staging.stage_root(t.stage_dir, rows)
            if dist.local_rank == 0:
                result = staging.stage(rows, manifest.out, root)
        else:
            result = staging.check(rows[dist.rank::dist.world_size], manifest.out, stamps)
    except (ValueError, OutputError) as exc:
        problem = (type(exc).__name__, str(exc))
    gathered = dist.gather_object((socket.gethostname(), problem, result))  # collective: every rank calls it
    verdict = None
    if dist.is_main:
        errors = [p for _, p, _ in gathered if p]
        results = [(host, r) for host, _, r in gathered if r is not None]
        found = [w for _, r in results for w in r.problems]
        report = {"files": len(rows), "hashed": sum(r.hashed for _, r in results),
                  "hashed_per_rank": [r.hashed for _, r in results],  # per node when staging
                  "seconds": round(max((r.seconds for _, r in results), default=0.0), 3)}
        if t.stage_dir:
            report.update(staged=str(root), nodes=len(results), fetched=sum(len(r.fetched) for _, r in results),
                          refetched={host: r.refetched for host, r in results if r.refetched},
                          bytes_fetched=sum(r.bytes_fetched for _, r in results))
        elif not found and not errors:
            try:
                staging.save_stamps(out, manifest.out.absolute(), {k: v for _, r in results for k, v in r.stamps.items()})
            except OutputError as exc:
                errors.append(("OutputError", str(exc)))
        verdict = (errors, found, report)
    errors, found, report = dist.broadcast_object(verdict)
    if errors:
        kind, text = errors[0]
        if kind == "OutputError":  # "cannot write PATH: WHY" on the rank that met it (a full local disk): exit 74
            raise OutputError(*text.removeprefix("cannot write ").split(": ", 1))
        raise ValueError(text)
    if found:
        raise ValueError(f"{manifest_path(manifest.out)}: {len(found)} shard(s) do not match the manifest "
                         f"({'; '.join(found[:3])}); run `udean shards verify {manifest.out}` / `regenerate`")
    return Data(manifest, root, data_fingerprint(manifest), report)


def size_threads(cfg: Config, dist, say) -> None:
    """torch intra-op threads from the CPUs this process owns (hpc.threads), unless OMP_NUM_THREADS is set."""
    from hpc import threads

    plan = threads.plan(dist.local_world_size, cfg.train.num_workers)
    if plan is not None:
        torch.set_num_threads(plan.threads)
        say(f"threads: {plan.threads} intra-op ({plan.reason}; OMP_NUM_THREADS overrides)")


def _loop(cfg: Config, dist, preempt) -> int:
    from hpc.signals import REQUEUE_EXIT_CODE

    t = cfg.train
    out = Path(t.out)
    logs = Logs(out, 0, enabled=dist.is_main, progress_every=t.progress_every)
    size_threads(cfg, dist, logs.message)
    data = check_data(cfg, dist)
    logs.message(data.describe())
    fingerprint = data.fingerprint
    s = setup(cfg, dist, data)
    dataset, sampler, engines, val_volumes, total_steps = s.dataset, s.sampler, s.engines, s.val_volumes, s.total_steps
    steps_per_epoch = s.steps_per_epoch
    logs.total_steps = total_steps

    parts = built_parts(engines.generator, engines.discriminators)
    state = checkpoint.load_latest(out, engines, dist, warn=logs.warn,
                                   expect={"config": cfg.to_dict(), "data": fingerprint, "parts": parts})
    step = int(state["step"]) if state else 0
    logs.open(step)
    logs.event(step, "data", **data.report)
    nonfinite_run = int(state["nonfinite_run"]) if state else 0
    nonfinite_total = int(state["nonfinite_total"]) if state else 0
    best = dict(state["best"]) if state else {"psnr": float("-inf"), "ssim": 0.0, "step": -1}
    by, learned = criterion(t.best_by, data.manifest, val_volumes, data.root) if val_volumes else ("none", [])
    incumbent = _incumbent(out, cfg, engines) if by == "learned" and best["step"] >= 0 and \
        (out / "best" / "generator.pt").is_file() else None
    if state:
        sampler.load_state_dict(state["sampler"])
        if divmod(step, steps_per_epoch) != (sampler.epoch, sampler.position // t.batch_size):
            raise ValueError(f"the checkpoint in {out} was taken with another train.steps_per_epoch or "
                             "train.batch_size: resume with the same values, or use a new train.out")
        logs.message(f"resumed from step {step} (epoch {sampler.epoch}, batch {sampler.position // t.batch_size})"
                     + (f"; {logs.replaced} metrics rows of the steps redone moved to metrics.replaced.jsonl"
                        if logs.replaced else ""))
        logs.event(step, "resume", replaced_rows=logs.replaced)
    elif dist.is_main:
        logs.message(f"training from scratch: {total_steps} steps = {t.epochs} epochs x {steps_per_epoch}, "
                     f"{dist.world_size} rank(s) x {t.batch_size} patches, {len(dataset.source)} source / "
                     f"{len(dataset.target)} target patches, precision {t.precision}, ZeRO {t.zero_stage}"
                     + (f", cudnn.benchmark {'on' if torch.backends.cudnn.benchmark else 'off'}"
                        if dist.device.type == "cuda" else ""))
    if by != "none":
        logs.message(f"best/ is chosen by {by}: {CRITERIA[by]} (train.best_by={t.best_by})")

    def save(step: int, reason: str) -> None:
        epoch, batch = divmod(step, steps_per_epoch)
        ours = {"step": step, "epoch": epoch, "sampler": {"epoch": epoch, "position": batch * t.batch_size},
                "nonfinite_run": nonfinite_run, "nonfinite_total": nonfinite_total, "best": best,
                "world_size": dist.world_size, "config_hash": cfg.hash(), "config": cfg.to_dict(),
                "data": fingerprint, "parts": parts}
        weights = engines.inference_weights()  # collective: the fp32 masters (ZeRO >= 1 shards them)
        path = checkpoint.save(out, step, engines, ours, dist, t.keep_last, weights)
        logs.event(step, "checkpoint", path=str(path), reason=reason)
        if dist.is_main:  # last/: the inference checkpoint of the newest checkpoint
            checkpoint.save_inference(out / "last", weights,
                                      {"step": step, "epoch": epoch, "checkpoint": path.name}, cfg)
            if by == "last":  # no honest score: best/ is last/, always
                checkpoint.save_best(out, weights, {"by": "last", "criterion": CRITERIA["last"], "step": step,
                                                    "epoch": epoch}, cfg)

    probe = None
    if dist.is_main and (t.fidelity_every or t.image_every):  # udean/fidelity.py
        from udean.fidelity import Probe

        probe = Probe.from_shards(dataset.source, dataset.target, margin=cfg.model.source_margin, seed=t.seed)

    loader, batches = data_loader(dataset, sampler, t, dist.device), None
    tick, tick_step = time.perf_counter(), step
    with logs:
        while step < total_steps:
            epoch, batch = divmod(step, steps_per_epoch)
            if batches is None:  # a new epoch, or the middle of one after a resume
                sampler.set_position(epoch, batch)
                batches = iter(loader)
            y_s, x_t = next(batches)

            # the preemption request is agreed on in the step's one flag all-reduce (udean/steps.py)
            result = train_step(engines, y_s, x_t, cfg.loss, dist, adapt_scale(cfg.loss, step / total_steps),
                                stop=preempt.requested)
            step += 1

            if result.skipped:
                nonfinite_run += 1
                nonfinite_total += 1
                logs.event(step, "nonfinite_skipped", run=nonfinite_run, total=nonfinite_total,
                           **{k: v for k, v in result.scalars().items() if k in ("g.total", "d.total")})
                logs.warn(f"step {step}: non-finite loss, step skipped "
                          f"({nonfinite_run} in a row, {nonfinite_total} in total)")
                if nonfinite_run >= t.max_nonfinite:
                    logs.message(f"stopping at step {step}: {nonfinite_run} consecutive steps had a non-finite "
                                 f"loss (train.max_nonfinite={t.max_nonfinite}). The model diverged or the "
                                 "data holds NaN/Inf: lower train.lr, try precision fp32, or check the shards "
                                 "(`udean shards`).", style="bold red")
                    return EXIT_NONFINITE
            else:
                nonfinite_run = 0
            if step % t.log_every == 0 or step == total_steps or step == 1:
                now = time.perf_counter()
                rate = (step - tick_step) * t.batch_size * dist.world_size / max(now - tick, 1e-9)
                tick, tick_step = now, step
                logs.train(step, epoch, {**result.scalars(), "lr": engines.lr(), "patches_per_s": rate,
                                         "skipped": float(result.skipped)})

            # float32 in, as in the step: the degradation stays float32, the networks cast it
            if probe is not None and t.fidelity_every and (step % t.fidelity_every == 0 or step in (1, total_steps)):
                logs.fidelity(step, epoch, probe.measure(engines.generator))
            if probe is not None and t.image_every and (step % t.image_every == 0 or step == 1):
                logs.images(step, probe.images(engines.generator))

            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch:
                batches = None
                if val_volumes and (epoch + 1) % t.val_every == 0:
                    scores = validate(engines, val_volumes, cfg, dist, learned, incumbent)
                    logs.val(step, epoch, scores)
                    if by in SCORE_OF:  # `learned`: against the previous best rescored on this step's LR
                        value = scores[SCORE_OF[by]]
                        than = scores.get("best_learned_psnr", float("-inf")) if by == "learned" else \
                            best.get("value", best["psnr"])
                        if value > than:
                            best = {"by": by, "criterion": CRITERIA[by], "value": value, "psnr": scores["psnr"],
                                    "ssim": scores["ssim"], "lr_psnr": scores["lr_psnr"], "step": step, "epoch": epoch}
                            weights = engines.inference_weights()  # collective: every rank has the same scores
                            if dist.is_main:
                                checkpoint.save_best(out, weights, best, cfg)
                            if by == "learned":
                                incumbent = _incumbent(out, cfg, engines, weights)
                            logs.event(step, "best", **{k: best[k] for k in ("by", "value", "psnr", "ssim", "lr_psnr")})

            stop = result.stop
            if stop or end_of_epoch or step % t.checkpoint_every == 0 or step == total_steps:
                save(step, "signal" if stop else "end" if step == total_steps else "periodic")
            if stop:
                name = getattr(preempt, "signal_name", None) or "a signal"
                logs.message(f"{name} received: checkpoint at step {step} written; exiting {REQUEUE_EXIT_CODE} "
                             "to be requeued")
                logs.event(step, "preempted", signal=name)
                return REQUEUE_EXIT_CODE
    if best["step"] < 0 and by != "last":  # no validation ran: best/ is the last weights, said so
        weights = engines.inference_weights()  # collective
        if dist.is_main:
            checkpoint.save_best(out, weights, {"by": "none: no validation ran, these are the last weights",
                                                "step": step}, cfg)
    if dist.is_main:
        if by == "last":
            logs.message(f"done: {step} steps; best/ = last/ (step {step}): {CRITERIA['last']}")
        elif best["step"] >= 0:
            logs.message(f"done: {step} steps; best/ is step {best['step']}, chosen by {best.get('by', 'psnr')} "
                         f"({best.get('value', best['psnr']):.3f} dB): {CRITERIA.get(best.get('by'), '')}")
        else:
            logs.message(f"done: {step} steps; no validation ran: best/ = last/")
    return 0


def _incumbent(out: Path, cfg: Config, engines: Engines, weights: dict | None = None) -> torch.nn.Module:
    """The best SR network so far, on the engine's device and in its precision, for criterion
    `learned` to rescore: `weights`, or on a resume best/generator.pt."""
    from udean.models.udean import build_sr

    if weights is None:
        weights = torch.load(Path(out) / "best" / "generator.pt", map_location="cpu", weights_only=True)
    net = build_sr(cfg.model, slab=cfg.data.patches.slab)
    net.load_state_dict(weights)
    return net.to(engines.g.device, engines.dtype).eval()
