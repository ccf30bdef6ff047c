"""A run directory, written and read in one place.

    runs/demo/
      config.json                      the effective RunConfig
      metrics.json                     everything measured (written last: its presence = complete)
      events.jsonl                     the run's event stream, one JSON object per line (replayable)
      clients/client_<k>.safetensors   each client's trained model
      models/<method>.safetensors      each single global model
      models/<method>.aux.safetensors  its aux head on the patch tokens (relabel methods), for the vote
      synthetic/<method>.safetensors   each inversion method's synthetic set (fedmitr.synthetic)

:class:`RunDir` is the only code that knows these names: the pipeline writes through it, and the
command line, the Hub export and the app read through it. Paths are always made from a method's
name, never parsed back into one; which methods ran comes from ``metrics.json``.

``events.jsonl`` holds every event but the bulk of :class:`~fedmitr.events.Progress` (one per
percent of a stage is kept), each with ``t``, the seconds since the run started. Arrays are
stored as base64 with their dtype and shape, so a replay sees the same values the live run showed.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fedmitr.config import RunConfig, apply_overrides, preset_config
from fedmitr.errors import ConfigError, excerpt
from fedmitr.events import EVENT_TYPES, DeviceInfo, Event, Progress
from fedmitr.synthetic import SyntheticSet

CONFIG, METRICS, EVENTS = "config.json", "metrics.json", "events.jsonl"
# The same files in an exported or pushed checkpoint folder (fedmitr.hub.export), beside timm's own.
EXPORTED = {"config": "fedmitr_config.json", "metrics": "fedmitr_metrics.json", "events": "fedmitr_events.jsonl",
            "aux_head": "fedmitr_aux_head.safetensors"}


def check_out_dir(out_dir: str | Path) -> Path:
    """Fail early (before any work) if ``out_dir`` cannot be created or written."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out dir {str(path)!r} exists and is not a directory; give a directory path")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"out dir {str(path)!r} is not writable ({str(probe)!r} does not allow writing); "
                          f"choose a directory you can write to")
    return path


