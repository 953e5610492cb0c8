"""DeepSpeed engines for UDEAN: one for the generators, one for the discriminators.

Paper, II-D: Adam (beta1 0.9, beta2 0.99, eps 1e-8), cosine decay of the learning rate from
1e-4 to 1e-8. Both engines get the same optimizer settings and the same schedule.

This module is the one home of the optimizer: `adam_params` maps the `train:` section to Adam's
arguments, for the DeepSpeed config dict (`deepspeed_config`, the one place that sets an
optimizer, a precision or a ZeRO stage for the engines; the DeepSpeedExamples GAN warning in
docs/architecture.md) and for the plain-PyTorch baselines (`adam`, `cosine_schedule`).
Engines always do the stepping: `engine.backward(loss)`, `engine.step()`.

Checkpoints are read with `torch.load(weights_only=True)`: DeepSpeed's own checkpoint engine
unpickles arbitrary objects, so each engine gets `WeightsOnlyCheckpointEngine` instead.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from udean.config import Config, TrainConfig

PRECISION_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def adam_params(train: TrainConfig) -> dict[str, Any]:
    """The paper's Adam (II-D) from the `train:` section: lr, betas, eps, no weight decay.
    foreach: a few multi-tensor ops per step instead of ~10 ops per parameter tensor, on every
    device (torch picks it by itself only on CUDA); the same numbers as the per-tensor loop."""
    return {"lr": train.lr, "betas": tuple(train.betas), "eps": train.eps, "weight_decay": 0.0, "foreach": True}


def adam(params, train: TrainConfig) -> torch.optim.Adam:
    """torch.optim.Adam with `adam_params` (the baselines' optimizer; the engines' is the same)."""
    return torch.optim.Adam(params, **adam_params(train))


def deepspeed_config(train: TrainConfig) -> dict[str, Any]:
    """Our `train:` section -> the DeepSpeed config dict of both engines (the one place)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "Adam",
            # torch_adam: torch.optim.Adam (no JIT-built fused kernel, runs on CPU and GPU);
            # adam_w_mode off: the paper's Adam, not AdamW
            "params": {**adam_params(train), "betas": list(train.betas), "torch_adam": True, "adam_w_mode": False},
        },
        "zero_optimization": {"stage": train.zero_stage},
        "gradient_clipping": train.grad_clip,  # 0.0: off
        "steps_per_print": 2**31 - 1,  # our logs report progress; DeepSpeed's would interleave
        "wall_clock_breakdown": False,
    }
    if train.zero_stage >= 1:
        # gradients reduced from where autograd put them: the contiguous buffer copied every
        # gradient tensor twice more (~6 ops each, every step; benchmarks/host_cost.py)
        ds["zero_optimization"]["contiguous_gradients"] = False
    if train.zero_stage >= 1 and not train.grad_clip:
        # the global gradient norm is read only to clip: without clipping it is ~4 ops per gradient
        # tensor every step and a host read (benchmarks/host_cost.py)
        ds["zero_optimization"]["compute_grad_norm"] = False
    if train.precision == "bf16":
        # no per-tensor overflow test (~12 ops per gradient tensor and a host read every step): bf16
        # has fp32's exponent range, so like fp32 it skips a step only on a non-finite loss (steps.py)
        ds["bf16"] = {"enabled": True, "check_grad_overflow": False}
    elif train.precision == "fp16":
        # dynamic loss scaling; DeepSpeed skips the step itself on an overflow
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return ds


def supported_precisions() -> tuple[str, ...]:
    """The `train.precision` values this machine's DeepSpeed accelerator can run, asked as
    `deepspeed.initialize` asks it (its sanity check): fp32 always; bf16 and fp16 where the
    accelerator says so. On a CPU, fp16 needs oneDNN fp16 kernels (AVX512-FP16 / AMX-FP16), which
    many CPUs lack (AMD EPYC among them); bf16 runs on every CPU (emulated where there is no
    AVX512-BF16)."""
    from hpc.dist import quiet_deepspeed

    quiet_deepspeed()
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return tuple(p for p, ok in (("fp32", True), ("bf16", acc.is_bf16_supported()), ("fp16", acc.is_fp16_supported()))
                 if ok)


