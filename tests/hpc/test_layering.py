"""`hpc` is the bottom layer (STYLE.md: hpc <- preprocessing <- udean): importing any of its
modules loads nothing from udean or preprocessing, and no source line names them as a module."""
import ast
import subprocess
import sys
from pathlib import Path

HPC = Path(__file__).resolve().parents[2] / "hpc"
UPPER = ("udean", "preprocessing")


def test_importing_hpc_loads_no_upper_layer():
    modules = sorted(f"hpc.{p.stem}" for p in HPC.glob("*.py") if p.stem != "__init__")
    code = (f"import sys, {', '.join(modules)}; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {UPPER!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"hpc loaded {out.stdout.strip()}"


def test_no_hpc_source_names_an_upper_module():
    found = []
    for path in HPC.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = ast.unparse(node.func)
                if func.endswith(("import_module", "__import__", "run_module", "find_spec")):
                    names = [str(node.args[0].value)]
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in UPPER]
    assert not found, found
