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
