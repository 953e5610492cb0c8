"""slurm/*.sh without a cluster: they parse, keep the headers the docs promise, and the
scaling submitter refuses bad input before it submits anything."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["train_udean.sh", "preprocess_hcp.sh", "regenerate_shards.sh", "scaling_benchmark.sh"]


@pytest.mark.parametrize("name", [*SCRIPTS, "common.sh"])
def test_bash_parses(name):
    out = subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_headers_and_no_site_paths(name):
    text = (REPO / "slurm" / name).read_text()
    headers = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    assert any(h.startswith("--time=") for h in headers) and any(h.startswith("--output=") for h in headers)
    assert "slurm/common.sh" in text
    assert not re.search(r"^#SBATCH --(partition|account)", text, flags=re.M), "site settings belong on the command line"
    assert "/work/" not in text and "/home/" not in text


def test_train_script_requeues_on_signal():
    text = (REPO / "slurm" / "train_udean.sh").read_text()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
    # no GPU asked for unless the user asks (CPU-only partitions refuse a gres request); the GPU
    # line it documents starts one task per GPU
    assert not re.search(r"^#SBATCH --(gpus|gres|gpus-per-node|gpus-per-task)\b", text, flags=re.M)
    assert re.search(r"--ntasks-per-node=(\d+) --gpus-per-node=\1 ", text), "one task per GPU"


def test_scaling_submitter_validates_before_submitting():
    run = lambda *a, **env: subprocess.run(["bash", str(REPO / "slurm" / "scaling_benchmark.sh"), *a],
                                           capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env})
    assert run().returncode == 2
    assert "UDEAN_DATA" in run("1", "2").stderr
    assert run("x", UDEAN_DATA="/d").returncode == 2


@pytest.mark.parametrize("args, message", [(["--gpu", "--cpu"], "choose one"), (["--bogus"], "unknown option")])
def test_install_rejects_bad_options_before_any_work(args, message, tmp_path):
    out = subprocess.run(["bash", str(REPO / "install.sh"), *args], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "UDEAN_VENV": str(tmp_path / "venv")}, timeout=30)
    assert out.returncode == 2 and message in out.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize("script, env, want", [
    ("train_udean.sh", {}, "udean train --config recommended train.lr=-1"),
    # quoted by the user, expanded by udean on each node, not by the batch script
    ("train_udean.sh", {"UDEAN_STAGE_DIR": "$SLURM_TMPDIR/x"},
     "udean train --config recommended train.stage_dir=$SLURM_TMPDIR/x train.lr=-1"),
    ("preprocess_hcp.sh", {}, "udean preprocess --config recommended --no-progress train.lr=-1"),
    ("preprocess_hcp.sh", {"UDEAN_CONFIG": "paper"}, "udean preprocess --config paper --no-progress train.lr=-1"),
])
def test_scripts_run_udean_with_the_recommended_config_by_default(script, env, want):
    # the script itself, outside SLURM (one task, mpirun): it starts udean with the config, which
    # refuses the bad override before any work
    import os
    import sys

    venv = Path(sys.executable).parent.parent
    r = subprocess.run(["bash", str(REPO / "slurm" / script), "train.lr=-1"], capture_output=True, text=True,
                       cwd=REPO, timeout=120, env={**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
                                                   "UDEAN_VENV": str(venv), "UDEAN_MPI_LAUNCH": "mpirun", **env})
    assert want in r.stderr, r.stderr[-2000:]
    assert r.returncode == 2 and "config key 'train.lr'" in r.stderr, r.stderr[-2000:]
