"""The server's methods side by side on a CPU: one worker process of one torch thread per core.

On a CPU, in one process, the methods of a run are independent once the clients are trained: each
builds its own global model from the same ensemble. A model this small gains ~10% from a second torch
thread and ~2x from a second method run beside it, as the clients do (:mod:`fedmitr.clients`). So
:func:`run_methods` runs them

* **in worker processes** (``python -c``, one torch thread each) when two or more methods synthesise
  images and the run has two or more workers (:func:`method_workers`): each worker takes the next
  method of the run's list as soon as it is free, streams its events back as pickles on its stdout,
  and leaves its :class:`~fedmitr.server.MethodResult` in a file;
* **here, on one torch thread**, otherwise (the references, a single method, a one-core machine).

Either way every method runs on one thread, so its numbers depend on the seed and the settings alone:
not on the core count, the entry point (the app or the command line) or what runs beside it. A GPU,
or a process of ``torchrun`` / ``accelerate launch``, runs the methods one after another in the run's
own process (:func:`fedmitr.pipeline.serve`), as before.

Leaving early (a Stop raised by ``on_event``, a failed worker) kills the workers at once.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator

from fedmitr.config import RunConfig
from fedmitr.data import ImageDataset
from fedmitr.ensemble import Ensemble
from fedmitr.errors import excerpt
from fedmitr.events import EventHandler, Progress, StageStarted
from fedmitr.methods import get_method, run_method
from fedmitr.runtime import worker_process
from fedmitr.server import MethodResult, ServerContext

__all__ = ["method_workers", "one_thread", "planned_workers", "run_methods"]

# A worker sends a method's progress at most this often (and always its last step).
_REPORT_EVERY_S = 0.1
# The run hears from this stage at least this often (a Stop is seen between two reports).
_HEARTBEAT_S = 0.25


def method_workers(accelerator: Accelerator, methods: tuple[str, ...]) -> int:
    """Worker processes for a run's server methods (:func:`planned_workers` for this run's device
    and processes). 0: run the methods here."""
    return planned_workers(methods, device=accelerator.device.type, processes=accelerator.num_processes)


def planned_workers(methods: tuple[str, ...] | list[str], *, device: str = "cpu", processes: int = 1) -> int:
    """Worker processes for the server methods ``methods``: on a CPU, in one process,
    ``$FEDMITR_SERVER_WORKERS`` if set, else ``$FEDMITR_CLIENT_WORKERS`` (the app sets it), else one
    per torch thread of this process; at most one per method that synthesises. 0 (run the methods
    in the run's process) on a GPU, under ``accelerate launch``, or below two workers."""
    if device != "cpu" or processes > 1:
        return 0
    heavy = sum(1 for m in methods if get_method(m).synthesises)
    for name in ("FEDMITR_SERVER_WORKERS", "FEDMITR_CLIENT_WORKERS"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name} must be a whole number >= 1 (got {excerpt(value)})")
            break
    workers = min(heavy, int(value) if value else torch.get_num_threads())
    return workers if workers >= 2 else 0


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread inside the context (the thread count of the process restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_methods(cfg: RunConfig, dataset: ImageDataset, ensemble: Ensemble, *, workers: int,
                on_event: EventHandler, on_result: Callable[[MethodResult], None]) -> None:
    """Run every method of ``cfg`` on the CPU, each on one torch thread: the methods without
    synthesis here, the others in ``workers`` worker processes (0: here too). ``on_result(result)``
    is called in this thread as each method finishes (in the order they finish)."""
    heavy = [m for m in cfg.methods if get_method(m).synthesises] if workers >= 2 else []
    with one_thread():
        for name in cfg.methods:
            if name in heavy:
                continue
            on_event(StageStarted(name, info=get_method(name).summary))
            on_result(run_method(name, ServerContext(cfg, dataset, ensemble, torch.device("cpu"), on_event=on_event)))
    if heavy:
        _in_workers(cfg, dataset, ensemble, heavy, workers, on_event=on_event, on_result=on_result)


# --- the worker processes ------------------------------------------------------------------------------

def _frame(obj: object) -> bytes:
    """``obj`` pickled, after its length: one message on a worker's pipe (:func:`_receive` reads it)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return struct.pack("<Q", len(data)) + data


def _send(stream: Any, obj: object) -> None:
    stream.write(_frame(obj))
    stream.flush()


def _receive(stream: Any) -> object | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    data = stream.read(size)
    return pickle.loads(data) if len(data) == size else None


def _worker_main() -> None:
    """A worker process (see :class:`_Worker`): reads the run's context, then method names, from stdin
    (``None`` ends it); runs each on one thread, sends its events as framed pickles on stdout, and
    saves its result in ``<name>.pt`` in the folder named by its first argument (then sends
    ``("done", name)``)."""
    torch.set_num_threads(1)
    frames = os.fdopen(os.dup(1), "wb")  # the frames' own channel: a library that prints goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out_dir = Path(sys.argv[1])
    cfg, dataset, ensemble = _receive(sys.stdin.buffer)
    while (name := _receive(sys.stdin.buffer)) is not None:
        last = 0.0

        def on_event(event: object) -> None:
            nonlocal last
            if isinstance(event, Progress) and event.step < event.total:
                now = time.monotonic()
                if now - last < _REPORT_EVERY_S:
                    return
                last = now
            _send(frames, ("event", event))  # the run gone: a broken pipe ends this process

        on_event(StageStarted(name, info=get_method(name).summary))
        result = run_method(name, ServerContext(cfg, dataset, ensemble, torch.device("cpu"), on_event=on_event))
        torch.save(result, out_dir / f"{name}.pt")
        _send(frames, ("done", name))


class _Worker:
    """One worker process and the threads that read what it says (so nothing here ever blocks on it)."""

    def __init__(self, context: bytes, out_dir: Path, lines: "queue.Queue[tuple]"):
        self.errors: list[str] = []
        self.busy: str | None = None
        self.proc = worker_process("fedmitr.side_by_side:_worker_main", str(out_dir))
        # Everything for the worker goes through one queue and one thread, in order: the context
        # first, then each method's name (None: close its stdin, it exits). Nothing here blocks.
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._outbox.put(context)

        def send() -> None:
            try:
                while (data := self._outbox.get()) is not None:
                    self.proc.stdin.write(data)
                    self.proc.stdin.flush()
                self.proc.stdin.close()
            except OSError:  # the worker died: its stderr says why
                pass

        def read_frames() -> None:
            while (frame := _receive(self.proc.stdout)) is not None:
                lines.put((self, *frame))

        def read_errors() -> None:
            for line in self.proc.stderr:
                self.errors = [*self.errors[-30:], line.decode(errors="replace").rstrip()]

        self._threads = [threading.Thread(target=t, daemon=True) for t in (send, read_frames, read_errors)]
        for thread in self._threads:
            thread.start()

    def give(self, name: str | None) -> None:
        """Hand the worker its next method (None: no more, it exits)."""
        self.busy = name
        self._outbox.put(_frame(name))
        if name is None:
            self._outbox.put(None)

    def check(self) -> None:
        """Raise if the worker failed."""
        code = self.proc.poll()
        if code not in (None, 0) or (code == 0 and self.busy is not None):
            self._threads[2].join(timeout=1.0)  # it has exited: its stderr ends at once
            detail = "\n".join(self.errors[-12:]) or f"exit code {code}"
            raise RuntimeError(f"a server worker process failed while running {self.busy}:\n{detail}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self._outbox.put(None)  # the sender thread ends too


def _in_workers(cfg: RunConfig, dataset: ImageDataset, ensemble: Ensemble, names: list[str], workers: int, *,
                on_event: EventHandler, on_result: Callable[[MethodResult], None]) -> None:
    context = _frame((cfg, dataset, ensemble))
    todo, left = list(names), set(names)
    lines: queue.Queue = queue.Queue()
    latest: dict[str, object] = {}  # the last progress of each running method: repeated as a heartbeat
    with tempfile.TemporaryDirectory(prefix="fedmitr-methods-") as tmp:
        running = [_Worker(context, Path(tmp), lines) for _ in range(min(workers, len(names)))]
        try:
            for worker in running:
                worker.give(todo.pop(0))
            while left:
                try:
                    worker, kind, value = lines.get(timeout=_HEARTBEAT_S)
                except queue.Empty:
                    for worker in running:
                        worker.check()
                    for event in list(latest.values()) or [Progress(names[0], 0, 1, "starting the method workers")]:
                        on_event(event)
                    continue
                if kind == "event":
                    if isinstance(value, Progress):
                        latest[value.stage] = value
                    on_event(value)
                    continue
                latest.pop(value, None)
                result = torch.load(Path(tmp) / f"{value}.pt", weights_only=False)
                left.discard(value)
                worker.give(todo.pop(0) if todo else None)
                on_result(result)
        finally:
            for worker in running:
                worker.kill()
            for worker in running:
                worker.proc.wait()  # killed, or exited: reaped at once (no zombie); milliseconds
