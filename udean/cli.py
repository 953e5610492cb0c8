"""`udean` command line: one subcommand per job; `udean CMD --help` answers for each, with
the defaults.

Each subcommand lives in the module that implements it, which exposes
`add_arguments(parser)` and `run(args) -> int`: a thin entry point over that module's typed
library function (`udean.train.train(cfg)`, `udean.evaluate.evaluate(cfg, checkpoint, ...)`,
`udean.infer.infer(...)`, `preprocessing.driver.preprocess(cfg.data)`; docs/architecture.md).
Modules are imported only when their command runs, so `udean --help` is instant. Commands
that take the config tree get `--config PATH` and trailing `key.sub=value` overrides;
`args.cfg` is the validated config.

Errors: whatever the user can fix is one line on stderr (no traceback) and a documented exit
code (`EXIT_CODES`, shown by `udean --help` and in the README); `UDEAN_DEBUG=1` shows the
traceback instead. A checkpoint torch cannot load (a pickle with code in it, refused by
weights_only; a truncated or foreign file) and weights that do not fit the config's model
are user errors wherever they are raised: `_user_error` recognises them by the torch function
they came out of.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

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

# exit codes of every command (README "Command line")
EXIT_CODES = {
    0: "success",
    1: "the job ran but did not succeed: a subject failed (preprocess, regenerate), shards are bad (verify), "
       "out of memory, an internal error (traceback)",
    2: "user error, before any work: an option, config value or input; an output folder another job holds "
       "or that holds another config's data or run",
    3: "training stopped: too many non-finite losses in a row (train.max_nonfinite)",
    74: "output error: a write failed (disk full, I/O error); nothing half-written, finished work kept: free "
        "space and rerun to resume",
    75: "checkpoint written on SIGTERM/SIGUSR1: requeue the job, it resumes",
    130: "interrupted (Ctrl-C)",
}
EXIT_OUTPUT = 74
LOG_COLUMNS = 200  # the width of tables written to a log file or pipe

EPILOG = """config overrides: append key.sub=value after the options, e.g.
  udean train --config demo train.lr=3e-4 model.variant=3d
shipped configs: recommended (the default: the paper's sizes with the switches the shift
  benchmark keeps), paper (the paper as written, every hyper-parameter), demo (CPU, minutes),
  tiny (tests); README "Which config"
exit codes:
""" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())


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
        epilog=EPILOG if uses_config else EPILOG[EPILOG.index("exit codes:"):],
        formatter_class=HelpFormatter,
    )
    if uses_config:
        from udean.config import DEFAULT

        p.add_argument("--config", default=DEFAULT,
                       help="YAML config (path, or a shipped name: recommended, paper, demo, tiny); default: "
                            "%(default)s (paper: the paper as written)")
    importlib.import_module(module).add_arguments(p)
    if uses_config:
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def _first_lines(text: str, n: int = 2) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines()[:n] if line.strip())


def _user_error(exc: BaseException, args: argparse.Namespace | None) -> str | None:
    """The one-line message of an error the user can fix, or None (a bug: the traceback shows)."""
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return str(exc)
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        if code.co_name == "load" and code.co_filename.endswith(os.path.join("torch", "serialization.py")):
            from udean.checkpoint import unreadable_weights

            return unreadable_weights(frame.f_locals.get("f"), exc)
        if code.co_name == "load_state_dict" and code.co_filename.endswith(os.path.join("nn", "modules", "module.py")):
            where = f"{args.checkpoint}: " if getattr(args, "checkpoint", None) else ""
            return f"{where}the weights do not fit the model its config describes ({_first_lines(exc)[:400]})"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from hpc.threads import share_cores

    share_cores()  # before torch loads: OpenMP threads that wait sleep instead of spinning (hpc/threads.py)
    if not sys.stdout.isatty() and not sys.stderr.isatty():
        # a log file or pipe (batch jobs, CI): rich would cut every table at 80 columns
        os.environ.setdefault("COLUMNS", str(LOG_COLUMNS))
    if not argv or argv[0] not in COMMANDS:
        _parser().parse_args(argv)  # prints help or the "invalid choice" error
        _parser().print_help()
        return 2
    name = argv[0]
    args = None
    try:
        args = _command_parser(name).parse_args(argv[1:])
        if COMMANDS[name][2]:
            from udean.config import load

            args.cfg = load(args.config, args.overrides)
        return int(importlib.import_module(COMMANDS[name][0]).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # user-facing errors: one clear line, no traceback
        from hpc.atomic import OutputError

        if isinstance(exc, OutputError):
            message, code = f"output error: {exc} (nothing half-written is left; free space or fix the folder " \
                            "and rerun to resume)", EXIT_OUTPUT
        elif isinstance(exc, MemoryError):
            message, code = f"out of memory ({_first_lines(exc) or 'MemoryError'}): give the job more memory", 1
        else:
            message, code = _user_error(exc, args), 2
        if message is None or os.environ.get("UDEAN_DEBUG"):
            raise
        _say_error(name, message)
        return code


def _say_error(name: str, message: str) -> None:
    """`udean NAME: error: MESSAGE` as one line on stderr, however long (no wrapping)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]udean {name}: error:[/] {escape(message)}", highlight=False)


if __name__ == "__main__":
    raise SystemExit(main())