def check_precision(precision: str) -> None:
    """ValueError naming `train.precision`, the device and what it supports, where DeepSpeed would
    refuse the precision at initialize (with a traceback from inside it, after the work before)."""
    ok = supported_precisions()
    if precision not in ok:
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        what = "this CPU (oneDNN has no fp16 kernels here)" if name == "cpu" and precision == "fp16" else \
            f"this {name} device"
        raise ValueError(f"train.precision={precision} is not supported on {what}: DeepSpeed's {name} accelerator "
                         f"supports {', '.join(ok)}; set train.precision={'bf16' if 'bf16' in ok else 'fp32'}")


def cosine_lr_factor(step: int, total_steps: int, lr: float, lr_min: float) -> float:
    """Multiplier of the base lr at optimizer step `step`: cosine from lr to lr_min over
    `total_steps`, then flat at lr_min (paper, II-D: 1e-4 -> 1e-8)."""
    t = min(step, total_steps) / max(total_steps, 1)
    return (lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * t))) / lr


def cosine_schedule(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`train.lr` -> `train.lr_min` over `total_steps` optimizer steps (`cosine_lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr_factor(s, total_steps, train.lr, train.lr_min))


def _weights_only_checkpoint_engine(ds_config: Any):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, but loading with weights_only=True."""

        def load(self, path: str, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine(ds_config)


def _allow_deepspeed_checkpoint_types() -> None:
    """DeepSpeed puts a few plain enums/containers in its checkpoints; allow exactly those."""
    from hpc.dist import quiet_deepspeed

    quiet_deepspeed()
    safe: list[Any] = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        safe += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address
        safe.append(fragment_address)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum
        safe.append(ZeroStageEnum)
    torch.serialization.add_safe_globals(safe)


@dataclass
class Engines:
    """The two DeepSpeed engines. `g.module` is the Generator, `d.module` the Discriminators."""

    g: Any  # deepspeed.DeepSpeedEngine
    d: Any
    dtype: torch.dtype  # the networks' weights (the engines' compute precision)
    refresh: Callable[[], None] | None = None  # `keep_fp32`'s, None when nothing needs it

    @property
    def generator(self) -> nn.Module:
        return self.g.module

    @property
    def discriminators(self) -> nn.Module:
        return self.d.module

    def lr(self) -> float:
        return float(self.g.get_lr()[0])

    def g_updated(self) -> None:
        """Collective: after G's parameters changed (a step, a checkpoint load), the float32
        masters the degradation reads (`keep_fp32`) follow."""
        if self.refresh is not None:
            self.refresh()

    def inference_weights(self) -> dict[str, torch.Tensor]:
        """Collective (every rank): `inference_state_dict` of the generator in float32 on the CPU,
        each parameter its optimizer's master copy: under bf16 / fp16 the module holds a rounded
        copy of it (best/, last/ and `udean export` write these)."""
        from udean.models.udean import inference_state_dict

        masters = fp32_masters(self.g)
        named = dict(self.generator.named_parameters())
        return {k: (masters(named[k]) if k in named else v).detach().float().cpu().clone()
                for k, v in inference_state_dict(self.generator).items()}


def build_engines(cfg: Config, generator: nn.Module, discriminators: nn.Module,
                  total_steps: int, device: torch.device, ds_args=None) -> Engines:
    """Wrap both networks in DeepSpeed engines with Adam and the cosine schedule.

    `ds_args`: `Dist.deepspeed_args()`, so DeepSpeed's own set_device picks our GPU (it
    otherwise uses LOCAL_RANK, wrong where each task sees one GPU)."""
    from hpc.dist import quiet_deepspeed

    quiet_deepspeed()
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # its per-step INFO lines would drown rank 0's progress
    check_precision(cfg.train.precision)
    _allow_deepspeed_checkpoint_types()
    ds = deepspeed_config(cfg.train)
    engines = []
    for module in (generator, discriminators):
        module.to(device)
        islands = [(p, p.detach().clone()) for m in module.modules() if getattr(m, "keep_fp32", False)
                   for p in m.parameters(recurse=False)]
        # one dict per engine: DeepSpeed keeps the dict it is given, and before 0.19.1 popped
        # `torch_adam` out of it, so a shared dict gave the second engine FusedAdam
        engine, *_ = deepspeed.initialize(
            args=ds_args, model=module, model_parameters=param_groups(module, cfg.train, module is discriminators),
            config=copy.deepcopy(ds), lr_scheduler=lambda opt: cosine_schedule(opt, cfg.train, total_steps),
            dist_init_required=False)
        engine.checkpoint_engine = _weights_only_checkpoint_engine(engine._config)
        if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
            # nothing to average on one rank: DeepSpeed still flattened, all-reduced and copied
            # back every gradient (~5 ops per tensor, every step). ZeRO >= 1 builds its gradient
            # partitions in that pass, so it keeps it.
            engine.enable_backward_allreduce = False
        if hasattr(engine.optimizer, "_update_model_bit16_weights"):  # ZeRO >= 1
            repoint_only_if_moved(engine.optimizer)
        _cast_buffers(engine.module, PRECISION_DTYPE[cfg.train.precision])
        engines.append((engine, keep_fp32(engine, islands) if cfg.train.precision != "fp32" else None))
    (g, refresh), (d, d_refresh) = engines
    assert d_refresh is None, "the discriminators have no float32 islands"
    if cfg.train.compile:  # each network's forward, where the step calls it (the losses call each D)
        for module in (generator, *discriminators.children()):
            module.compile()
    return Engines(g=g, d=d, dtype=PRECISION_DTYPE[cfg.train.precision], refresh=refresh)


def repoint_only_if_moved(opt) -> None:
    """DeepSpeed's ZeRO 1/2 optimizer (`DeepSpeedZeroOptimizer`) re-points every parameter at its
    slice of the flat bit16 buffer after every step (`_update_model_bit16_weights`, "just to be
    safe" in its source): a narrow, a view and two `.data` swaps per parameter tensor, ~1,170
    dispatched ops per G step at the paper's depth (benchmarks/host_cost.py), though the step
    wrote the new weights into that buffer in place and every parameter still points there. Here
    it re-points a group only where a parameter does not alias its slice (after a load or an
    offload that moved the buffer, or anything else): the check reads pointers and shapes, no
    tensor op. The outcome is DeepSpeed's in every case (tests/udean/test_engines.py)."""
    def moved(i: int) -> bool:
        flat = opt.bit16_groups_flat[i]
        base, size = flat.data_ptr(), flat.element_size()
        offsets, metas = opt.round_robin_bit16_offsets[i], opt.round_robin_bit16_meta[i]
        return any(p.device != flat.device or p.dtype != flat.dtype or p.shape != metas[j].shape
                   or not p.is_contiguous() or p.data_ptr() != base + offsets[j] * size
                   for p, j in zip(opt.bit16_groups[i], opt.round_robin_bit16_indices[i]))

    def update(i: int) -> None:
        if moved(i):
            type(opt)._update_model_bit16_weights(opt, i)

    opt._update_model_bit16_weights = update


def fp32_masters(engine) -> Callable[[nn.Parameter], torch.Tensor]:
    """parameter -> its float32 master copy in `engine`'s optimizer (the parameter itself in an
    fp32 engine). At ZeRO >= 1 each rank holds the masters of its partition only, and the call is
    collective (`deepspeed.utils.safe_get_full_fp32_param`: an all-reduce per parameter); at ZeRO
    0 a bf16 / fp16 optimizer (FP16_UnfusedOptimizer) holds one fp32 tensor per parameter."""
    opt = engine.optimizer
    by_id = ({id(p): m for lo, hi in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(lo, hi)}
             if hasattr(opt, "fp32_groups") else {})

    def master(p: nn.Parameter) -> torch.Tensor:
        if p.dtype == torch.float32:
            return p
        if id(p) in by_id:
            return by_id[id(p)]
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(p)
        assert value is not None, f"no float32 master for a {p.dtype} parameter in {type(opt).__name__}"
        return value
    return master


def keep_fp32(engine, islands: list[tuple[nn.Parameter, torch.Tensor]]) -> Callable[[], None] | None:
    """Float32 islands in a bf16 / fp16 engine: the parameters of modules marked `keep_fp32`
    (models/degradation.py) read as their optimizer's float32 masters (`p.master`, see
    `degradation.fp32`); `islands` pairs each with its value before DeepSpeed rounded it.

    DeepSpeed makes the masters from the rounded copies: they are set back to the values the
    model was built with. At ZeRO 0 `p.master` is the master itself, updated in place by the
    optimizer; at ZeRO >= 1 it is a view of one small float32 buffer that the returned function
    (collective, after every step and load: `Engines.g_updated`) fills from the ranks that own
    the pieces, in one all-reduce. Returns None when nothing needs refreshing."""
    if not islands:
        return None
    opt = engine.optimizer
    if hasattr(opt, "fp32_groups"):  # ZeRO 0
        master = fp32_masters(engine)
        for p, value in islands:
            p.master = master(p)
            p.master.data.copy_(value)
        return None
    import deepspeed.comm as ds_comm
    from deepspeed.utils import safe_set_full_fp32_param

    params = [p for p, _ in islands]
    flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
    starts = [sum(p.numel() for p in params[:i]) for i in range(len(params))]
    views = [flat.narrow(0, start, p.numel()) for start, p in zip(starts, params)]
    for (p, value), view in zip(islands, views):
        safe_set_full_fp32_param(p, value)  # this rank's piece
        p.master = view.view(p.shape)

    @torch.no_grad()
    def refresh() -> None:
        flat.zero_()
        for p, view in zip(params, views):
            if p._hp_mapping is not None:  # this rank owns a piece of p
                where = p._hp_mapping.lp_fragment_address
                view.narrow(0, where.start, where.numel).copy_(p._hp_mapping.get_hp_fragment())
        ds_comm.all_reduce(flat, group=params[0]._dp_group)

    refresh()
    return refresh


def param_groups(module: nn.Module, train: TrainConfig, discriminator: bool = False) -> list[dict]:
    """The optimizer's parameter groups of one engine: every trainable parameter at `train.lr`,
    except the discriminators' at `train.lr_discriminator` and the physics degradation's (the
    generator's `blur` and `noise` modules) at `train.lr_degradation`, where those are set. The
    cosine schedule scales every group's lr alike."""
    own = train.lr_discriminator if discriminator else train.lr_degradation
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    special = [p for n, p in params if discriminator or n.split(".", 1)[0] in DEGRADATION_PARTS]
    if own is None or not special:
        return [{"params": [p for _, p in params]}]
    ids = {id(p) for p in special}
    rest = [p for _, p in params if id(p) not in ids]
    return ([{"params": rest}] if rest else []) + [{"params": special, "lr": own}]


DEGRADATION_PARTS = ("blur", "noise")  # the Generator's physics degradation (models/degradation.py)


def _cast_buffers(module: nn.Module, dtype: torch.dtype) -> None:
    """Floating buffers to the engine's dtype. DeepSpeed's bf16 / fp16 casts the parameters only:
    spectral normalization's power-iteration vectors (`model.spectral_norm`) stayed float32
    against a bf16 weight, and the first step failed (addmv of mixed dtypes)."""
    for m in module.modules():
        for name, b in m.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != dtype:
                setattr(m, name, b.to(dtype))


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Freeze a module's parameters: the G step runs its loss through D, and D's engine must
    see no gradients (BasicSR's `requires_grad_(False)`; DeepSpeed refuses them otherwise)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)
