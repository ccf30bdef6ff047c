"""The README's set-up script: a failed install must fail loudly and must not mark the venv as done."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _fake_python(bin_dir: Path, pip_exit: int) -> None:
    """A `python3.11` whose `-m venv` makes a venv with a pip that exits with ``pip_exit``."""
    bin_dir.mkdir()
    script = bin_dir / "python3.11"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then\n'
        '  mkdir -p "$3/bin"\n'
        f'  printf "#!/usr/bin/env bash\\necho installing \\"\\$@\\"\\nexit {pip_exit}\\n" > "$3/bin/pip"\n'
        '  printf "#!/usr/bin/env bash\\n" > "$3/bin/fedmitr"\n'
        '  chmod +x "$3/bin/pip" "$3/bin/fedmitr"\n'
        "fi\n")
    script.chmod(0o755)


def _checkout(tmp_path: Path, pip_exit: int) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    for name in ("requirements.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    _fake_python(tmp_path / "bin", pip_exit)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    return repo, env


def test_setup_fails_when_pip_fails_and_does_not_mark_the_venv(tmp_path):
    repo, env = _checkout(tmp_path, pip_exit=1)
    out = subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert not (repo / ".venv" / ".installed").exists()
    assert "install failed" in out.stderr


def test_setup_marks_the_venv_after_a_good_install(tmp_path):
    repo, env = _checkout(tmp_path, pip_exit=0)
    out = subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (repo / ".venv" / ".installed").exists()
    assert "installing" in out.stdout + out.stderr  # pip's own output is shown, not hidden


def test_the_app_script_serves_the_page(tmp_path):
    """`bash scripts/app.sh`, the README's main command: the page answers, with the recorded example."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "FEDMITR_APP_RUNS": str(tmp_path / "runs")}
    proc = subprocess.Popen(["bash", "scripts/app.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as r:
                    config = r.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "the app did not answer within 120 s"
                time.sleep(0.5)
        assert '"run-btn"' in config and '"gallery"' in config
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
