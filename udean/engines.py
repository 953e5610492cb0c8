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
from typing import Any, Iterator

import torch
from torch import nn

from udean.config import Config, TrainConfig

PRECISION_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def adam_params(train: TrainConfig) -> dict[str, Any]:
    """The paper's Adam (II-D) from the `train:` section: lr, betas, eps, no weight decay."""
    return {"lr": train.lr, "betas": tuple(train.betas), "eps": train.eps, "weight_decay": 0.0}


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
    if train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
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
    dtype: torch.dtype  # what inputs are cast to (the engines' compute precision)

    @property
    def generator(self) -> nn.Module:
        return self.g.module

    @property
    def discriminators(self) -> nn.Module:
        return self.d.module

    def lr(self) -> float:
        return float(self.g.get_lr()[0])


def build_engines(cfg: Config, generator: nn.Module, discriminators: nn.Module,
                  total_steps: int, device: torch.device, ds_args=None) -> Engines:
    """Wrap both networks in DeepSpeed engines with Adam and the cosine schedule.

    `ds_args`: `Dist.deepspeed_args()`, so DeepSpeed's own set_device picks our GPU (it
    otherwise uses LOCAL_RANK, wrong where each task sees one GPU)."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # its per-step INFO lines would drown rank 0's progress
    check_precision(cfg.train.precision)
    _allow_deepspeed_checkpoint_types()
    ds = deepspeed_config(cfg.train)
    engines = []
    for module in (generator, discriminators):
        module.to(device)
        # one dict per engine: DeepSpeed keeps the dict it is given, and before 0.19.1 popped
        # `torch_adam` out of it, so a shared dict gave the second engine FusedAdam
        engine, *_ = deepspeed.initialize(
            args=ds_args, model=module, model_parameters=param_groups(module, cfg.train, module is discriminators),
            config=copy.deepcopy(ds), lr_scheduler=lambda opt: cosine_schedule(opt, cfg.train, total_steps),
            dist_init_required=False)
        engine.checkpoint_engine = _weights_only_checkpoint_engine(engine._config)
        _cast_buffers(engine.module, PRECISION_DTYPE[cfg.train.precision])
        engines.append(engine)
    return Engines(g=engines[0], d=engines[1], dtype=PRECISION_DTYPE[cfg.train.precision])


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
