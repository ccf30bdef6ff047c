"""Training jobs of the app: one pipeline run in a worker thread, its events streamed through a queue.

* One job uses the device at a time (``DEVICE_LOCK``), whatever Gradio's queue does.
* A job is cancelled by setting its stop flag: the event handler then raises :class:`RunCancelled`
  inside the pipeline, which the pipeline calls on every progress step, so it stops within a step.
* Each browser session has its own run directories under :func:`runs_root`; old ones are deleted.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedmitr.config import RunConfig
from fedmitr.events import Event

DEVICE_LOCK = threading.Lock()  # one training job on the device at a time, across all sessions

MAX_RUN_AGE_S = float(os.environ.get("FEDMITR_APP_MAX_RUN_AGE_S", 6 * 3600))  # delete run dirs older than this
MAX_RUN_DIRS = int(os.environ.get("FEDMITR_APP_MAX_RUN_DIRS", 20))  # and keep at most this many


class RunCancelled(BaseException):
    """Raised inside the pipeline (by the event handler) when the user pressed Stop.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way up
    mistakes a stop for a failure.
    """


DONE = object()  # end-of-stream marker on a job's event queue


class Job:
    """One pipeline run in a worker thread. Events arrive on ``events``; ``DONE`` ends the stream."""

    def __init__(self, cfg: RunConfig, out_dir: Path, session: str):
        self.cfg = cfg
        self.out_dir = out_dir
        self.session = session
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.started_on_device = threading.Event()  # set once the job holds the device
        self.metrics: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._thread = threading.Thread(target=self._work, name=f"fedmitr-job-{session[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self.stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker; True if it has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _handler(self, event: Event) -> None:
        # Called by the pipeline on its own thread at every step: the one place a run can be stopped.
        if self.stop.is_set():
            raise RunCancelled()
        self.events.put(event)

    def _work(self) -> None:
        from fedmitr.pipeline import run

        try:
            # Wait for the device without blocking a cancel (a queued job can be stopped, too).
            while not DEVICE_LOCK.acquire(timeout=0.2):
                if self.stop.is_set():
                    raise RunCancelled()
            try:
                self.started_on_device.set()
                if self.stop.is_set():
                    raise RunCancelled()
                result = run(self.cfg, out_dir=self.out_dir, on_event=self._handler)
                self.metrics = result.metrics
                del result  # the client models: free them now, not when the session ends
            finally:
                DEVICE_LOCK.release()
        except RunCancelled:
            self.cancelled = True
        except BaseException as err:  # noqa: BLE001 - reported to the user by the app
            self.error = err
        finally:
            self.events.put(DONE)


# --- which session runs what -----------------------------------------------------------------------

_ACTIVE: dict[str, Job] = {}
_ACTIVE_LOCK = threading.Lock()


def register(job: Job) -> None:
    with _ACTIVE_LOCK:
        _ACTIVE[job.session] = job


def unregister(job: Job) -> None:
    with _ACTIVE_LOCK:
        if _ACTIVE.get(job.session) is job:
            del _ACTIVE[job.session]


def active_job(session: str) -> Job | None:
    """The session's job while its worker runs (a finished job is not active, registered or not)."""
    with _ACTIVE_LOCK:
        job = _ACTIVE.get(session)
    return job if job is not None and job.alive else None


def wait_idle(timeout_s: float) -> bool:
    """Wait until no job holds the device or is registered; False if that takes over ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with _ACTIVE_LOCK:
            busy = bool(_ACTIVE)
        if not busy and not DEVICE_LOCK.locked():
            return True
        time.sleep(0.1)
    return False


def cancel_session(session: str) -> bool:
    """Stop the session's running job, if any. Returns whether there was one."""
    job = active_job(session)
    if job is None:
        return False
    job.cancel()
    return True


# --- run directories -------------------------------------------------------------------------------

def runs_root() -> Path:
    """Where the app writes run directories: $FEDMITR_APP_RUNS, else a folder in the system temp dir."""
    root = Path(os.environ.get("FEDMITR_APP_RUNS") or Path(tempfile.gettempdir()) / "fedmitr-app-runs")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _session_tag(session: str) -> str:
    return "".join(ch for ch in session if ch.isalnum())[:16] or "anon"


def new_run_dir(session: str) -> Path:
    """A fresh run directory for ``session``; the session's earlier runs are deleted first."""
    root = runs_root()
    tag = _session_tag(session)
    for old in root.glob(f"{tag}-*"):
        shutil.rmtree(old, ignore_errors=True)
    cleanup_runs(root)
    return root / f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}"


def delete_session_runs(session: str) -> None:
    for old in runs_root().glob(f"{_session_tag(session)}-*"):
        if not _in_use(old):
            shutil.rmtree(old, ignore_errors=True)


def _in_use(path: Path) -> bool:
    with _ACTIVE_LOCK:
        return any(job.out_dir == path for job in _ACTIVE.values())


def cleanup_runs(root: Path | None = None, max_age_s: float = MAX_RUN_AGE_S, max_dirs: int = MAX_RUN_DIRS) -> list[Path]:
    """Delete run directories older than ``max_age_s``, then the oldest beyond ``max_dirs``.

    Directories of running jobs are kept. Returns the deleted paths.
    """
    root = root or runs_root()
    dirs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    now = time.time()
    deleted = []
    for i, path in enumerate(dirs):
        too_old = now - path.stat().st_mtime > max_age_s
        too_many = len(dirs) - i > max_dirs
        if (too_old or too_many) and not _in_use(path):
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted
