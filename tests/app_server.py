"""Serve the Gradio app in-process on a free localhost port, offline: shared by the API and browser tests."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import pytest



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving_app(runs_dir: Path, around_launch: Callable[[], ContextManager] = contextlib.nullcontext) -> Iterator[str]:
    """Yield the URL of the app served from this process; ``around_launch`` wraps building + launching it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    mp.setenv("FEDMITR_APP_RUNS", str(runs_dir))
    from app.app import create_app, launch_kwargs

    port = free_port()
    with around_launch():
        demo = create_app()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        mp.undo()
