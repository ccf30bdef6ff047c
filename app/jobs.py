"""Training jobs of the app: one pipeline run in a worker thread, its events streamed through a queue.

What the app guarantees, and how:

* **One job on the device at a time**, first come first served (:class:`DeviceQueue`). A waiting
  job knows its place in the line, and leaves the line the moment it is cancelled.
* **Stop never blocks.** :meth:`Job.cancel` sets a flag and returns. The pipeline reports at every
  optimiser step, inversion iteration and relabel chunk (:data:`app.zerogpu.gpu_run_events` streams
  those reports); the worker checks the flag at each one, stops the pipeline, releases the device
  itself and unregisters itself. Nothing on Gradio's event loop ever waits for a worker.
* Each browser session has its own run directories under :func:`runs_root`; old ones are deleted.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedmitr.config import RunConfig
from fedmitr.data import ImageDataset
from fedmitr.events import RunFinished

from app import zerogpu

MAX_RUN_AGE_S = float(os.environ.get("FEDMITR_APP_MAX_RUN_AGE_S", 6 * 3600))  # delete run dirs older than this
MAX_RUN_DIRS = int(os.environ.get("FEDMITR_APP_MAX_RUN_DIRS", 20))  # and keep at most this many
MAX_WAITING = int(os.environ.get("FEDMITR_APP_MAX_WAITING", 8))  # runs that may wait for the device at once


class RunCancelled(BaseException):
    """Raised inside the pipeline (by the event handler) when the user pressed Stop.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way up
    mistakes a stop for a failure.
    """


DONE = object()  # end-of-stream marker on a job's event queue


class DeviceQueue:
    """First-come-first-served access to the one device, for jobs of every session."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._line: list[Job] = []  # waiting, in arrival order
        self._holder: Job | None = None

    def enter(self, job: "Job") -> None:
        with self._cond:
            self._line.append(job)

    def acquire(self, job: "Job") -> bool:
        """Wait until ``job`` is first in line and the device is free; False if it was cancelled."""
        with self._cond:
            while not job.stop.is_set() and (self._holder is not None or self._line[0] is not job):
                self._cond.wait(timeout=1.0)
            self._line.remove(job)
            if job.stop.is_set():
                self._cond.notify_all()
                return False
            self._holder = job
            return True

    def release(self, job: "Job") -> None:
        with self._cond:
            if self._holder is job:
                self._holder = None
            self._cond.notify_all()

    def wake(self) -> None:
        """Let waiting jobs re-check their stop flags now."""
        with self._cond:
            self._cond.notify_all()

    def position(self, job: "Job") -> int:
        """0 if ``job`` holds the device, else its 1-based place in the line (0 once it left)."""
        with self._cond:
            return self._line.index(job) + 1 if job in self._line else 0

    def waiting(self) -> int:
        with self._cond:
            return len(self._line)

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._holder is not None


DEVICE = DeviceQueue()


class Job:
    """One pipeline run in a worker thread. Events arrive on ``events``; ``DONE`` ends the stream."""

    def __init__(self, cfg: RunConfig, out_dir: Path, session: str, dataset: ImageDataset | None = None):
        self.cfg = cfg
        self.out_dir = out_dir
        self.session = session
        self.dataset = dataset  # already loaded by the app's check, so the worker does not load it again
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.started_on_device = threading.Event()  # set once the job holds the device
        self.metrics: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._thread = threading.Thread(target=self._work, name=f"fedmitr-job-{session[:8]}", daemon=True)

    def start(self) -> None:
        """Register the job for its session, take a place in the device's line, and start the worker."""
        register(self)
        DEVICE.enter(self)
        self._thread.start()

    def cancel(self) -> None:
        """Ask the worker to stop. Returns at once; the worker stops within one step."""
        self.stop.set()
        DEVICE.wake()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker (never call this on Gradio's event loop); True if it has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def queue_position(self) -> int:
        return DEVICE.position(self)

    def _work(self) -> None:
        try:
            if not DEVICE.acquire(self):
                raise RunCancelled()
            try:
                self.started_on_device.set()
                # The pipeline reports at every step; between two reports is where a run stops.
                stream = zerogpu.gpu_run_events(self.cfg, self.out_dir, self.dataset)
                try:
                    for event in stream:
                        if self.stop.is_set():
                            raise RunCancelled()
                        if isinstance(event, RunFinished):
                            self.metrics = event.metrics
                        self.events.put(event)
                finally:
                    stream.close()  # stops the pipeline at its next step and waits for it
            finally:
                DEVICE.release(self)
        except RunCancelled:
            self.cancelled = True
        except BaseException as err:  # noqa: BLE001 - reported to the user by the app
            self.error = err
        finally:
            unregister(self)
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
    """The session's job while it waits or runs (a finished or stopped job is not active)."""
    with _ACTIVE_LOCK:
        job = _ACTIVE.get(session)
    return job if job is not None and not job.stop.is_set() else None


def wait_idle(timeout_s: float) -> bool:
    """Wait until no job is registered or holds the device; False if that takes over ``timeout_s``.

    For tests and tools, never for the app's own handlers.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with _ACTIVE_LOCK:
            busy = bool(_ACTIVE)
        if not busy and not DEVICE.busy:
            return True
        time.sleep(0.05)
    return False


def cancel_session(session: str) -> bool:
    """Stop the session's job, waiting or running. Returns whether there was one."""
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


THUMBNAILS = "thumbnails"  # gallery thumbnails, shared by every session (named by their content)


def thumbnails_root() -> Path:
    """Where gallery thumbnails are written once each (:class:`app.runview.RunView`); Gradio copies
    a file into its own cache when it sends it, so deleting one later only means drawing it again."""
    return runs_root() / THUMBNAILS


def _session_tag(session: str) -> str:
    return "".join(ch for ch in session if ch.isalnum())[:16] or "anon"


def new_run_dir(session: str) -> Path:
    """A fresh run directory for ``session``; the session's earlier runs are deleted first."""
    root = runs_root()
    tag = _session_tag(session)
    for old in root.glob(f"{tag}-*"):
        if not _in_use(old):
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
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and p.name != THUMBNAILS), key=lambda p: p.stat().st_mtime)
    now = time.time()
    deleted = []
    for thumb in (root / THUMBNAILS).glob("*.png"):  # thumbnails: by age only
        with contextlib.suppress(OSError):
            if now - thumb.stat().st_mtime > max_age_s:
                thumb.unlink()
    for i, path in enumerate(dirs):
        too_old = now - path.stat().st_mtime > max_age_s
        too_many = len(dirs) - i > max_dirs
        if (too_old or too_many) and not _in_use(path):
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted
