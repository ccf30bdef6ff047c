"""The pipeline as a stream of events, and ZeroGPU.

On a ZeroGPU Space, GPU work must run inside a function decorated with ``spaces.GPU``; the
``spaces`` package runs it in a separate process that holds a GPU for ``duration`` seconds, and
streams a generator's values back. So a run is written as a generator of the pipeline's events
(:func:`run_events`), which the app's worker consumes; :func:`on_gpu` wraps it with ``spaces.GPU``
only where the ``spaces`` package is installed (Spaces), and is a no-op elsewhere. The same code
path runs everywhere, so the tests exercise it.
"""

from __future__ import annotations

import importlib.util
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from fedmitr.config import RunConfig
from fedmitr.data import ImageDataset

# Seconds of GPU a run asks ZeroGPU for, per preset (a ZeroGPU call is cut off after its duration).
GPU_SECONDS = {"tiny": 60, "cpu": 120, "cpu-49": 180, "gpu": 600}


class _Stopped(BaseException):
    pass


_END = object()


def run_events(cfg: RunConfig, out_dir: Path, dataset: ImageDataset | None = None) -> Iterator[Any]:
    """Run the pipeline and yield its events as they come; the last is ``RunFinished``.

    Closing the generator stops the run at its next step (and waits for it to stop). A failure of
    the run is raised from the generator.
    """
    from fedmitr.pipeline import run

    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def handler(event: Any) -> None:
        if stop.is_set():
            raise _Stopped()
        events.put(event)

    def work() -> None:
        try:
            run(cfg, out_dir=out_dir, on_event=handler, dataset=dataset)
        except _Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - re-raised to the consumer below
            outcome["error"] = err
        finally:
            events.put(_END)

    thread = threading.Thread(target=work, name="fedmitr-pipeline", daemon=True)
    thread.start()
    try:
        while (event := events.get()) is not _END:
            yield event
        if "error" in outcome:
            raise outcome["error"]
    finally:
        stop.set()
        thread.join()


def zerogpu_available() -> bool:
    return importlib.util.find_spec("spaces") is not None


def on_gpu(fn: Callable[..., Iterator[Any]], cfg: RunConfig) -> Callable[..., Iterator[Any]]:
    """``fn`` wrapped with ``spaces.GPU`` (for the preset's duration) where ``spaces`` is installed."""
    if not zerogpu_available():
        return fn
    import spaces  # noqa: PLC0415 - only on Spaces

    return spaces.GPU(duration=GPU_SECONDS.get(cfg.preset, 120))(fn)
