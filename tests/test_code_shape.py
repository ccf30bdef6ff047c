"""The shape of the code: calls read as what they pass.

No function, method or dataclass takes more than five positional parameters: the rest are
keyword-only (``*,`` or ``KW_ONLY``), so a call like ``invert(ensemble, labels, cfg, sparse=True,
...)`` says what each value is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("fedmitr/*.py"), *ROOT.glob("app/*.py"), *ROOT.glob("examples/flower/fedmitr_flower/*.py"),
                  *ROOT.glob("scripts/*.py")])
MAX_POSITIONAL = 5
# Gradio calls an event's handler with the values of its input components, positionally, one per
# component, unless the event takes a set of inputs and the handler one dict: every handler here does.
GRADIO_HANDLERS: dict[str, set[str]] = {}


def _positional(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    names = [a.arg for a in [*fn.args.posonlyargs, *fn.args.args]]
    return len([n for n in names if n not in ("self", "cls")])


def _dataclass_positional(node: ast.ClassDef) -> int | None:
    """Positional fields of a ``@dataclass`` class (None if it is not one or all are keyword-only)."""
    for deco in node.decorator_list:
        call = deco if isinstance(deco, ast.Call) else None
        target = call.func if call else deco
        if getattr(target, "id", getattr(target, "attr", None)) != "dataclass":
            continue
        if call and any(k.arg == "kw_only" and getattr(k.value, "value", False) for k in call.keywords):
            return None
        count = 0
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                annotation = ast.unparse(stmt.annotation)
                if annotation == "KW_ONLY":
                    break
                if not annotation.startswith("ClassVar"):
                    count += 1
        return count
    return None


def test_the_sources_were_found():
    assert len(SOURCES) > 30


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_more_than_five_positional_parameters(path):
    tree = ast.parse(path.read_text())
    handlers = GRADIO_HANDLERS.get(str(path.relative_to(ROOT)), set())
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _positional(node) > MAX_POSITIONAL \
                and node.name not in handlers:
            offenders.append(f"{node.name}() at line {node.lineno}: {_positional(node)} positional")
        if isinstance(node, ast.ClassDef) and (_dataclass_positional(node) or 0) > MAX_POSITIONAL:
            offenders.append(f"dataclass {node.name} at line {node.lineno}: {_dataclass_positional(node)} positional")
    assert not offenders, offenders


# --- no import circles -------------------------------------------------------------------------------

def _module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside a function (a lazy import is
    still an import); what sits under ``if TYPE_CHECKING:`` is left out (it never runs)."""
    paths = {_module_name(p, root): p for p in [*root.glob("fedmitr/**/*.py"), *root.glob("app/**/*.py")]}
    graph = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text())
        unchecked = {id(n) for node in ast.walk(tree)
                     if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in unchecked:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself again, with the way round."""
    cycles = []
    for start in sorted(graph):
        seen, stack = set(), [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    cycles.append(path + [start])
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return cycles


def test_no_module_of_the_package_or_the_app_imports_itself_round_a_circle():
    """The method registry imports the server loop, never the other way round; and likewise everywhere."""
    graph = import_graph()
    assert "fedmitr.server" in graph["fedmitr.methods"]  # Rounds.run hands over to the loop (a lazy import)
    assert import_cycles(graph) == []


def test_the_circle_check_finds_a_lazy_circle(tmp_path):
    (tmp_path / "fedmitr").mkdir()
    (tmp_path / "fedmitr" / "a.py").write_text("import fedmitr.b\n")
    (tmp_path / "fedmitr" / "b.py").write_text("def f():\n    from fedmitr.a import g\n")
    (tmp_path / "fedmitr" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fedmitr.a\n")
    cycles = import_cycles(import_graph(tmp_path))
    assert ["fedmitr.a", "fedmitr.b", "fedmitr.a"] in cycles and not any("fedmitr.c" in c for c in cycles)
