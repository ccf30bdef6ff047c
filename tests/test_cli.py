"""The ``fedmitr`` command line, called in-process (and once as the installed script)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedmitr.cli import main
from fedmitr.config import preset_config

TINY = preset_config("tiny")

RUN_FLAGS = ["--dataset", "--clients", "--alpha", "--seed", "--preset", "--methods", "--out", "--config", "--epochs",
             "--iterations", "--images", "--keep", "--relabel", "--rounds"]


def fedmitr(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in this process; return (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_run_help_documents_every_flag(capsys):
    code, out, err = fedmitr(["run", "--help"], capsys)
    assert code == 0 and err == ""
    out = " ".join(out.split())  # argparse wraps lines wherever it likes
    for flag in RUN_FLAGS:
        assert flag in out
    # ... with what each one allows.
    for allowed in ("mnist5k", "cifar10", "iid", "tiny, cpu, cpu-49, gpu", "fedavg, ensemble", ">= 2", "YAML",
                    "neighbourhood"):
        assert allowed in out


def test_installed_script_prints_help():
    script = Path(sys.executable).with_name("fedmitr")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([str(script), "run", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fedmitr run")
    for flag in RUN_FLAGS:
        assert flag in proc.stdout


def _table_rows(stdout: str) -> dict[str, float]:
    """``name | accuracy | seconds`` rows of the results table -> {name: accuracy as a fraction}.
    The table shows percentages, as the app and the README do: "75.9%"."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 3 and cells[0] != "method":
            assert cells[1].endswith("%"), line
            rows[cells[0].split(" (n=")[0]] = float(cells[1][:-1]) / 100
    return rows


def test_tiny_run_writes_metrics_and_prints_a_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "run"
    code, out, err = fedmitr(["run", "--preset", "tiny", "--out", str(out_dir)], capsys)
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    lines = out.splitlines()
    assert lines[0].split() == ["method", "|", "accuracy", "|", "seconds"]
    assert set(lines[1]) <= {"-", "+"}
    rows = _table_rows(out)
    expected = {f"client {c['index'] + 1}": c["accuracy"] for c in metrics["clients"]}
    expected.update({name: m["accuracy"] for name, m in metrics["methods"].items()})
    assert rows == pytest.approx(expected, abs=5e-4)  # one decimal of a percent; metrics.json keeps fractions
    assert all(0 <= c["accuracy"] <= 1 for c in metrics["clients"])
    assert list(rows)[-2:] == ["fedavg", "ensemble"]
    assert lines[-1] == f"wrote {out_dir / 'metrics.json'}"
    # Progress goes to stderr, so stdout is only the table.
    assert "[clients]" in err and "[clients]" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing under ./runs


def test_flags_override_the_config_file_which_overrides_the_preset(tmp_path, capsys):
    config = tmp_path / "over.yaml"
    config.write_text("seed: 5\ndata:\n  num_clients: 4\nclients:\n  epochs: 1\n")
    out_dir = tmp_path / "run"
    code, out, err = fedmitr(["run", "--preset", "tiny", "--config", str(config), "--clients", "3",
                              "--alpha", "iid", "--methods", "ensemble", "--out", str(out_dir), "--quiet"], capsys)
    assert code == 0, err
    assert err == ""  # --quiet
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["preset"] == "tiny"
    assert (saved["seed"], saved["data"]["num_clients"], saved["clients"]["epochs"]) == (5, 3, 1)
    assert saved["data"]["alpha"] is None and saved["methods"] == ["ensemble"]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["partition"]["alpha"] is None
    assert list(_table_rows(out)) == ["client 1", "client 2", "client 3", "ensemble"]


def _inputs(tmp: Path) -> dict[str, str]:
    """Files that bad-input cases point at, made before the 'nothing was created' snapshot."""
    tmp.mkdir()
    (tmp / "bad.yaml").write_text("data: [unclosed\n")
    (tmp / "unknown.yaml").write_text("data:\n  bogus: 1\n")
    (tmp / "wrong_type.yaml").write_text("clients:\n  epochs: ten\n")
    (tmp / "a_file").write_text("not a directory")
    return {
        "BAD_YAML": str(tmp / "bad.yaml"),
        "UNKNOWN_FIELD": str(tmp / "unknown.yaml"),
        "WRONG_TYPE": str(tmp / "wrong_type.yaml"),
        "FILE": str(tmp / "a_file"),
        "UNDER_FILE": str(tmp / "a_file" / "run"),
    }


