"""The tree passes ruff at the line length pyproject.toml sets (issue 16): pyflakes' findings
(unused names, undefined names) and pycodestyle's errors, tests included."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_tree_passes_ruff():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


MAX_HOST_FUNCTION_LINES = 60


def _oversized_host_functions(path: Path) -> list[str]:
    """'file:line name (N lines)' for each function in path longer than the budget; kernels (a decorator naming
    jit) are exempt, their bodies being one compiled unit that reads best whole."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if any("jit" in ast.unparse(decorator) for decorator in node.decorator_list):
            continue
        length = node.end_lineno - node.lineno + 1  # from the def line to the last line, docstring included
        if length > MAX_HOST_FUNCTION_LINES:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_host_function_outgrows_a_screen():
    tracked = subprocess.run(["git", "ls-files", "*.py"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                             check=True).stdout.splitlines()
    oversized = [entry for name in tracked if (ROOT / name).is_file()
                 for entry in _oversized_host_functions(ROOT / name)]
    assert not oversized, f"host functions over {MAX_HOST_FUNCTION_LINES} lines:\n" + "\n".join(oversized)
