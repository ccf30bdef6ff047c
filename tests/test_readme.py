"""Every command block of the README works as written.

Each fenced ``bash`` or ``python`` block of README.md is preceded by a marker saying how it is
checked: ``<!-- checked: here -->`` (this file runs it, literally, in a scratch folder that sees
the repository's .venv, bundled data and scripts; ``<!-- checked: here (slow) -->`` for a block of
minutes, run only with ``FEDMITR_SLOW_TESTS=1``, so the suite stays short), or ``<!-- checked: PATH -->`` naming the test or
script that runs the same lines (this file checks that they are there), or
``<!-- not run: REASON -->`` (needs the Hub, a GPU, or hours). So a block cannot drift from what
is checked without this test noticing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"(?P<marker><!-- (?P<kind>checked|not run): (?P<how>[^>]*?) -->)?\n```(?P<lang>bash|python)\n"
                   r"(?P<body>.*?)\n```", re.S)


def blocks() -> list[dict]:
    found = []
    for m in BLOCK.finditer(README.read_text()):
        found.append({"lang": m["lang"], "body": m["body"], "kind": m["kind"], "how": (m["how"] or "").strip(),
                      "line": README.read_text()[:m.start("body")].count("\n") + 1})
    return found


def test_every_block_says_how_it_is_checked():
    unmarked = [f"line {b['line']}" for b in blocks() if b["kind"] is None]
    assert not unmarked, f"README blocks without a <!-- checked: ... --> or <!-- not run: ... --> marker: {unmarked}"
    assert "{{" not in README.read_text(), "a placeholder is left in the README"


def _commands(body: str) -> list[str]:
    """The command lines of a bash block (comments and blank lines dropped, continuations joined)."""
    text = body.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _key_words(command: str) -> list[str]:
    """What identifies a command: its program (without the folder) and its first two words that
    are neither numbers nor settings (``X=Y``, quoted run configs)."""
    words = [w for w in command.split() if "=" not in w and not w.replace(".", "").isdigit() and "'" not in w]
    words = [w.rsplit("/", 1)[-1] if i == 0 or w.endswith((".sh", ".py")) else w for i, w in enumerate(words)]
    return [w for w in words if w != "bash"][:3]


HERE = ("here", "here (slow)")


@pytest.mark.parametrize("block", [b for b in blocks() if b["kind"] == "checked" and b["how"] not in HERE],
                         ids=lambda b: f"line{b['line']}")
def test_blocks_checked_elsewhere_are_there(block):
    path = ROOT / block["how"].split("::")[0]
    assert path.is_file(), f"README line {block['line']} says it is checked by {block['how']}, which does not exist"
    text = path.read_text()
    for command in _commands(block["body"]) if block["lang"] == "bash" else []:
        missing = [w for w in _key_words(command) if w not in text]
        assert not missing, f"{block['how']} does not run {command!r}: no {missing} (README line {block['line']})"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder that looks like the repository to a reader's commands: its .venv, scripts, assets
    and code, and nothing else (runs/ and export/ land here, not in the repository)."""
    folder = tmp_path_factory.mktemp("readme")
    for name in (".venv", "scripts", "assets", "fedmitr", "app", "examples", "pyproject.toml", "requirements.txt"):
        (folder / name).symlink_to(ROOT / name)
    return folder


@pytest.mark.parametrize("block", [b for b in blocks() if b["kind"] == "checked" and b["how"] in HERE],
                         ids=lambda b: f"line{b['line']}")
def test_blocks_run_as_written(block, scratch):
    if block["how"] == "here (slow)" and os.environ.get("FEDMITR_SLOW_TESTS") != "1":
        pytest.skip(f"README line {block['line']} takes minutes: FEDMITR_SLOW_TESTS=1 runs it")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if block["lang"] == "bash":
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block["body"]], cwd=scratch, env=env,
                              capture_output=True, text=True, timeout=1200)
    else:
        done = subprocess.run([sys.executable, "-c", block["body"]], cwd=scratch, env=env, capture_output=True,
                              text=True, timeout=1200)
    assert done.returncode == 0, f"README line {block['line']} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    if block["lang"] == "python":  # what a reader reads: a few lines, not the event stream
        assert len(done.stdout.splitlines()) <= 20, f"README line {block['line']} prints {len(done.stdout.splitlines())} lines"


def test_what_the_readmes_commands_write_into_the_repository_is_ignored_by_git():
    """`fedmitr run --out runs/...` and `fedmitr export ... export/...` leave no untracked folder."""
    import shutil

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    text = (ROOT / "README.md").read_text()
    written = sorted(set(re.findall(r"(?:--out|export \S+) ((?:runs|export)/[\w./-]+)", text)))
    assert any(p.startswith("export/") for p in written) and any(p.startswith("runs/") for p in written)
    for path in written:
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert done.returncode == 0, f"{path} (written by a README command) is not ignored by git"


def test_the_readme_spells_out_what_a_newcomer_cannot_guess():
    text = (ROOT / "README.md").read_text()
    text = text.split("---", 2)[2] if text.startswith("---") else text  # after the Space's front matter
    first_kd = re.search(r"\bKD\b", text)
    assert first_kd and "knowledge distillation" in text[:first_kd.start() + 3], "KD is used before it is spelled out"
    assert "fractal" in text[:text.find("pretrained")] or "pretrained on drawn fractals" in text
    for phrase in ("sets up the setting", "What carries the class is where", "best single student", "before its speed levers"):
        assert phrase not in text, f"unclear phrase in the README: {phrase!r}"
