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


def test_the_gallery_text_and_the_teachers_note_agree_with_the_default_fill():
    """The default fills stopped patches with the background: nothing may say they keep their noise,
    nor that the images look like real ones (they do not, to a person)."""
    from pathlib import Path

    from app.layout import TEXT
    from fedmitr.config import preset_config

    assert preset_config("cpu").inversion.stopped_fill == "background"
    note = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text().split("### A note for teachers")[1]
    note = note.split("\n## ")[0]
    assert "kept the noise" not in note and "background" in note
    assert "look like real ones" not in TEXT["gallery"] and "background" in TEXT["gallery"]
