"""The app's handlers read as what they take: none has more than five positional parameters.

Gradio calls a handler with one positional value per input component, unless the event's inputs
are a set: then the handler gets one dict, component -> value. The Share and Try events, with
five inputs and more, take that dict.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_POSITIONAL = 5


@pytest.mark.parametrize("path", sorted(ROOT.glob("app/*.py")), ids=lambda p: p.name)
def test_no_app_function_takes_more_than_five_positional_parameters(path):
    offenders = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = [a.arg for a in [*node.args.posonlyargs, *node.args.args] if a.arg not in ("self", "cls")]
            if len(names) > MAX_POSITIONAL:
                offenders.append(f"{node.name}() at line {node.lineno}: {len(names)} positional")
    assert not offenders, offenders


def test_share_and_try_take_their_inputs_as_one_dict(monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from app.app import build_demo

    events = {fn.api_name: fn for fn in build_demo().fns.values() if fn.api_name in ("push", "try")}
    assert set(events) == {"push", "try"}
    for name, fn in events.items():
        assert fn.inputs_as_dict and len(fn.inputs) >= 5, name
