"""Both DeepSpeed engines and the training step on 2 real ranks (torchrun, gloo), for every
`train.precision` x `train.zero_stage` the config accepts: each engine has its own DeepSpeed
dict and torch's Adam; every combination this machine's accelerator supports steps, and the
others (fp16 on a CPU without oneDNN fp16) are refused by `check_precision` exactly where
DeepSpeed refuses them; the step agrees on its flags (non-finite loss, preemption) in one
all-reduce with one host read.

The worker below (this file run as a script by torchrun) records what it saw per rank in JSON;
the test asserts on it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":  # run by torchrun as a script: make `tests` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.udean.test_train import BIN, run_cmd

COMBOS = [(p, z) for p in ("fp32", "bf16", "fp16") for z in (0, 1)]  # udean.config.TESTED_ZERO_STAGES
TINY = ["model.features=8", "model.n_groups=1", "model.n_rcab=2", "model.reduction=2", "model.encoder_layers=2",
        "model.disc_features=8", "model.disc_blocks=1", "data.patches.lr_size=[16,16]", "train.batch_size=2"]


def worker(out: str) -> None:
    import torch

    from benchmarks.host_cost import HostCost
    from hpc.dist import init
    from udean.config import load
    import deepspeed

    from udean.engines import build_engines, deepspeed_config, fp32_masters, supported_precisions
    from udean.losses import model_parts
    from udean.models.udean import build
    from udean.steps import train_step

    from unittest import mock

    from torch.nn.utils.parametrizations import _SpectralNorm

    power = _SpectralNorm._power_method
    dist = init("gloo")
    seen = {}
    for precision, zero in COMBOS:
        cfg = load("paper", TINY + [f"train.precision={precision}", f"train.zero_stage={zero}"])
        torch.manual_seed(0)
        gen, discs = build(cfg.model, slab=cfg.data.patches.slab)
        if precision not in supported_precisions():  # e.g. fp16 on a CPU without oneDNN fp16 (AMD EPYC)
            refused = {}
            try:
                build_engines(cfg, gen, discs, total_steps=100, device=dist.device)
            except ValueError as exc:
                refused["ours"] = str(exc)
            try:  # DeepSpeed itself, without our check: the refusal must be its own answer, not ours
                deepspeed.initialize(model=gen, model_parameters=list(gen.parameters()),
                                     config=deepspeed_config(cfg.train), dist_init_required=False)
            except ValueError as exc:
                refused["deepspeed"] = str(exc)
            seen[f"{precision}/{zero}"] = {"refused": refused}
            continue
        engines = build_engines(cfg, gen, discs, total_steps=100, device=dist.device)
        g, d = engines.g, engines.d
        y = torch.rand(2, 6, 32, 32, generator=torch.Generator().manual_seed(1))
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))

        def params():
            return [p.detach().float().clone() for p in (*gen.parameters(), *discs.parameters())]

        n_gen = len(list(gen.parameters()))

        train_step(engines, y, x, cfg.loss, dist)  # the first step also moves the resampling taps once
        before = params()
        with HostCost(inputs=(y, x)) as counted:
            first = train_step(engines, y, x, cfg.loss, dist)
        after = params()
        stop = train_step(engines, y, x, cfg.loss, dist, stop=dist.rank == 1)  # only rank 1 was signalled
        held = params()
        nan = train_step(engines, y.clone().fill_(float("nan")) if dist.rank == 0 else y, x, cfg.loss, dist)
        seen[f"{precision}/{zero}"] = {
            "zero_stage": cfg.train.zero_stage,
            "basic_optimizers": [f"{type(e.basic_optimizer).__module__}.{type(e.basic_optimizer).__name__}" for e in (g, d)],
            "wrappers": [type(e.optimizer).__name__ for e in (g, d)],
            "own_dicts": g.config is not d.config,
            "dicts_unchanged": g.config == d.config == deepspeed_config(cfg.train),
            "first": [first.skipped, first.stop], "stop": [stop.skipped, stop.stop], "nan": [nan.skipped, nan.stop],
            # G and D both stepped (some G tensors sit behind the zero-initialised output convs)
            "moved": [any(not torch.equal(a, b) for a, b in zip(before[sl], after[sl]))
                      for sl in (slice(0, n_gen), slice(n_gen, None))],
            "nan_left_weights": all(torch.equal(a, b) for a, b in zip(held, params())),
            "our_syncs": counted.device_syncs(ours=True),  # both ways
            "our_collectives": sum(n for o, n in counted.collectives.items() if o in ("udean", "hpc")),
        }
        del engines, g, d
    # learning rates of their own for the degradation and the discriminators (train.lr_degradation,
    # lr_discriminator): the groups reach the optimizer DeepSpeed wraps, and the schedule scales them alike
    for precision, zero in (("bf16", 1), ("fp32", 0)):
        cfg = load("recommended", TINY + [f"train.precision={precision}", f"train.zero_stage={zero}", "train.lr=3e-3",
                                          "train.lr_degradation=1e-3", "train.lr_discriminator=2e-3",
                                          "model.source_margin=[0,0]"])
        gen, discs = build(cfg.model, slab=cfg.data.patches.slab, **model_parts(cfg.loss))
        engines = build_engines(cfg, gen, discs, total_steps=4, device=dist.device)
        y = torch.rand(2, 6, 32, 32, generator=torch.Generator().manual_seed(1))
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        lrs = [[[pg["lr"] for pg in e.optimizer.param_groups] for e in (engines.g, engines.d)]]
        blur = gen.blur.plane.detach().float().clone()
        # the recipe's spectral norm: one power iteration per discriminator conv in each half of a step
        sn = [m for m in discs.modules() if isinstance(m, _SpectralNorm)]
        calls = []
        with mock.patch.object(_SpectralNorm, "_power_method", autospec=True,
                               side_effect=lambda self, *a, **k: calls.append(self) or power(self, *a, **k)):
            train_step(engines, y, x, cfg.loss, dist)
        train_step(engines, y, x, cfg.loss, dist)
        lrs.append([[pg["lr"] for pg in e.optimizer.param_groups] for e in (engines.g, engines.d)])
        seen[f"groups {precision}/{zero}"] = {"lrs": lrs, "blur_moved": not torch.equal(blur, gen.blur.plane.float()),
                                              "sn_convs": len(sn), "power_iterations": len(calls),
                                              "each_twice": all(sum(c is m for c in calls) == 2 for m in sn)}
        del engines
    # ZeRO >= 1 re-points the parameters at the flat bit16 buffer only where they moved
    # (engines.repoint_only_if_moved): the same weights, step for step, as DeepSpeed's own
    # re-pointing after every step, none of its re-pointing in a step, and a moved buffer re-pointed
    for precision in ("bf16", "fp32"):
        cfg = load("recommended", TINY + [f"train.precision={precision}", "train.zero_stage=1",
                                          "model.source_margin=[0,0]"])
        y = torch.rand(2, 6, 32, 32, generator=torch.Generator().manual_seed(1))
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        runs = {}
        for guarded in (True, False):
            torch.manual_seed(0)
            gen, discs = build(cfg.model, slab=cfg.data.patches.slab, **model_parts(cfg.loss))
            engines = build_engines(cfg, gen, discs, total_steps=4, device=dist.device)
            opts = [e.optimizer for e in (engines.g, engines.d)]
            if not guarded:  # DeepSpeed's own method back
                for opt in opts:
                    vars(opt).pop("_update_model_bit16_weights", None)
            repointed = []  # DeepSpeed's own re-pointing, called in the steps
            original = type(opts[0])._update_model_bit16_weights
            with mock.patch.object(type(opts[0]), "_update_model_bit16_weights", autospec=True,
                                   side_effect=lambda self, i: repointed.append(i) or original(self, i)):
                for _ in range(3):
                    train_step(engines, y, x, cfg.loss, dist)
            runs[guarded] = {"weights": [p.detach().float().clone() for p in (*gen.parameters(), *discs.parameters())],
                             "repointed": len(repointed)}
            if guarded:  # a buffer moved (as an offload or a load may): its parameters follow it
                opt = opts[0]
                flat = opt.bit16_groups_flat[0]
                flat.data = flat.data.clone()
                opt._update_model_bit16_weights(0)
                first = opt.bit16_groups[0][0]
                runs["followed"] = first.data_ptr() == flat.data_ptr() + opt.round_robin_bit16_offsets[0][
                    opt.round_robin_bit16_indices[0][0]] * flat.element_size()
            del engines
        seen[f"repoint {precision}/1"] = {
            "same_weights": all(torch.equal(a, b) for a, b in zip(runs[True]["weights"], runs[False]["weights"])),
            "repointed": [runs[True]["repointed"], runs[False]["repointed"]], "followed": runs["followed"]}
    # float32 islands (engines.keep_fp32): from one seed the bf16 engines' physics degradation is the
    # fp32 engines' to the last bit; after steps it reads the optimizer's fp32 masters on every rank
    # (ZeRO 1 shards them), the bf16 copy only rounds them, and inference_weights are the masters
    reference = None
    for precision, zero in (("fp32", 0), ("bf16", 1), ("bf16", 0)):
        cfg = load("recommended", TINY + [f"train.precision={precision}", f"train.zero_stage={zero}",
                                          "model.source_margin=[0,0]"])
        torch.manual_seed(0)
        gen, discs = build(cfg.model, slab=cfg.data.patches.slab, **model_parts(cfg.loss))
        engines = build_engines(cfg, gen, discs, total_steps=4, device=dist.device)
        y = torch.rand(2, 6, 32, 32, generator=torch.Generator().manual_seed(1))
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(3)
        start = [gen.degrade(y).detach(), *gen.blur.kernels()[:2], gen.noise.sigma().detach()]
        reference = reference or start
        for _ in range(2):
            train_step(engines, y, x, cfg.loss, dist)
        masters = fp32_masters(engines.g)
        deg = [gen.blur.plane, gen.blur.slab, gen.noise.log_sigma]
        held = [masters(p).detach().clone() for p in deg]  # collective at ZeRO 1
        named = dict(gen.named_parameters())
        weights = engines.inference_weights()  # collective
        seen[f"islands {precision}/{zero}"] = {
            "start_equal": [torch.equal(a, b) for a, b in zip(start, reference)],
            "dtypes": sorted({str(p.dtype) for p in deg}),
            "reads_masters": precision == "fp32" or all(torch.equal(p.master, m) for p, m in zip(deg, held)),
            "copy_rounds": all(torch.equal(p.detach(), m.to(p.dtype)) for p, m in zip(deg, held)),
            "inference_fp32": all(v.dtype == torch.float32 for v in weights.values()),
            "inference_masters": all(torch.equal(v, masters(named[k]).detach().float().cpu())
                                     for k, v in weights.items() if k in named),
            "inference_not_the_copy": any(not torch.equal(v, named[k].detach().float().cpu())
                                          for k, v in weights.items() if k in named),
            "sigma": float(gen.noise.sigma()),
        }
        del engines
    Path(out, f"rank{dist.rank}.json").write_text(json.dumps(seen))
    dist.shutdown()


def test_every_tested_precision_and_zero_stage_steps_and_the_step_agrees_on_its_flags(tmp_path):
    r = run_cmd([BIN / "torchrun", "--standalone", "--nproc_per_node=2", __file__, tmp_path], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        groups = {k: seen.pop(k) for k in list(seen) if k.startswith("groups")}
        assert set(groups) == {"groups bf16/1", "groups fp32/0"}, groups
        repoint = {k.split()[1]: seen.pop(k) for k in list(seen) if k.startswith("repoint")}
        for combo, s in repoint.items():
            # bit-equal weights; DeepSpeed re-pointed in each of its steps, we in none; a moved buffer followed
            assert s["same_weights"] and s["repointed"][0] == 0 and s["repointed"][1] >= 3 and s["followed"], \
                (rank, combo, s)
        assert set(repoint) == {"bf16/1", "fp32/1"}, repoint
        islands = {k.split()[1]: seen.pop(k) for k in list(seen) if k.startswith("islands")}
        assert set(islands) == {"fp32/0", "bf16/1", "bf16/0"}, islands
        for combo, s in islands.items():
            where = f"rank {rank}, islands {combo}: {s}"
            # X_{s~t} (same noise draws), the two kernels and sigma of a fresh model: bf16 = fp32 exactly
            assert s["start_equal"] == [True] * 4, where
            assert s["dtypes"] == ["torch.float32" if combo == "fp32/0" else "torch.bfloat16"], where
            assert s["reads_masters"] and s["copy_rounds"], where
            assert s["inference_fp32"] and s["inference_masters"], where  # best/, last/, export: the masters
            assert s["inference_not_the_copy"] == (combo != "fp32/0"), where
        if rank == 1:  # every rank's degradation reads the same masters
            other = json.loads((tmp_path / "rank0.json").read_text())
            assert all(other[f"islands {c}"]["sigma"] == s["sigma"] for c, s in islands.items())
        assert set(seen) == {f"{p}/{z}" for p, z in COMBOS}
        for combo, s in groups.items():
            (g0, d0), (g2, d2) = s["lrs"]
            assert g0 == pytest.approx([3e-3, 1e-3]) and d0 == pytest.approx([2e-3]), (combo, s)
            # cosine over 4 steps, at step 2: every group at the same fraction of its own lr
            assert [a / b for a, b in zip(g2 + d2, g0 + d0)] == pytest.approx([g2[0] / g0[0]] * 3) and g2[0] < g0[0]
            assert s["blur_moved"], combo  # the degradation's group is trained
            # one power iteration per conv in the G step (cached through its 5 discriminator calls)
            # and one in the D step, Miyato et al.'s one per update (was one per call: 5 + 5)
            assert s["sn_convs"] > 0 and s["power_iterations"] == 2 * s["sn_convs"] and s["each_twice"], (combo, s)
        for combo, s in seen.items():
            where = f"rank {rank}, {combo}: {s}"
            if "refused" in s:  # a precision this machine's accelerator cannot run: refused by us as by DeepSpeed
                precision = combo.split("/")[0]
                assert precision != "fp32", where
                assert s["refused"]["ours"].startswith(f"train.precision={precision} is not supported on "), where
                assert "not supported on your device" in s["refused"]["deepspeed"], where
                continue
            assert s["zero_stage"] == int(combo[-1]), where
            # each engine its own dict, left as built: DeepSpeed < 0.19.1 popped torch_adam out of a
            # shared one and gave the D engine FusedAdam (a CUDA JIT build)
            assert s["basic_optimizers"] == ["torch.optim.adam.Adam"] * 2 and s["own_dicts"] and s["dicts_unchanged"], where
            assert s["wrappers"][0] == {"fp32/0": "Adam", "fp32/1": "DeepSpeedZeroOptimizer"}.get(
                combo, "FP16_UnfusedOptimizer" if combo.endswith("/0") else "DeepSpeedZeroOptimizer"), where
            assert s["first"] == [False, False] and s["moved"] == [True, True], where  # every combination trains
            assert s["stop"] == [False, True], where  # one rank's request stops every rank
            assert s["nan"] == [True, False] and s["nan_left_weights"], where  # one rank's NaN skips every rank
            # the step's flags: one all-reduce and one host read (was: a read, then an all-reduce
            # with a read of its own, and the preemption flag in another all-reduce after the step);
            # no host-to-device copy (counted too: HostCost)
            assert (s["our_syncs"], s["our_collectives"]) == (1, 1), where
        trained = {c for c, s in seen.items() if "refused" not in s}
        assert trained >= {"fp32/0", "fp32/1", "bf16/0", "bf16/1"}, seen  # every accelerator runs these


# A machine whose accelerator has no fp16 (a CPU without oneDNN fp16, such as AMD EPYC), on any machine
NO_FP16 = """
import sys
from deepspeed.accelerator import get_accelerator
type(get_accelerator()).is_fp16_supported = lambda self: False
from udean.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_precision_the_device_cannot_run_is_one_line_and_exit_2_before_any_work(tmp_path):
    out = tmp_path / "run"
    r = run_cmd([BIN / "python", "-c", NO_FP16, "train", "--config", "tiny", "train.precision=fp16",
                 f"train.out={out}", f"data.out={tmp_path / 'data'}"], timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("udean train: error: train.precision=fp16 is not supported on "
                                                     "this "), r.stderr
    assert "supports fp32, bf16" in errors[0] and errors[0].endswith("set train.precision=bf16"), errors[0]
    assert not out.exists()  # refused before train.out was claimed, data read or engines built


if __name__ == "__main__":
    worker(sys.argv[1])
