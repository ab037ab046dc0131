"""The layering of v4 / backends / parity, read from the source with `ast` (nothing is imported),
and the op contract `v4.ops.Ops` against the backends that implement it.

Rules:
- no cycle among the modules of these packages through module-level imports (the ones that run
  when a module is imported: not those inside functions, not `if TYPE_CHECKING:` blocks);
- the core `v4/` never imports a backend: not `backends` at module level, and inside a function
  only the registry `backends` itself (never `backends.reference`, `backends.cuda`, ...);
- `parity/cli.py` does not import `v4.cli` (the core CLI imports parity's parser, not the reverse).
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("v4", "backends", "parity")


@dataclass(frozen=True)
class Edge:
    src: str  # importing module
    dst: str  # imported module (of these packages)
    line: int
    module_level: bool
    path: str  # file of src, relative to the repo

    def __str__(self):
        where = "module level" if self.module_level else "inside a function"
        return f"{self.path}:{self.line} {self.src} -> {self.dst} ({where})"


def _modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of PACKAGES under root."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module):
    """(node, module_level) for every import statement that can run."""
    out = []

    def walk(node, module_level):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, module_level))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:  # the body never runs
                    walk(ast.Module(body=[sub], type_ignores=[]), module_level)
            else:
                inner = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                walk(child, inner)

    walk(tree, True)
    return out


def _known(name: str, mods: dict) -> str | None:
    """The longest prefix of `name` that is one of our modules (None: an outside module)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in mods:
            return cand
    return None


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def import_edges(root: Path = REPO) -> list[Edge]:
    """Every import edge among our modules. Importing `a.b.c` also runs `a` and `a.b`: those
    edges are added too, except to the importer's own enclosing packages (already running)."""
    mods = _modules(root)
    edges = []
    for src, path in mods.items():
        is_pkg = path.name == "__init__.py"
        rel = str(path.relative_to(root))
        tree = ast.parse(path.read_text(), filename=rel)
        own = set(_ancestors(src)) | {src}
        for node, module_level in _import_nodes(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base_parts = src.split(".") if is_pkg else src.split(".")[:-1]
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module
                # `from pkg import name` imports the submodule pkg.name when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                dst = _known(t, mods)
                if dst is None:
                    continue
                for d in [a for a in _ancestors(dst) if a not in own] + [dst]:
                    if d != src:
                        edges.append(Edge(src, d, node.lineno, module_level, rel))
    return list(dict.fromkeys(edges))  # one edge per statement, however many names it imports


def find_cycle(edges: list[Edge]) -> list[Edge] | None:
    """One cycle of module-level edges, as the edges that close it, or None."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        if e.module_level:
            graph.setdefault(e.src, []).append(e)
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    stack: list[Edge] = []

    def dfs(node):
        state[node] = 1
        for e in graph.get(node, []):
            if state.get(e.dst) == 1:
                start = next(i for i, s in enumerate(stack) if s.src == e.dst) if e.dst != node else len(stack)
                return stack[start:] + [e]
            if e.dst not in state:
                stack.append(e)
                found = dfs(e.dst)
                if found:
                    return found
                stack.pop()
        state[node] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


def core_reaches_backend(edges: list[Edge]) -> list[Edge]:
    """Imports from v4 that break the rule: `backends` at module level, a backend package anywhere."""
    bad = []
    for e in edges:
        if e.src != "v4" and not e.src.startswith("v4."):
            continue
        if e.dst == "backends" and e.module_level:
            bad.append(e)
        elif e.dst.startswith("backends."):
            bad.append(e)
    return bad


@pytest.fixture(scope="module")
def edges():
    return import_edges()


def test_the_graph_sees_the_imports_it_should(edges):
    """A sanity check of the parser itself: known edges of each kind are found."""
    found = {(e.src, e.dst, e.module_level) for e in edges}
    assert ("backends", "v4.errors", True) in found  # absolute `from v4.errors import ...`
    assert ("backends.cuda", "backends", True) in found  # relative `from .. import installed`
    assert ("backends.cuda.ops", "backends.cuda.kernels.attention", True) in found  # `from .kernels import attention`
    assert ("backends.reference.ops", "v4.ops", True) in found
    assert ("backends.reference", "backends", False) in found  # inside probe()
    assert ("backends.reference", "backends.reference.ops", False) in found  # `from .ops import` inside make_ops()


def test_no_module_level_import_cycle(edges):
    cycle = find_cycle(edges)
    assert cycle is None, "module-level import cycle:\n  " + "\n  ".join(map(str, cycle))


def test_core_reaches_backends_only_through_the_registry_inside_functions(edges):
    bad = core_reaches_backend(edges)
    assert not bad, (
        "v4 imports a backend (the contract is v4.ops; the registry is `backends`, inside a function):\n  "
        + "\n  ".join(map(str, bad))
    )


def test_parity_cli_does_not_import_the_core_cli(edges):
    bad = [e for e in edges if e.src == "parity.cli" and e.dst == "v4.cli"]
    assert not bad, "\n".join(map(str, bad))


def test_the_rules_catch_violations(tmp_path):
    """The same checks on a copy of the tree with deliberate violations, so they cannot pass vacuously."""
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            dst = tmp_path / path.relative_to(REPO)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(path.read_text())
    ops = tmp_path / "v4" / "ops.py"
    ops.write_text("from backends.reference import ops as _ref\n" + ops.read_text())  # core -> backend, and a cycle
    quant = tmp_path / "v4" / "quant.py"
    quant.write_text(quant.read_text() + "\n\ndef _f():\n    from backends.cuda.kernels import gemm\n")
    cli = tmp_path / "parity" / "cli.py"
    cli.write_text(cli.read_text() + "\n\ndef _g():\n    import v4.cli\n")
    edges = import_edges(tmp_path)
    cycle = find_cycle(edges)
    assert cycle is not None and "v4.ops" in {e.src for e in cycle}  # v4.ops -> backends -> v4.ops
    bad = {(e.src, e.dst, e.module_level) for e in core_reaches_backend(edges)}
    assert ("v4.ops", "backends.reference", True) in bad
    assert ("v4.quant", "backends.cuda.kernels.gemm", False) in bad
    assert ("v4.quant", "backends", False) not in bad  # the registry inside a function is allowed
    assert any(e.src == "parity.cli" and e.dst == "v4.cli" for e in edges)


# ---------------------------------------------------------------------------------------- op contract
def _contract():
    from v4.ops import Ops

    return {n: getattr(Ops, n) for n in vars(Ops) if not n.startswith("_") and callable(getattr(Ops, n))}


def test_the_protocol_lists_the_op_set_and_the_weight_hooks():
    import backends
    from v4.ops import OP_NAMES

    assert backends.OP_NAMES is OP_NAMES
    assert set(_contract()) == set(OP_NAMES) | set(backends.WEIGHT_HOOKS)


def _params(fn):
    ps = list(inspect.signature(fn).parameters.values())
    return ps[1:] if ps and ps[0].name == "self" else ps


def _implementation(name: str, monkeypatch):
    if name == "reference":
        from backends.reference.ops import ReferenceOps

        return ReferenceOps
    if name == "ascend":
        from backends.ascend.ops import AscendOps  # imports neither torch_npu nor triton

        return AscendOps
    pytest.importorskip("triton")
    import torch

    if not torch.cuda.is_available():  # the kernels are decorated at import: as the CUDA tests do
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from backends.cuda.ops import CudaOps

    return CudaOps


@pytest.mark.parametrize("backend", ["reference", "cuda", "ascend"])
def test_backends_take_the_contract_signatures(backend, monkeypatch):
    """Each op and hook takes the contract's parameters, in its order, with its defaults; anything
    an implementation adds must have a default (the model never passes it)."""
    cls = _implementation(backend, monkeypatch)
    for op, proto in _contract().items():
        want, have = _params(proto), _params(getattr(cls, op))
        positional = [p for p in have if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert [p.name for p in positional[:len(want)]] == [p.name for p in want], f"{cls.__name__}.{op}"
        for w, h in zip(want, positional):
            assert w.default == h.default, (
                f"{cls.__name__}.{op}({w.name}): default {h.default!r}, contract {w.default!r}"
            )
        extra = [p for p in have if p.name not in {w.name for w in want}]
        assert all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in extra), \
            f"{cls.__name__}.{op}: parameters beyond the contract need defaults: {[p.name for p in extra]}"
    assert cls.name == backend


def test_the_core_never_imports_the_serve_extra():
    """fastapi, uvicorn, prometheus_client and jinja2 are the `serve` extra: only `dsv4 serve`
    (and a Jinja chat template) may load them. Checked in a fresh interpreter, after building the CLI."""
    import subprocess
    import sys

    code = (
        "import sys, v4, v4.engine, v4.chat, v4.cli, v4.runtime, parity; v4.cli.build_parser(); "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'jinja2', 'starlette') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
