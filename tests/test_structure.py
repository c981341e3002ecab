"""The package's structure: small modules, no import cycle, layers that point down only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "leetdecoding"
MAX_LINES = 400
DEVELOPER_TOOLS = ("leetdecoding.bench", "leetdecoding.cli", "leetdecoding.__main__")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_module_is_over_400_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert not {n: lines for n, lines in long.items() if lines > MAX_LINES}


def test_no_import_cycle():
    known = modules()
    graph = {n: imports(n, p, known) for n, p in known.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            n = todo.pop()
            if n == goal:
                return True
            if n not in seen:
                seen.add(n)
                todo.extend(graph[n])
        return False

    # importing a submodule runs its packages' __init__ first; that is Python's order, not a cycle of ours
    cycles = [(a, b) for a in graph for b in graph[a] if reaches(b, a) and not a.startswith(b + ".")]
    assert not cycles


def test_the_runtime_never_imports_the_developer_tools():
    known = modules()
    runtime = {n: p for n, p in known.items() if not n.startswith(DEVELOPER_TOOLS)}
    wrong = {n: sorted(t for t in imports(n, p, known) if t.startswith(DEVELOPER_TOOLS)) for n, p in runtime.items()}
    assert not {n: t for n, t in wrong.items() if t}


def test_a_call_loads_neither_the_reference_nor_the_developer_tools():
    code = (
        "import sys, torch, leetdecoding as ld\n"
        "q = torch.randn(1, 2, 300, 8)\n"
        "o, s = ld.attention(q, q, q, decay=0.9, output_final_state=True)\n"
        "ld.decode_step(q[:, :, 0], q[:, :, 0], q[:, :, 0], s, decay=0.9)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('leetdecoding.bench', 'leetdecoding.methods.naive'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
