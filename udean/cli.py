"""`udean` command line: one subcommand per job; `udean CMD --help` answers for each, with
the defaults.

Each subcommand lives in the module that implements it, which exposes
`add_arguments(parser)` and `run(args) -> int`: a thin entry point over that module's typed
library function (`udean.train.train(cfg)`, `udean.evaluate.evaluate(cfg, checkpoint, ...)`,
`udean.infer.infer(...)`, `preprocessing.driver.preprocess(cfg.data)`; docs/architecture.md).
Modules are imported only when their command runs, so `udean --help` is instant. Commands
that take the config tree get `--config PATH` and trailing `key.sub=value` overrides;
`args.cfg` is the validated config.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help, takes the config tree)
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "cohort": ("preprocessing.cohort", "write a synthetic HCP-like T1w cohort, or preview a subject", False),
    "preprocess": ("preprocessing.driver", "NIfTI subjects -> HDF5 patch shards + manifest.json (MPI-parallel)", True),
    "shards": ("preprocessing.verify", "verify shards against the manifest, or regenerate missing/corrupt ones", False),
    "model-info": ("udean.model_info", "parameters and FLOPs per model component", True),
    "train": ("udean.train", "train UDEAN with DeepSpeed on preprocessed shards (resumes automatically)", True),
    "infer": ("udean.infer", "LR NIfTI -> x2 SR NIfTI by a blended sliding window (voxel size halved, same world position)", True),
    "export": ("udean.export", "an inference checkpoint (for infer / evaluate) from any training checkpoint", False),
    "evaluate": ("udean.evaluate", "SR vs HR on the test volumes: PSNR/SSIM tables (tricubic baseline first) and figures", True),
    "demo": ("udean.demo", "end to end on CPU in minutes: cohort -> MPI preprocess -> DeepSpeed train -> evaluate", True),
}

EPILOG = """config overrides: append key.sub=value after the options, e.g.
  udean train --config demo train.lr=3e-4 model.variant=3d
shipped configs: paper (every paper hyper-parameter), demo (CPU, minutes), tiny (tests)"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default (unless its help names it already,
    or there is none to show: None, an unset flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="udean",
        description="UDEAN-HPC: unsupervised degradation-adaptation 3D MRI super-resolution "
        "(preprocess HCP to HDF5 shards, train with DeepSpeed, infer, evaluate).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text, _) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return p


def _command_parser(name: str) -> argparse.ArgumentParser:
    module, help_text, uses_config = COMMANDS[name]
    p = argparse.ArgumentParser(
        prog=f"udean {name}", description=help_text,
        epilog=EPILOG if uses_config else None,
        formatter_class=HelpFormatter,
    )
    if uses_config:
        p.add_argument("--config", default=None,
                       help="YAML config (path, or a shipped name: paper, demo, tiny); none: the paper's values")
    importlib.import_module(module).add_arguments(p)
    if uses_config:
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _parser().parse_args(argv)  # prints help or the "invalid choice" error
        _parser().print_help()
        return 2
    name = argv[0]
    try:
        args = _command_parser(name).parse_args(argv[1:])
        if COMMANDS[name][2]:
            from udean.config import load

            args.cfg = load(args.config, args.overrides)
        return int(importlib.import_module(COMMANDS[name][0]).run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:  # user-facing errors: one clear line, no traceback
        if os.environ.get("UDEAN_DEBUG"):
            raise
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True).print(f"[bold red]udean {name}: error:[/] {escape(str(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
