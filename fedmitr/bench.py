"""``fedmitr bench``: every method on the same trained clients, over a grid of skews and seeds.

For each (alpha, seed) the clients are trained once; then each method runs on them. Inversion
methods are compared twice:

* **equal iterations**: the config as is (same iterations and images for dense and sparse);
* **equal wall-clock** (``<method>@time`` rows): sparse methods get ``images_per_round`` scaled by
  the measured inversion speed-up of that cell, so they spend about the inversion time dense does.

Writes ``bench.json`` (every record), ``bench.md`` (tables: mean +- std over seeds) and
``tradeoff.html`` (accuracy against seconds, plotly).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmitr.clients import evaluate, train_clients
from fedmitr.config import ConfigError, apply_overrides, parse_alpha
from fedmitr.events import EventHandler, ignore
from fedmitr.methods import METHODS, parse_methods
from fedmitr.runtime import describe_device, make_accelerator, seed_everything


def add_bench_parser(sub) -> None:
    from fedmitr.cli import add_run_flags

    bench = sub.add_parser("bench", help="compare methods over a grid of alpha and seeds",
                           description=__doc__.split("\n\n")[0] + " Writes bench.json, bench.md, tradeoff.html.")
    add_run_flags(bench)
    bench.add_argument("--alphas", default="0.1,0.3,0.5,iid", help="comma-separated skews (default: 0.1,0.3,0.5,iid)")
    bench.add_argument("--seeds", default="0,1", help="comma-separated integer seeds (default: 0,1)")
    bench.add_argument("--no-equal-time", action="store_true", help="skip the equal wall-clock reruns")
    bench.add_argument("--out", default="bench", help="output directory (default: bench)")
    bench.add_argument("--speed-only", action="store_true",
                       help="only time dense vs sparse inversion (equal iterations and images) on one set of "
                            "trained clients, --repeats times each; writes speed.json")
    bench.add_argument("--repeats", default="3", help="timing repeats for --speed-only (default: 3)")
    bench.add_argument("--merge", nargs="+", default=None, metavar="BENCH_JSON",
                       help="only rebuild bench.md / tradeoff.html in --out from existing bench.json files "
                            "(e.g. halves of a grid run in parallel); trains nothing")


def parse_grid(alphas: str, seeds: str) -> tuple[list[float | None], list[int]]:
    alpha_list = [parse_alpha(a.strip()) for a in alphas.split(",") if a.strip()]
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers (got {seeds!r})") from None
    if not alpha_list or not seed_list:
        raise ConfigError("--alphas and --seeds need at least one value each")
    return alpha_list, seed_list


def _alpha_name(alpha: float | None) -> str:
    return "iid" if alpha is None else f"{alpha:g}"


def bench_cell(cfg, equal_time: bool, on_event: EventHandler = ignore) -> list[dict[str, Any]]:
    """Train clients once for ``cfg`` and run every method on them. Returns one record per method."""
    from fedmitr.pipeline import prepare, run_method

    dataset, part = prepare(cfg)
    accelerator = make_accelerator()
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    clients = train_clients(dataset, part, cfg.model, cfg.clients, accelerator, cfg.seed, on_event)
    client_seconds = time.perf_counter() - t0
    base = {"alpha": _alpha_name(cfg.data.alpha), "seed": cfg.seed, "client_seconds": client_seconds,
            "client_accuracy": [evaluate(c.model, dataset.test) for c in clients], "device": describe_device(accelerator)}
    records = []
    inversion_seconds: dict[str, float] = {}
    for name in cfg.methods:
        t0 = time.perf_counter()
        result = run_method(name, cfg, dataset, clients, accelerator, on_event)
        seconds = time.perf_counter() - t0
        rec = {**base, "method": name, "budget": "iterations", "accuracy": result.accuracy, "seconds": seconds,
               "curve": result.curve, **result.extra}
        if "stage_seconds" in result.extra:
            inversion_seconds[name] = result.extra["stage_seconds"]["inversion"]
        records.append(rec)
        print(f"  alpha={base['alpha']} seed={cfg.seed} {name}: acc={result.accuracy:.4f} ({seconds:.1f} s)",
              file=sys.stderr, flush=True)

    speedup = _speedup(inversion_seconds)
    for rec in records:
        rec["inversion_speedup"] = speedup
    if equal_time and speedup:
        for name in cfg.methods:
            if not METHODS[name].sparse:
                continue
            images = max(1, round(cfg.inversion.images_per_round * speedup))
            t0 = time.perf_counter()
            result = run_method(name, cfg, dataset, clients, accelerator, on_event, images_per_round=images)
            seconds = time.perf_counter() - t0
            records.append({**base, "method": f"{name}@time", "budget": "wall-clock", "accuracy": result.accuracy,
                            "seconds": seconds, "curve": result.curve, "inversion_speedup": speedup, **result.extra})
            print(f"  alpha={base['alpha']} seed={cfg.seed} {name}@time ({images} images/round): "
                  f"acc={result.accuracy:.4f} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    return records


def _speedup(inversion_seconds: dict[str, float]) -> float | None:
    """Dense over sparse inversion seconds (same iterations and images), from any dense/sparse pair."""
    dense = [inversion_seconds[m] for m in inversion_seconds if not METHODS[m].sparse]
    sparse = [inversion_seconds[m] for m in inversion_seconds if METHODS[m].sparse]
    if not dense or not sparse:
        return None
    return statistics.mean(dense) / statistics.mean(sparse)


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


def write_outputs(out: Path, config: dict[str, Any], records: list[dict[str, Any]], command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"config": config, "records": records}, indent=2))
    table = summarise(records, command)
    (out / "bench.md").write_text(table)
    tradeoff_figure(records).write_html(out / "tradeoff.html", include_plotlyjs="cdn")
    return table


def inversion_speed(cfg, repeats: int) -> dict[str, Any]:
    """Seconds of dense and sparse inversion of the same clients, same labels, iterations and images."""
    import torch

    from fedmitr.inversion import invert
    from fedmitr.pipeline import prepare

    dataset, part = prepare(cfg)
    accelerator = make_accelerator()
    clients = train_clients(dataset, part, cfg.model, cfg.clients, accelerator, cfg.seed)
    models = [c.model for c in clients]
    labels = torch.arange(cfg.inversion.images_per_round) % dataset.num_classes
    seconds: dict[str, list[float]] = {"dense": [], "sparse": []}
    for r in range(repeats):
        for mode in ("dense", "sparse"):  # interleaved, so drifts in machine load hit both alike
            gen = torch.Generator().manual_seed(r)
            batch = invert(models, labels, cfg.inversion, dataset.pixel_bounds(), mode == "sparse", gen,
                           allow_flip=dataset.allow_flip)
            seconds[mode].append(batch.seconds)
    dense, sparse = statistics.mean(seconds["dense"]), statistics.mean(seconds["sparse"])
    return {"device": describe_device(accelerator), "threads": torch.get_num_threads(),
            "images": cfg.inversion.images_per_round, "iterations": cfg.inversion.iterations,
            "active_patches_at_end": int(batch.keep_idx.shape[1]), "patches": int(batch.stop_step.shape[1]),
            "seconds": seconds, "dense_mean": dense, "sparse_mean": sparse, "inversion_speedup": dense / sparse}


def cmd_bench(args: argparse.Namespace) -> int:
    from fedmitr.cli import ProgressPrinter, _int, config_from_args

    if args.speed_only:
        cfg = config_from_args(args)
        result = inversion_speed(cfg, _int("--repeats", args.repeats, minimum=1))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps(result, indent=2))
        print(f"inversion of {result['images']} images x {result['iterations']} iterations on {result['device']}: "
              f"dense {result['dense_mean']:.2f} s, sparse {result['sparse_mean']:.2f} s "
              f"({result['active_patches_at_end']}/{result['patches']} patches active at the end), "
              f"inversion_speedup {result['inversion_speedup']:.2f}x")
        return 0
    if args.merge:
        config, records = merge_records(args.merge)
        print(write_outputs(Path(args.out), config, records, "fedmitr bench (merged: " + " ".join(args.merge) + ")"))
        return 0

    base = config_from_args(args)
    if args.methods is None:
        base = replace(base, methods=tuple(METHODS))
    alphas, seeds = parse_grid(args.alphas, args.seeds)
    out = Path(args.out)
    from fedmitr.pipeline import check_out_dir

    check_out_dir(out)
    command = "fedmitr bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "fedmitr bench"
    records: list[dict[str, Any]] = []
    printer = ProgressPrinter(quiet=True)
    for alpha in alphas:
        for seed in seeds:
            cfg = apply_overrides(base, {"seed": seed, "data": {"alpha": alpha if alpha is not None else "iid"}})
            print(f"[bench] alpha={_alpha_name(alpha)} seed={seed}", file=sys.stderr, flush=True)
            records.extend(bench_cell(cfg, equal_time=not args.no_equal_time, on_event=printer))
            # Written after every cell, so a long bench can be read (and merged) early.
            table = write_outputs(out, base.to_dict(), records, command)
    print(table)
    return 0
