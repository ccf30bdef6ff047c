"""The benchmark: every method on the same trained clients, over a grid of skews and seeds.

For each (alpha, seed) the clients are trained once; then each method runs on them. Inversion
methods are compared twice:

* **equal iterations**: the config as is (same iterations and images for dense and sparse);
* **equal wall-clock** (``<method>@time`` rows): sparse methods get ``images_per_round`` scaled by
  the measured inversion speed-up of that cell, so they spend about the inversion time dense does.

:func:`run_bench` writes ``bench.json`` (every record), ``bench.md`` (tables: mean +- std over
seeds) and ``tradeoff.html`` (accuracy against seconds, plotly). It reports progress through events,
like the pipeline; the command line is in :mod:`fedmitr.cli`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from fedmitr.config import RunConfig, apply_overrides
from fedmitr.errors import ConfigError
from fedmitr.events import BenchCell, EventHandler, Metric, ignore
from fedmitr.inversion import invert
from fedmitr.methods import METHODS
from fedmitr.pipeline import check_out_dir, train
from fedmitr.server import ServerContext, run_method


def alpha_name(alpha: float | None) -> str:
    return "iid" if alpha is None else f"{alpha:g}"


def bench_cell(cfg: RunConfig, equal_time: bool, on_event: EventHandler = ignore) -> list[dict[str, Any]]:
    """Train clients once for ``cfg`` and run every method on them. Returns one record per method."""
    fed = train(cfg, on_event)
    server = ServerContext(cfg, fed.dataset, fed.clients, fed.accelerator.device, on_event)
    base = {"alpha": alpha_name(cfg.data.alpha), "seed": cfg.seed, "client_seconds": fed.seconds["clients"],
            "client_accuracy": fed.client_accuracy, "device": str(fed.device)}
    records = []
    inversion_seconds: dict[str, float] = {}

    def record(name: str, budget: str, images_per_round: int | None = None) -> dict[str, Any]:
        result = run_method(name.removesuffix("@time"), server, images_per_round)
        on_event(Metric("accuracy", result.accuracy, name))
        return {**base, "method": name, "budget": budget, **result.to_dict()}

    for name in cfg.methods:
        records.append(record(name, "iterations"))
        if "stage_seconds" in records[-1]:
            inversion_seconds[name] = records[-1]["stage_seconds"]["inversion"]
    speedup = _speedup(inversion_seconds)
    for rec in records:
        rec["inversion_speedup"] = speedup
    if equal_time and speedup:
        for name in cfg.methods:
            if METHODS[name].sparse:
                images = max(1, round(cfg.inversion.images_per_round * speedup))
                records.append({**record(f"{name}@time", "wall-clock", images), "inversion_speedup": speedup})
    return records


def _speedup(inversion_seconds: dict[str, float]) -> float | None:
    """Dense over sparse inversion seconds (same iterations and images), from any dense/sparse pair."""
    dense = [inversion_seconds[m] for m in inversion_seconds if not METHODS[m].sparse]
    sparse = [inversion_seconds[m] for m in inversion_seconds if METHODS[m].sparse]
    if not dense or not sparse:
        return None
    return statistics.mean(dense) / statistics.mean(sparse)


def run_bench(base: RunConfig, alphas: list[float | None], seeds: list[int], out: str | Path,
              equal_time: bool = True, command: str = "fedmitr bench", on_event: EventHandler = ignore) -> str:
    """Every (alpha, seed) cell of the grid; writes the outputs after each cell. Returns bench.md.

    ``command`` is recorded in ``bench.md`` as how the tables were produced.
    """
    if not alphas or not seeds:
        raise ConfigError("the benchmark needs at least one alpha and one seed")
    out = check_out_dir(out)
    base.validate()
    records: list[dict[str, Any]] = []
    cells = [(a, s) for a in alphas for s in seeds]
    table = ""
    for index, (alpha, seed) in enumerate(cells, start=1):
        cfg = apply_overrides(base, {"seed": seed, "data": {"alpha": alpha_name(alpha)}})
        on_event(BenchCell(alpha_name(alpha), seed, index, len(cells)))
        records.extend(bench_cell(cfg, equal_time, on_event))
        # Written after every cell, so a long bench can be read (and merged) early.
        table = write_outputs(out, base.to_dict(), records, command)
    return table


def _fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def summarise(records: list[dict[str, Any]], command: str) -> str:
    alphas = list(dict.fromkeys(r["alpha"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    seeds = sorted({r["seed"] for r in records})
    lines = [f"Test accuracy (%), mean ± std over seeds {seeds}; `{command}`", "",
             "| method | " + " | ".join(f"α={a}" for a in alphas) + " | seconds (mean) |",
             "|---|" + "---|" * len(alphas) + "---|"]
    for m in methods:
        cells = [_fmt([r["accuracy"] for r in records if r["method"] == m and r["alpha"] == a]) for a in alphas]
        secs = [r["seconds"] for r in records if r["method"] == m]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {statistics.mean(secs):.1f} |")
    clients = [r["client_seconds"] for r in records]
    speed = [r["inversion_speedup"] for r in records if r.get("inversion_speedup")]
    lines += ["", f"Client training (all clients): {statistics.mean(clients):.1f} s mean per cell."]
    if speed:
        lines.append(f"inversion_speedup (dense / sparse inversion seconds, equal iterations and images): "
                     f"{_fmt(speed, scale=1.0, digits=2)}x")
    stage_rows = [r for r in records if "stage_seconds" in r]
    if stage_rows:
        lines += ["", "Seconds per server stage (mean over cells):", "",
                  "| method | inversion | relabel | distill | evaluate | total |", "|---|---|---|---|---|---|"]
        for m in methods:
            rows = [r for r in stage_rows if r["method"] == m]
            if rows:
                st = {k: statistics.mean(r["stage_seconds"][k] for r in rows)
                      for k in ("inversion", "relabel", "distill", "evaluate")}
                lines.append(f"| {m} | " + " | ".join(f"{v:.1f}" for v in st.values())
                             + f" | {statistics.mean(r['seconds'] for r in rows):.1f} |")
    return "\n".join(lines) + "\n"


def tradeoff_figure(records: list[dict[str, Any]]):
    import plotly.graph_objects as go

    fig = go.Figure()
    for m in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == m]
        fig.add_trace(go.Scatter(
            x=[r["seconds"] for r in rows], y=[r["accuracy"] for r in rows], mode="markers", name=m,
            text=[f"α={r['alpha']} seed={r['seed']}" for r in rows], marker={"size": 10}))
    fig.update_layout(title="Accuracy against server seconds (each point: one alpha and seed)",
                      xaxis_title="server-side seconds", yaxis_title="test accuracy", template="plotly_white")
    return fig


def merge_records(paths: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    config, records = None, []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
            config = config or data["config"]
            records.extend(data["records"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"cannot read bench results {p!r}: {err}; pass bench.json files written by fedmitr bench") from None
    return config, records


def merge(paths: list[str], out: str | Path, command: str) -> str:
    """Rebuild the outputs in ``out`` from existing ``bench.json`` files (e.g. halves of a grid)."""
    config, records = merge_records(paths)
    return write_outputs(check_out_dir(out), config, records, command)


def write_outputs(out: Path, config: dict[str, Any], records: list[dict[str, Any]], command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"config": config, "records": records}, indent=2))
    table = summarise(records, command)
    (out / "bench.md").write_text(table)
    tradeoff_figure(records).write_html(out / "tradeoff.html", include_plotlyjs="cdn")
    return table


def inversion_speed(cfg: RunConfig, repeats: int, on_event: EventHandler = ignore) -> dict[str, Any]:
    """Seconds of dense and sparse inversion of the same clients, same labels, iterations and images."""
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1 (got {repeats})")
    fed = train(cfg, on_event)
    models = [c.model for c in fed.clients]
    labels = torch.arange(cfg.inversion.images_per_round) % fed.dataset.num_classes
    seconds: dict[str, list[float]] = {"dense": [], "sparse": []}
    for r in range(repeats):
        for mode in ("dense", "sparse"):  # interleaved, so drifts in machine load hit both alike
            gen = torch.Generator().manual_seed(r)
            batch = invert(models, labels, cfg.inversion, fed.dataset.pixel_bounds(), mode == "sparse", gen,
                           allow_flip=fed.dataset.allow_flip)
            seconds[mode].append(batch.seconds)
    dense, sparse = statistics.mean(seconds["dense"]), statistics.mean(seconds["sparse"])
    return {"device": str(fed.device), "threads": torch.get_num_threads(),
            "images": cfg.inversion.images_per_round, "iterations": cfg.inversion.iterations,
            "active_patches_at_end": int(batch.keep_idx.shape[1]), "patches": int(batch.stop_step.shape[1]),
            "seconds": seconds, "dense_mean": dense, "sparse_mean": sparse, "inversion_speedup": dense / sparse}
