"""The pipeline as a stream of events, and ZeroGPU.

On a ZeroGPU Space, GPU work must run inside a function decorated with ``spaces.GPU``; the
``spaces`` package runs it in a separate process that holds a GPU for ``duration`` seconds, and
streams a generator's values back (so every event must pickle). A run is written as a generator of
the pipeline's events (:func:`run_events`), which the app's worker consumes as
:data:`gpu_run_events`. The real ``spaces`` package (0.51) dictates three things:

* it must be imported before torch (it refuses to load once CUDA is initialised), so ``app/app.py``
  imports this module first, and this module imports no torch;
* it reports the Space's GPU functions when ``gr.Blocks.launch`` runs, and caches one wrapper per
  function with the first ``duration`` it was given, so the function is decorated once, here, at
  import, before any launch;
* a run's seconds depend on its preset, so ``duration`` is a callable of the run's arguments
  (:func:`gpu_seconds`).

Where ``SPACES_ZERO_GPU`` is unset (every machine but a ZeroGPU Space) ``spaces.GPU`` returns the
function itself, and where ``spaces`` is not installed the function is used as it is: the same
code path runs everywhere, so the tests exercise it.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("spaces") is not None:  # before anything imports torch
    import spaces
else:  # pragma: no cover - spaces is in requirements.txt
    spaces = None

import queue  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, Iterator  # noqa: E402

from fedmitr.config import RunConfig  # noqa: E402

if TYPE_CHECKING:
    from fedmitr.data import ImageDataset

# Seconds of GPU a run asks ZeroGPU for, per preset (a ZeroGPU call is cut off after its duration).
GPU_SECONDS = {"tiny": 60, "cpu": 120, "cpu-49": 180, "gpu": 600}


def gpu_seconds(cfg: RunConfig, out_dir: Path | None = None, dataset: "ImageDataset | None" = None) -> int:
    """The GPU seconds a run of ``cfg`` asks for (``spaces.GPU``'s ``duration``, called with the
    run's own arguments)."""
    return GPU_SECONDS.get(cfg.preset, 120)


class _Stopped(BaseException):
    pass


_END = object()


def run_events(cfg: RunConfig, out_dir: Path, dataset: "ImageDataset | None" = None) -> Iterator[Any]:
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


# Decorated once, at import: see the module docstring.
gpu_run_events = spaces.GPU(duration=gpu_seconds)(run_events) if spaces is not None else run_events