BAD_INPUTS = {
    # case: (extra argv, phrases the error must contain)
    "clients 1": (["--clients", "1"], ["clients must be a whole number >= 2", "got 1"]),
    "clients 100000": (["--clients", "100000"], ["100000 clients", "use at most"]),
    "clients abc": (["--clients", "abc"], ["clients must be a number", "'abc'"]),
    "clients 2.5": (["--clients", "2.5"], ["clients must be a whole number", "(got 2.5)"]),
    "alpha -1": (["--alpha", "-1"], ["alpha must be a number > 0", "'iid'"]),
    "alpha abc": (["--alpha", "abc"], ["alpha must be a number > 0", "'iid'", "'abc'"]),
    "alpha 0": (["--alpha", "0"], ["alpha must be a number > 0", "'iid'"]),
    "dataset nope": (["--dataset", "nope"], ["'nope'", "mnist5k", "digits"]),
    "dataset offline": (["--dataset", "cifar10"], ["'cifar10' comes from the Hugging Face Hub", "HF_HUB_OFFLINE",
                                                   "bundled dataset: mnist5k, mnist-canvas, digits"]),
    "impossible split": (["--clients", "20", "--alpha", "0.001"], ["could not give each of 20 clients",
                                                                    "fewer clients, a larger alpha"]),
    "methods bogus": (["--methods", "fedavg,bogus"], ["bogus", "known: fedavg, ensemble"]),
    "preset nope": (["--preset", "nope"], ["'nope'", "tiny, cpu, cpu-49, gpu"]),
    "seed abc": (["--seed", "abc"], ["seed must be a number"]),
    "seed -1": (["--seed", "-1"], ["seed must be a whole number >= 0"]),
    "epochs 0": (["--epochs", "0"], ["epochs must be a whole number >= 1"]),
    "keep 2": (["--keep", "2"], ["--keep must be in (0, 1] (got 2.0)"]),
    "relabel nope": (["--relabel", "nope"], ["--relabel must be one of", "neighbourhood"]),
    "unknown flag": (["--bogus", "1"], ["--bogus", "--help"]),
    "config missing": (["--config", "/nonexistent.yaml"], ["cannot read config file", "/nonexistent.yaml"]),
    "config invalid yaml": (["--config", "BAD_YAML"], ["bad.yaml", "not valid YAML"]),
    "config unknown field": (["--config", "UNKNOWN_FIELD"], ["'data.bogus'", "allowed here", "num_clients"]),
    "config wrong type": (["--config", "WRONG_TYPE"], ["epochs"]),
    "out is a file": (["--out", "FILE"], ["a_file", "not a directory"]),
    "out under a file": (["--out", "UNDER_FILE"], ["a_file", "not writable"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # so a default ./runs/... directory would be noticed
    paths = _inputs(tmp_path / "inputs")
    extra, phrases = BAD_INPUTS[case]
    extra = [paths.get(a, a) for a in extra]
    before = sorted(tmp_path.rglob("*"))

    code, out, err = fedmitr(["run", "--preset", "tiny", "--out", str(tmp_path / "out"), *extra], capsys)

    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedmitr: error: ")
    for phrase in phrases:
        assert phrase in lines[0]
    assert sorted(tmp_path.rglob("*")) == before


FLAG_ERRORS = [
    (["--keep", "1.5"], "--keep must be in (0, 1] (got 1.5)"),
    (["--keep", "0"], "--keep must be in (0, 1] (got 0.0)"),
    (["--relabel", "nope"], "--relabel must be one of token, image, neighbourhood (got 'nope')"),
    (["--init", "nope"], "--init must be 'scratch', 'fractal' or the path of a .safetensors backbone"),
    (["--alpha", "1e308"], "--alpha must be <= 10000"),
    (["--alpha", "abc"], "--alpha must be a number > 0 or 'iid' (got 'abc')"),
    (["--clients", "2.5"], "--clients must be a whole number >= 2 (got 2.5)"),
    (["--seed", "-1"], "--seed must be a whole number >= 0 (got -1)"),
    (["--iterations", "0"], "--iterations must be a whole number >= 1 (got 0)"),
    (["--images", "x"], "--images must be a number (got 'x')"),
    (["--rounds", "0"], "--rounds must be a whole number >= 1 (got 0)"),
]


@pytest.mark.parametrize("argv, message", FLAG_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_refused_flag_is_named_as_it_was_typed(argv, message, tmp_path, capsys):
    """The error names the flag the user typed, never the config field behind it (keep_per_stop)."""
    from fedmitr.knobs import KNOBS

    code, out, err = fedmitr(["run", "--preset", "tiny", "--out", str(tmp_path / "out"), *argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"fedmitr: error: {message}"), err
    knob = KNOBS[argv[0][2:]]
    assert not any(words in err for words in knob.field_words() if words != knob.name), err


def test_a_refused_value_of_the_config_file_keeps_the_field_name_the_file_uses(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("inversion:\n  keep_per_stop: 1.5\n")
    code, _, err = fedmitr(["run", "--preset", "tiny", "--config", str(config), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "keep_per_stop must be in (0, 1] (got 1.5)" in err and "--keep" not in err
    # The flag overrides the file, so a good --keep makes the run valid again.
    from fedmitr.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--preset", "tiny", "--config", str(config), "--keep", "0.5"])
    assert config_from_args(args).inversion.keep_per_stop == 0.5


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_out_under_a_read_only_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = fedmitr(["run", "--preset", "tiny", "--out", str(locked / "run")], capsys)
    finally:
        locked.chmod(0o755)
    assert code == 2
    assert err.startswith("fedmitr: error: ") and "not writable" in err and len(err.splitlines()) == 1
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("method", ["fedmitr", "dense-kd"])
def test_cli_tiny_inversion_method_writes_a_curve(tmp_path, method, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--methods", f"fedavg,{method}", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics["methods"][method]
    assert len(m["curve"]) == TINY.distill.rounds and all(0 <= a <= 1 for a in m["curve"])
    assert m["accuracy"] == m["curve"][-1] and m["seconds"] > 0
    assert m["synthetic_images"] == TINY.distill.rounds * TINY.inversion.images_per_round
    assert (out / "models" / f"{method}.safetensors").exists()
    assert method in capsys.readouterr().out



def test_python_m_fedmitr_is_the_same_command_line():
    out = subprocess.run([sys.executable, "-m", "fedmitr", "run", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--alpha" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fedmitr", "run", "--alpha", "-1", "--out", "/nonexistent/x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("fedmitr: error: --alpha must be")


def test_progress_in_a_log_file_is_plain_lines(tmp_path):
    """Not a terminal: no progress bar and no carriage returns, only whole lines in order."""
    import io

    from fedmitr.cli import ProgressPrinter
    from fedmitr.pipeline import run

    log = io.StringIO()
    cfg = TINY.__class__(**{**TINY.__dict__, "methods": ("fedavg", "fedmitr")})
    run(cfg, out_dir=tmp_path / "run", on_event=ProgressPrinter(stream=log))
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("[data] started") and any(line.startswith("[fedmitr] done in") for line in lines)
    assert lines[-1].startswith("[privacy] done in")  # the privacy check of the synthetic images comes last
    accuracies = [line for line in lines if ": accuracy = " in line]
    assert accuracies and all(re.fullmatch(r"  .+: accuracy = \d{1,3}\.\d%", line) for line in accuracies), accuracies
    # A progress line every 10% of a stage at most: a handful per stage, not one per step.
    fedmitr_steps = [line for line in lines if line.startswith("  fedmitr ") and "/" in line.split()[1]]
    assert 1 <= len(fedmitr_steps) <= 11


def test_the_out_dir_is_checked_once(tmp_path, monkeypatch, capsys):
    import fedmitr.cli
    import fedmitr.pipeline

    calls = []
    real = fedmitr.pipeline.check_out_dir
    for module in (fedmitr.cli, fedmitr.pipeline):
        monkeypatch.setattr(module, "check_out_dir", lambda path: calls.append(path) or real(path))
    assert main(["run", "--preset", "tiny", "--methods", "ensemble", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert len(calls) == 1


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["bench", "--help"], ["run", "--clients", "x"],
                                  ["run", "--alpha", "-1"], ["bench", "--seeds", "a", "--alphas", "0.1"]])
def test_help_and_argument_errors_import_no_torch(argv):
    """The command line answers these from the light modules alone (torch takes seconds to import)."""
    code = ("import sys\nfrom fedmitr.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'timm', 'gradio', 'accelerate') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, env, phrases", [
    # 20 clients at alpha 0.001: each class goes to about one client. It took ~10 s (torch, timm and
    # the data loaded first); now the split is drawn from the labels alone.
    (["--clients", "20", "--alpha", "0.001"], {}, ["could not give each of 20 clients at least 20 samples"]),
    (["--clients", "20", "--alpha", "0.001", "--dataset", "digits"], {}, ["could not give each of 20 clients"]),
    # A Hub dataset offline: it printed five retry blocks over ~35 s before its error line.
    (["--dataset", "cifar10"], {"HF_HUB_OFFLINE": "1"}, ["HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set"]),
    (["--dataset", "hf:someone/images"], {"HF_ENDPOINT": "CLOSED"}, ["does not answer", "mnist5k"]),
])
def test_impossible_data_is_refused_in_one_line_before_torch_is_imported(argv, env, phrases, tmp_path):
    """Refused before torch, timm or datasets is imported, and before the Hub is asked: the error is
    the only output, so there are no retry messages and nothing heavy was loaded."""
    code = ("import sys\nfrom fedmitr.cli import main\n"
            f"code = main({['run', '--out', str(tmp_path / 'out'), *argv]!r})\n"
            "heavy = sorted(m for m in ('torch', 'timm', 'datasets', 'accelerate') if m in sys.modules)\n"
            "print('EXIT', code, 'HEAVY', heavy)\n")
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    environ.update({k: f"http://127.0.0.1:{_closed_port()}" if v == "CLOSED" else v for k, v in env.items()})
    environ.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environ)
    assert proc.stdout.strip() == "EXIT 2 HEAVY []", proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedmitr: error: "), proc.stderr
    assert all(phrase in lines[0] for phrase in phrases), lines[0]
    assert not (tmp_path / "out").exists()
