"""A plain, non-editable `pip install .` into a fresh venv runs the suite from any folder: the
shipped configs travel as package data, and what runs is the installed copy, not the source.

Fast: the fresh venv gets this venv's third-party packages (torch, DeepSpeed, ...) through a
.pth path entry (read-only: a path entry does not run the .pth files there, so this venv's
editable install of the suite stays invisible), and only the suite itself is built and
installed, from a copy of its sources that is deleted before anything runs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_non_editable_install_in_a_fresh_venv_runs_from_another_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in ("setup.py", "README.md"):
        shutil.copy(REPO / f, src / f)
    for pkg in ("udean", "preprocessing", "hpc"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "third_party.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(src)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    shutil.rmtree(src)  # nothing may come from the sources now
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*cmd: str) -> str:
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        return p.stdout

    where = run(py, "-c", "import udean, udean.config as c; print(udean.__file__); print(c.resolve_path('demo'))")
    module, demo_yaml = where.split()
    assert Path(module).is_relative_to(site) and Path(demo_yaml).is_relative_to(site) and Path(demo_yaml).is_file()
    udean = venv / "bin" / "udean"
    demo = run(udean, "demo", "--help")
    assert "--quick" in demo and "default: demo" in demo  # --help shows the defaults
    info = run(udean, "model-info", "--config", "demo")
    assert "thin_slab" in info and "3d" in info and "FLOP" in info
    assert "train.out" in run(udean, "train", "--config", "demo", "--help")