class RunDir:
    """One run directory (see the module docstring). ``RunDir(path)`` to write, :meth:`open` to read
    a finished one."""

    def __init__(self, path: str | Path, *, names: dict[str, str] | None = None):
        self.path = Path(path)
        names = names or {}
        self.config_name = names.get("config", CONFIG)
        self.metrics_name = names.get("metrics", METRICS)
        self.events_name = names.get("events", EVENTS)
        self._started = time.perf_counter()
        self._last_percent: dict[str, int] = {}
        self._pending: list[str] = []  # recorded events, written with the rest of the directory
        self._metrics: dict[str, Any] | None = None
        self._config: RunConfig | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- paths (made from names, never parsed back) ---------------------------------------------

    def client_path(self, index: int) -> Path:
        return self.path / "clients" / f"client_{index}.safetensors"

    def model_file(self, method: str) -> Path:
        return self.path / "models" / f"{method}.safetensors"

    def aux_file(self, method: str) -> Path:
        return self.path / "models" / f"{method}.aux.safetensors"

    def synthetic_file(self, method: str) -> Path:
        return self.path / "synthetic" / f"{method}.safetensors"

    @property
    def events_file(self) -> Path:
        return self.path / self.events_name

    # --- writing ---------------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        """Keep ``event`` for ``events.jsonl`` (an event handler: ``on_event=run_dir.record``).

        Progress is thinned to one event per percent of its stage (and the last step). Nothing is
        written until :meth:`write_events`, so a run that fails early leaves no directory behind.
        """
        if isinstance(event, Progress):
            percent = int(100 * event.step / max(1, event.total))
            if percent == self._last_percent.get(event.stage) and event.step != event.total:
                return
            self._last_percent[event.stage] = percent
        self._pending.append(json.dumps({"t": round(time.perf_counter() - self._started, 3), **encode_event(event)}))

    def write_events(self) -> None:
        """Write the recorded events to ``events.jsonl``."""
        _atomic_write(self.events_file, "".join(line + "\n" for line in self._pending))

    def save_client(self, index: int, model: Any) -> None:
        from safetensors.torch import save_file

        self.client_path(index).parent.mkdir(parents=True, exist_ok=True)
        save_file(_cpu_state(model), str(self.client_path(index)))

    def save_model(self, method: str, model: Any) -> None:
        from safetensors.torch import save_file

        self.model_file(method).parent.mkdir(parents=True, exist_ok=True)
        save_file(_cpu_state(model), str(self.model_file(method)))

    def save_aux_head(self, method: str, aux_head: Any, vote: float) -> None:
        """The aux head of ``method``'s student and the vote's lambda it was read with (metadata)."""
        save_aux_head(self.aux_file(method), aux_head, vote)

    def save_synthetic(self, method: str, synthetic: SyntheticSet, extra: dict[str, Any] | None = None) -> None:
        self.synthetic_file(method).parent.mkdir(parents=True, exist_ok=True)
        synthetic.save(self.synthetic_file(method), extra)

    def write_config(self, cfg: RunConfig) -> None:
        _atomic_write(self.path / self.config_name, cfg.to_json() + "\n")

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Write ``metrics.json``; write it last, as its presence means the directory is complete."""
        _atomic_write(self.path / self.metrics_name, json.dumps(metrics, indent=2) + "\n")
        self._metrics = metrics

    # --- reading ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """A finished run directory; a clear error if ``path`` is not one."""
        run = cls(path)
        if not (run.path / METRICS).is_file():
            raise ConfigError(f"{excerpt(str(run.path), 80)} is not a finished run directory (no metrics.json); "
                              f"give the --out folder of a `fedmitr run`")
        run.metrics  # noqa: B018 - read and check it now
        return run

    @classmethod
    def exported(cls, path: str | Path) -> "RunDir":
        """The run recorded in an exported or pushed checkpoint folder (its fedmitr_*.json files and
        events), for a replay; it holds the shared model, not the run's models directory."""
        run = cls(path, names=EXPORTED)
        if not (run.path / run.metrics_name).is_file():
            raise ConfigError(f"{excerpt(str(run.path), 80)} holds no fedmitr run record (fedmitr_metrics.json)")
        run.metrics  # noqa: B018
        return run

    @property
    def metrics(self) -> dict[str, Any]:
        if self._metrics is None:
            try:
                self._metrics = json.loads((self.path / self.metrics_name).read_text())
                if not isinstance(self._metrics.get("methods"), dict):
                    raise KeyError("methods")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise ConfigError(f"the run directory's metrics.json cannot be read ({type(err).__name__}); "
                                  f"was it written by fedmitr?") from None
        return self._metrics

    @property
    def config(self) -> RunConfig:
        if self._config is None:
            try:
                recorded = self.metrics["config"]
                self._config = apply_overrides(preset_config(recorded["preset"]), recorded)
            except (KeyError, TypeError) as err:
                raise ConfigError(f"the run directory's config cannot be read ({type(err).__name__}); "
                                  f"was it written by fedmitr?") from None
        return self._config

    def methods(self) -> list[str]:
        """The methods the run ran, in order."""
        return list(self.metrics["methods"])

    def global_models(self) -> list[str]:
        """The methods of the run that saved a single global model."""
        return [m for m in self.methods() if self.model_file(m).is_file()]

    def model_path(self, method: str) -> Path:
        """The checkpoint of ``method``'s single global model; a clear error if the run has none."""
        if method not in self.global_models():
            why = "ran but makes no single model" if method in self.methods() else "did not run"
            raise ConfigError(f"method {excerpt(method)} {why} in this run; global models here: "
                              f"{', '.join(self.global_models()) or 'none'}")
        return self.model_file(method)

    def synthetic(self, method: str) -> tuple[SyntheticSet, dict[str, Any]]:
        """The synthetic set of ``method`` and the metadata saved with it."""
        if not self.synthetic_file(method).is_file():
            have = [m for m in self.methods() if self.synthetic_file(m).is_file()]
            raise ConfigError(f"this run kept no synthetic set for {excerpt(method)}; it has: "
                              f"{', '.join(have) or 'none'} (only inversion methods make one)")
        return SyntheticSet.load(self.synthetic_file(method))

    def downloads(self) -> list[Path]:
        """What a user downloads: the global models (the headline method first), config and metrics."""
        from fedmitr.methods import headline

        first = headline().name
        models = sorted(self.global_models(), key=lambda m: (m != first, m))
        extra = (self.path / self.config_name, self.path / self.metrics_name)
        return [self.model_file(m) for m in models] + [p for p in extra if p.is_file()]

    def events(self) -> Iterator[tuple[float, Event]]:
        """``(t, event)`` for every recorded event, in order (``t``: seconds since the run started)."""
        if not self.events_file.is_file():
            raise ConfigError(f"{excerpt(str(self.path), 80)} has no events.jsonl (runs made before fedmitr "
                              f"recorded events cannot be replayed)")
        with self.events_file.open() as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    yield float(data.pop("t")), decode_event(data)
                except (ValueError, KeyError, TypeError) as err:
                    raise ConfigError(f"events.jsonl line {number} cannot be read ({type(err).__name__}: "
                                      f"{excerpt(str(err), 80)})") from None


# --- events as JSON ----------------------------------------------------------------------------------

def encode_event(event: Event) -> dict[str, Any]:
    """``{"type": "SyntheticRound", "fields": {...}}`` with arrays as base64 (see :func:`decode_event`)."""
    fields = {f.name: _encode(getattr(event, f.name)) for f in dataclasses.fields(event)}
    return {"type": type(event).__name__, "fields": fields}


def decode_event(data: dict[str, Any]) -> Event:
    cls = EVENT_TYPES[data["type"]]
    fields = {k: _decode(v) for k, v in data["fields"].items()}
    if cls.__name__ == "StageStarted" and fields.get("device") is not None:
        fields["device"] = DeviceInfo(**fields["device"])
    if cls.__name__ == "PartitionReady":
        fields["class_names"] = tuple(fields["class_names"])
    return cls(**fields)


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"$array": {"dtype": value.dtype.str, "shape": list(value.shape),
                           "data": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode("ascii")}}
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$array"}:
            spec = value["$array"]
            raw = base64.b64decode(spec["data"])
            return np.frombuffer(raw, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"]).copy()
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def save_aux_head(path: Path, aux_head: Any, vote: float) -> None:
    """An aux head (``weight`` [L, D], ``bias`` [L]) with the vote's lambda in the file's metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_cpu_state(aux_head), str(path), metadata={"vote": f"{vote:g}", "format": "fedmitr-aux-head"})


def load_aux_head(path: Path) -> tuple[Any, float]:
    """``(nn.Linear, vote)`` from :func:`save_aux_head`'s file; a clear error for any other file."""
    import torch.nn as nn
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path))
        weight, bias = state["weight"], state["bias"]
        vote = float(meta["vote"])
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file is one error
        raise ConfigError(f"{excerpt(str(path), 80)} is not a fedmitr aux head ({type(err).__name__})") from None
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head.eval(), vote


def _cpu_state(model: Any) -> dict[str, Any]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
