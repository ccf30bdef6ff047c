"""The benchmark: every method on the same trained clients, over a grid of skews and seeds.

For each (alpha, seed) the clients are trained once; then each method runs on them. Inversion
methods are compared twice:

* **equal iterations**: the config as is (same iterations and images for dense and sparse);
* **equal wall-clock** (``<method>@time`` rows): sparse methods get ``images_per_round`` scaled by
  the measured inversion speed-up of that cell, so they spend about the inversion time dense does.

:func:`run_bench` writes ``bench.json`` (every record), ``bench.md`` (tables: mean +- std over
seeds, and the regime map: where FedMITR wins) and one ``frontier-<setting>.html`` per setting
(accuracy against seconds, plotly). It reports progress through events,
like the pipeline; the command line is in :mod:`fedmitr.cli`.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from fedmitr.config import RunConfig, apply_overrides, preset_config
from fedmitr.errors import ConfigError
from fedmitr.events import BenchCell, EventHandler, Metric, ignore
from fedmitr.inversion import invert
from fedmitr.methods import METHODS, check_config, find_rounds, headline, run_method
from fedmitr.pipeline import train
from fedmitr.rundir import check_out_dir
from fedmitr.runtime import Workers
from fedmitr.server import ServerContext


def alpha_name(alpha: float | None) -> str:
    return "iid" if alpha is None else f"{alpha:g}"


def bench_cell(cfg: RunConfig, equal_time: bool | tuple[str, ...], on_event: EventHandler = ignore) -> list[dict[str, Any]]:
    """Train clients once for ``cfg`` and run every method on them. Returns one record per method.

    ``equal_time``: rerun the sparse methods (True: all of them; a tuple: those named) with as many
    images per round as the cell's inversion speed-up allows, so they spend dense inversion's time.
    """
    fed = train(cfg, on_event)
    server = ServerContext(cfg, fed.dataset, fed.ensemble, fed.accelerator.device, on_event=on_event,
                           workers=Workers.of(fed.accelerator))
    base = {"setting": setting_name(cfg), "client_init": client_init(cfg), "alpha": alpha_name(cfg.data.alpha),
            "seed": cfg.seed, "client_seconds": fed.seconds["clients"], "client_accuracy": fed.client_accuracy,
            "client_patch_accuracy": fed.patch_accuracy, "device": str(fed.device)}
    records = []
    inversion_seconds: dict[str, float] = {}

    def record(name: str, budget: str, images_per_round: int | None = None) -> dict[str, Any]:
        ctx = server if images_per_round is None else server.with_images_per_round(images_per_round)
        result = run_method(name.removesuffix("@time"), ctx)
        on_event(Metric("accuracy", result.accuracy, name))
        return {**base, "method": name, "budget": budget, **result.to_dict()}

    for name in cfg.methods:
        records.append(record(name, "iterations"))
        if "stage_seconds" in records[-1]:
            inversion_seconds[name] = records[-1]["stage_seconds"]["inversion"]
    speedup = _speedup(inversion_seconds)
    for rec in records:
        rec["inversion_speedup"] = speedup
    dense = [inversion_seconds[m] for m in inversion_seconds if not METHODS[m].sparse and not METHODS[m].generative]
    if equal_time and speedup:
        for name in cfg.methods:
            if METHODS[name].sparse and (equal_time is True or name in equal_time):
                images = max(1, round(cfg.inversion.images_per_round * speedup))
                records.append({**record(f"{name}@time", "wall-clock", images), "inversion_speedup": speedup})
    if equal_time and dense:
        # A generator method named (or all, with True) gets as many images per round as dense inversion's
        # seconds allow at its own synthesis speed.
        for name in cfg.methods:
            if METHODS[name].generative and (equal_time is True or name in equal_time) and inversion_seconds[name] > 0:
                ratio = statistics.mean(dense) / inversion_seconds[name]
                images = max(1, round(cfg.inversion.images_per_round * ratio))
                records.append({**record(f"{name}@time", "wall-clock", images), "synthesis_ratio": ratio})
    return records


def _speedup(inversion_seconds: dict[str, float]) -> float | None:
    """Dense over sparse inversion seconds (same iterations and images), from any dense/sparse pair."""
    dense = [inversion_seconds[m] for m in inversion_seconds if not METHODS[m].sparse and not METHODS[m].generative]
    sparse = [inversion_seconds[m] for m in inversion_seconds if METHODS[m].sparse]
    if not dense or not sparse:
        return None
    return statistics.mean(dense) / statistics.mean(sparse)


def client_init(cfg: RunConfig) -> str:
    """Where the clients started: "scratch", or the backbone's name (a file's name without its folder)."""
    return Path(cfg.model.init).name.removesuffix(".safetensors")


def setting_name(cfg: RunConfig) -> str:
    """What a benchmark row was measured on: the preset, with the dataset when it is not the
    preset's, and the clients' start when it is not from scratch (e.g. ``cpu-49 · fractal``)."""
    default = preset_config(cfg.preset).data.dataset
    name = cfg.preset if cfg.data.dataset == default else f"{cfg.preset}/{cfg.data.dataset}"
    return name if cfg.model.init == "scratch" else f"{name} · {client_init(cfg)}"


def run_bench(base: RunConfig, alphas: list[float | None], seeds: list[int], out: str | Path, *,
              equal_time: bool | tuple[str, ...] = True, command: str = "fedmitr bench", on_event: EventHandler = ignore) -> str:
    """Every (alpha, seed) cell of the grid; writes the outputs after each cell. Returns bench.md.

    ``command`` is recorded in ``bench.md`` as how the tables were produced.
    """
    if not alphas or not seeds:
        raise ConfigError("the benchmark needs at least one alpha and one seed")
    out = check_out_dir(out)
    check_config(base)
    records: list[dict[str, Any]] = []
    cells = [(a, s) for a in alphas for s in seeds]
    table = ""
    for index, (alpha, seed) in enumerate(cells, start=1):
        cfg = apply_overrides(base, {"seed": seed, "data": {"alpha": alpha_name(alpha)}})
        on_event(BenchCell(f"alpha={alpha_name(alpha)}", seed, index, len(cells)))
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


def _cells(records: list[dict[str, Any]], key: str) -> list[str]:
    """The distinct values of ``key`` in first-seen order; alphas sorted, "iid" last (merged parts
    of a grid arrive in any order)."""
    cells = list(dict.fromkeys(str(r[key]) for r in records))
    if key == "alpha":
        cells.sort(key=lambda a: math.inf if a == "iid" else float(a))
    return cells


def _setting(record: dict[str, Any]) -> str:
    return record.get("setting", "cpu")  # records from before settings were recorded: the cpu preset


def _values(records, setting, method, alpha) -> list[float]:
    return [r["accuracy"] for r in records
            if _setting(r) == setting and r["method"] == method and r["alpha"] == alpha]


def _clients(record: dict[str, Any]) -> tuple[float, ...]:
    """The trained clients a record ran on, told apart by their test accuracies. One seed trained
    again on other hardware gives other clients (float kernels differ), so a merge can hold a seed's
    method twice, on two sets of clients."""
    return tuple(round(a, 6) for a in record.get("client_accuracy", ()))


def one_per_seed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first record of each (setting, alpha, method, seed, budget): a seed counts once in a
    mean, whichever parts of a grid were merged (list the part that should count first)."""
    seen: dict[tuple, dict[str, Any]] = {}
    for r in records:
        seen.setdefault((_setting(r), r["alpha"], r["method"], r["seed"], r.get("budget", "iterations")), r)
    return list(seen.values())


def same_clients_pairs(rows: list[dict[str, Any]], a: str, b: str) -> dict[int, tuple[dict, dict]]:
    """seed -> the first records of methods ``a`` and ``b`` on that seed that ran on the same
    clients (``rows``: one setting and alpha). Seeds where they never shared clients are left out."""
    found: dict[int, tuple[dict, dict]] = {}
    for ra in rows:
        if ra["method"] != a or ra["seed"] in found:
            continue
        rb = next((r for r in rows if r["method"] == b and r["seed"] == ra["seed"] and _clients(r) == _clients(ra)),
                  None)
        if rb is not None:
            found[ra["seed"]] = (ra, rb)
    return found


def comparison_names() -> tuple[str, str, str, str]:
    """(the method, its dense-inversion + KD baseline, its no-relabel ablation, its form with the
    plain ensemble as teacher: the method itself when it has no learned teacher), found in the
    registry by what the methods are, not by name."""
    ours = headline()
    dense = find_rounds(sparse=False, relabel=False)
    no_relabel = find_rounds(sparse=ours.sparse, relabel=False)
    weighted = getattr(ours, "teacher", None) is not None
    plain = find_rounds(sparse=ours.sparse, relabel=ours.relabel) if weighted else ours.name
    if dense is None or no_relabel is None or plain is None:
        raise ConfigError("the regime map needs a dense-inversion + KD method, a no-relabel ablation and (for a "
                          "method with a learned teacher) its plain-ensemble form registered")
    return ours.name, dense, no_relabel, plain


def regime_map(records: list[dict[str, Any]]) -> str:
    """Where the method wins: per setting and alpha, its mean accuracy minus each rival's, in points,
    and its mechanisms apart (relabel: its plain-ensemble form − its no-relabel ablation; the learned
    client weights: the method − its plain-ensemble form; sparsity: the no-relabel ablation − dense
    inversion + KD).

    A difference is marked **bold** when it exceeds both methods' seed standard deviations
    ("beyond the spread"); one seed gives no spread and no mark.
    """
    ours, dense, no_relabel, plain = comparison_names()
    label = METHODS[ours].label
    rivals = [(dense, ours), (dense, f"{ours}@time"), (no_relabel, ours), (no_relabel, plain), (plain, ours),
              (dense, no_relabel)]
    lines = [f"| setting | α | seeds | {label} | − {dense} (equal iterations) | − {dense} (equal time) "
             f"| − {no_relabel} | {plain} − {no_relabel} (relabel's effect) | − {plain} (client weights' effect) "
             f"| {no_relabel} − {dense} (sparsity's effect) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(_setting(r) for r in records):
        for alpha in _cells([r for r in records if _setting(r) == setting], "alpha"):
            mine = _values(records, setting, ours, alpha)
            if not mine:
                continue
            cells = []
            for rival, name in rivals:
                a, b = _values(records, setting, name, alpha), _values(records, setting, rival, alpha)
                if not a or not b or rival == name:
                    cells.append("-")
                    continue
                diff = 100 * (statistics.mean(a) - statistics.mean(b))
                spread = 100 * max(statistics.stdev(a) if len(a) > 1 else math.inf,
                                   statistics.stdev(b) if len(b) > 1 else math.inf)
                text = f"{diff:+.1f}"
                cells.append(f"**{text}**" if abs(diff) > spread else text)
            lines.append(f"| {setting} | {alpha} | {len(mine)} | {_fmt(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# What each paired difference isolates: (method, rival, what the difference measures).
PAIRS = (
    ("fedmitr", "dense-kd", "against the baseline"),
    ("fedmitr", "sparse-kd", "against its no-relabel ablation"),
    ("fedmitr", "fedmitr-unweighted", "the learned client weights"),
    ("fedmitr-unweighted", "sparse-kd", "the token targets"),
    ("sparse-kd", "dense-kd", "sparse inversion"),
    ("fedmitr-unweighted", "fedmitr-noise", "the background fill"),
    ("fedmitr-unweighted", "fedmitr-kept", "the whole view"),
    ("fedmitr", "fedmitr-keptview", "against the kept-view default"),
    ("fedmitr", "fedmitr-v5", "against v5, the default before the token targets taught classes"),
    ("fedmitr", "dense-gen", "against DENSE"),
    ("fedmitr", "co-boosting", "against Co-Boosting"),
)


def paired_table(records: list[dict[str, Any]], pairs: tuple[tuple[str, str, str], ...] = PAIRS) -> str:
    """Paired differences on the same clients, in points: per setting and alpha, the mean of
    ``method − rival`` over the seeds both ran on the same clients, then each seed's. Pairs without
    any shared seed are left out, and so are methods of that name that are not registered."""
    pairs = tuple(p for p in pairs if p[0] in METHODS and p[1] in METHODS)
    rows = [r for r in records if r.get("budget", "iterations") == "iterations"]
    cells = {}  # (setting, alpha) -> its rows
    for r in rows:
        cells.setdefault((_setting(r), r["alpha"]), []).append(r)
    diffs = {(key, a, b): [100 * (ra["accuracy"] - rb["accuracy"]) for _, (ra, rb) in
                           sorted(same_clients_pairs(cell, a, b).items())]
             for key, cell in cells.items() for a, b, _ in pairs}
    shown = [p for p in pairs if any(d for (_, a, b), d in diffs.items() if (a, b) == p[:2])]
    if not shown:
        return ""
    lines = ["| setting | α | " + " | ".join(f"{a} − {b} ({what})" for a, b, what in shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    for setting in dict.fromkeys(_setting(r) for r in records):
        for alpha in _cells([r for r in records if _setting(r) == setting], "alpha"):
            texts = []
            for a, b, _ in shown:
                d = diffs.get(((setting, alpha), a, b), [])
                texts.append("-" if not d else f"{statistics.mean(d):+.1f} ({', '.join(f'{x:+.1f}' for x in d)})")
            if any(t != "-" for t in texts):
                lines.append(f"| {setting} | {alpha} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def tokens_table(records: list[dict[str, Any]]) -> str:
    """What the patch tokens learned and the paper's gradient claims, per setting and method (mean
    over cells): the aux head alone on the evaluation split (max / mean over tokens), the class token
    alone and the vote; the student's minibatch gradient variance (relative to the mean gradient's
    squared norm) for KD alone and KD + token loss; the inversion's pixel-gradient spread across
    iterations after the last stop. Empty when no record has them."""
    rows = [r for r in records if r.get("aux_accuracy") or r.get("gradient_variance")]
    if not rows:
        return ""

    def mean(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
        values = [v for v in values if v is not None]
        return f"{scale * statistics.mean(values):.{digits}f}" if values else "-"

    lines = ["| setting | method | cells | aux alone, max / mean | class token | vote (λ) | gradient variance, KD "
             "/ KD + token (relative) | inversion gradient spread |", "|---|---|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(_setting(r) for r in rows):
        for m in _cells([r for r in rows if _setting(r) == setting], "method"):
            mine = [r for r in rows if _setting(r) == setting and r["method"] == m]
            aux = [r["aux_accuracy"] for r in mine if r.get("aux_accuracy")]
            grads = [r.get("gradient_variance", {}) for r in mine]
            kd = [g["distill"]["kd"]["relative"] for g in grads if "distill" in g]
            both = [g["distill"]["kd+token"]["relative"] for g in grads if "kd+token" in g.get("distill", {})]
            spread = [g["inversion"]["over_iterations"] for g in grads if "inversion" in g]
            votes = sorted({r.get("vote", 0) for r in mine})
            lines.append(
                f"| {setting} | {m} | {len(mine)} | "
                + (f"{mean([a['max'] for a in aux])} / {mean([a['mean'] for a in aux])}" if aux else "-")
                + f" | {mean([r.get('cls_accuracy') for r in mine])} | "
                + (f"{mean([r['accuracy'] for r in mine])} ({', '.join(f'{v:g}' for v in votes)})"
                   if any(votes) else "-")
                + f" | {mean(kd, 1.0, 3)} / {mean(both, 1.0, 3)} | {mean(spread, 1.0, 3)} |")
    return "\n".join(lines)


def summarise(records: list[dict[str, Any]], command: str) -> str:
    """``bench.md``: the regime map, then per setting the accuracy table, the speed-up and stage seconds.
    A seed counts once in each mean (:func:`one_per_seed`); the paired table pairs records on the
    same clients."""
    paired = paired_table(records)
    records = one_per_seed(records)
    lines = [f"How it was produced: `{command}`", "",
             "Test accuracy in %, mean ± std over seeds; seconds are wall-clock of the server-side method.", "",
             f"## Where {METHODS[headline().name].label} wins (points; **bold**: beyond both methods' seed spread)", "",
             regime_map(records), ""]
    if paired:
        lines += ["## Paired differences on the same clients (points: the mean, then each seed)", "", paired, ""]
    tokens = tokens_table(records)
    if tokens:
        lines += ["## What the patch tokens learned, and the gradient claims (mean over cells)", "",
                  "Accuracies in %. Gradient variance: mean_i ||g_i − ḡ||² / ||ḡ||² over 16 minibatches of the final "
                  "pool, backbone parameters. Inversion spread: std / mean across iterations (after the last stop) "
                  "of the mean pixel-gradient norm.", "", tokens, ""]
    for setting in dict.fromkeys(_setting(r) for r in records):
        rows = [r for r in records if _setting(r) == setting]
        alphas, methods = _cells(rows, "alpha"), _cells(rows, "method")
        seeds = sorted({r["seed"] for r in rows})
        lines += [f"## {setting}", "", f"Seeds {seeds} (fewer at some α: see the map's seed count).", "",
                  "| method | " + " | ".join(f"α={a}" for a in alphas) + " | seconds (mean) |",
                  "|---|" + "---|" * len(alphas) + "---|"]
        for m in methods:
            cells = [_fmt(_values(rows, setting, m, a)) for a in alphas]
            secs = [r["seconds"] for r in rows if r["method"] == m]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {statistics.mean(secs):.1f} |")
        clients = [r["client_seconds"] for r in rows]
        speed = [r["inversion_speedup"] for r in rows if r.get("inversion_speedup")]
        lines += ["", f"Client training (all clients): {statistics.mean(clients):.1f} s mean per cell."]
        if speed:
            lines.append(f"inversion_speedup (dense / sparse inversion seconds, equal iterations and images): "
                         f"{_fmt(speed, scale=1.0, digits=2)}x")
        stage_rows = [r for r in rows if "stage_seconds" in r]
        if stage_rows:
            lines += ["", "Seconds per server stage (mean over cells):", "",
                      "| method | inversion | relabel | distill | evaluate | total |", "|---|---|---|---|---|---|"]
            for m in methods:
                mine = [r for r in stage_rows if r["method"] == m]
                if mine:
                    st = {k: statistics.mean(r["stage_seconds"][k] for r in mine)
                          for k in ("inversion", "relabel", "distill", "evaluate")}
                    lines.append(f"| {m} | " + " | ".join(f"{v:.1f}" for v in st.values())
                                 + f" | {statistics.mean(r['seconds'] for r in mine):.1f} |")
        lines.append("")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (seconds, accuracy) points that no other point beats on both: cheaper and at least as good."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def frontier_figure(records: list[dict[str, Any]], setting: str):
    """Accuracy against server seconds for one setting: each method's mean over cells at each α,
    with the accuracy-for-time frontier over all of them."""
    import plotly.graph_objects as go

    rows = [r for r in records if _setting(r) == setting]
    fig = go.Figure()
    points = []
    for m in _cells(rows, "method"):
        xs, ys, text = [], [], []
        for a in _cells(rows, "alpha"):
            cell = [r for r in rows if r["method"] == m and r["alpha"] == a]
            if cell:
                xs.append(statistics.mean(r["seconds"] for r in cell))
                ys.append(statistics.mean(r["accuracy"] for r in cell))
                text.append(f"α={a}, {len(cell)} seed(s)")
        points += list(zip(xs, ys))
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", name=m, text=[t.split(",")[0] for t in text],
                                 textposition="top center", hovertext=text, marker={"size": 11}))
    front = pareto_front(points)
    fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines", name="frontier",
                             line={"dash": "dot", "color": "#6b7280"}))
    fig.update_layout(title=f"{setting}: test accuracy against server-side seconds (mean over seeds, one point per α)",
                      xaxis_title="server-side seconds (1 thread)", yaxis_title="test accuracy",
                      template="plotly_white")
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
    """``bench.json`` (every record), ``bench.md`` (the map and tables) and one
    ``frontier-<setting>.html`` per setting. Returns ``bench.md``'s text."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"config": config, "records": records}, indent=2))
    table = summarise(records, command)
    (out / "bench.md").write_text(table)
    unique = one_per_seed(records)
    for setting in dict.fromkeys(_setting(r) for r in unique):
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in setting)
        frontier_figure(unique, setting).write_html(out / f"frontier-{name}.html", include_plotlyjs="cdn")
    return table


def inversion_speed(cfg: RunConfig, repeats: int, on_event: EventHandler = ignore) -> dict[str, Any]:
    """Seconds of dense and sparse inversion of the same clients, same labels, iterations and images."""
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1 (got {repeats})")
    fed = train(cfg, on_event)
    ensemble = fed.ensemble
    labels = torch.arange(cfg.inversion.images_per_round) % fed.dataset.num_classes
    seconds: dict[str, list[float]] = {"dense": [], "sparse": []}
    for r in range(repeats):
        for mode in ("dense", "sparse"):  # interleaved, so drifts in machine load hit both alike
            gen = torch.Generator().manual_seed(r)
            batch = invert(ensemble, labels, cfg.inversion, pixel_bounds=fed.dataset.pixel_bounds(),
                           sparse=mode == "sparse", generator=gen, allow_flip=fed.dataset.allow_flip)
            seconds[mode].append(batch.seconds)
    dense, sparse = statistics.mean(seconds["dense"]), statistics.mean(seconds["sparse"])
    return {"device": str(fed.device), "threads": torch.get_num_threads(),
            "images": cfg.inversion.images_per_round, "iterations": cfg.inversion.iterations,
            "active_patches_at_end": int(batch.keep_idx.shape[1]), "patches": int(batch.stop_step.shape[1]),
            "seconds": seconds, "dense_mean": dense, "sparse_mean": sparse, "inversion_speedup": dense / sparse}


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``bench.json`` (for example the bundled ``assets/bench/bench.json``)."""
    return merge_records([str(path)])[1]


def benchmark_pair(records: list[dict[str, Any]], setting: str, alpha: float | None) -> dict[str, Any] | None:
    """FedMITR beside dense inversion + KD in the benchmark's cell nearest to a run (same setting;
    the nearest alpha): mean accuracy and server seconds of both over the seeds they share, and the
    paired difference per seed. None when the benchmark has no such setting."""
    ours, dense_name, *_ = comparison_names()
    rows = [r for r in records if _setting(r) == setting and r.get("budget", "iterations") == "iterations"]
    alphas = [a for a in _cells(rows, "alpha") if _values(rows, setting, ours, a) and
              _values(rows, setting, dense_name, a)]
    if not alphas:
        return None

    def distance(a: str) -> float:
        if alpha is None or a == "iid":
            return 0.0 if (alpha is None) == (a == "iid") else math.inf
        return abs(math.log(float(a)) - math.log(alpha))

    nearest = min(alphas, key=distance)
    if distance(nearest) == math.inf:
        return None
    pairs = same_clients_pairs([r for r in rows if r["alpha"] == nearest], ours, dense_name)
    seeds = sorted(pairs)
    if not seeds:
        return None
    runs = {ours: [pairs[s][0] for s in seeds], dense_name: [pairs[s][1] for s in seeds]}

    def means(key: str) -> dict[str, float]:
        return {name: statistics.mean(r[key] for r in rs) for name, rs in runs.items()}

    return {"setting": setting, "alpha": nearest, "seeds": seeds, "method": ours, "baseline": dense_name,
            "accuracy": means("accuracy"), "seconds": means("seconds"),
            "paired": [a["accuracy"] - b["accuracy"] for a, b in zip(runs[ours], runs[dense_name])]}


def compare_with_benchmark(records: list[dict[str, Any]], setting: str, alpha: float | None) -> str | None:
    """One sentence on how FedMITR did against dense inversion + KD in the benchmark's cell nearest
    to a run (:func:`benchmark_pair`), or None when the benchmark has no such setting."""
    pair = benchmark_pair(records, setting, alpha)
    if pair is None:
        return None
    ours, dense = pair["method"], pair["baseline"]
    acc, secs = pair["accuracy"], pair["seconds"]
    per_seed = ", ".join(f"{100 * d:+.1f}" for d in pair["paired"])
    return (f"In the benchmark ({setting}, α={pair['alpha']}, mean of {len(pair['seeds'])} seed(s), 1 thread), "
            f"{METHODS[ours].label} reached {100 * acc[ours]:.1f}% in {secs[ours]:.0f} s of server time and "
            f"{METHODS[dense].label} {100 * acc[dense]:.1f}% in {secs[dense]:.0f} s: "
            f"{100 * (acc[ours] - acc[dense]):+.1f} points (per seed {per_seed}).")


# --- the cost of K clients -----------------------------------------------------------------------

def scale(cfg: RunConfig, ks: list[int], out: str | Path, on_event: EventHandler = ignore,
          threads: int | None = None) -> list[dict[str, Any]]:
    """Run the pipeline of ``cfg`` once per number of clients K in ``ks``, each in its own process,
    and record per stage the seconds and the process's peak memory (RSS). Writes ``scale.json``,
    ``scale.md`` and ``scale.html`` into ``out``; returns the records."""
    import os
    import subprocess
    import sys
    import tempfile

    out = check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for index, k in enumerate(ks, start=1):
        kcfg = apply_overrides(cfg, {"data": {"num_clients": k}}).validate()
        on_event(BenchCell(f"K={k}", cfg.seed, index, len(ks)))
        with tempfile.TemporaryDirectory(prefix="fedmitr-scale-") as tmp:
            config = Path(tmp) / "config.json"
            config.write_text(kcfg.to_json())
            env = dict(os.environ)
            if threads is not None:
                env["OMP_NUM_THREADS"] = str(threads)
            proc = subprocess.Popen([sys.executable, "-m", "fedmitr", "run", "--preset", cfg.preset, "--config",
                                     str(config), "--out", str(Path(tmp) / "run"), "--quiet"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise ConfigError(f"the run with K={k} failed: {proc.stderr.read().decode()[-500:]}")
            metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
        stages = {"data": metrics["seconds"]["data"], "clients": metrics["seconds"]["clients"]}
        for name, m in metrics["methods"].items():
            for stage, sec in m.get("stage_seconds", {}).items():
                stages[f"{name}:{stage}"] = sec
            if not m.get("stage_seconds"):
                stages[name] = m["seconds"]
        record = {"clients": k, "seconds": stages, "total_seconds": metrics["seconds"]["total"],
                  "peak_rss_mb": usage.ru_maxrss / 1024, "device": metrics["device"],
                  "accuracy": {name: m["accuracy"] for name, m in metrics["methods"].items()}}
        records.append(record)
        on_event(Metric("total_seconds", record["total_seconds"], f"K={k}"))
        (out / "scale.json").write_text(json.dumps({"config": cfg.to_dict(), "records": records}, indent=2))
        (out / "scale.md").write_text(scale_table(records))
        scale_figure(records).write_html(out / "scale.html", include_plotlyjs="cdn")
    return records


def scale_table(records: list[dict[str, Any]]) -> str:
    stages = list(dict.fromkeys(s for r in records for s in r["seconds"]))
    lines = ["| K | " + " | ".join(stages) + " | total s | peak RSS (MB) | accuracy |",
             "|---|" + "---|" * (len(stages) + 3)]
    for r in records:
        acc = ", ".join(f"{n} {a:.1%}" for n, a in r["accuracy"].items())
        lines.append(f"| {r['clients']} | " + " | ".join(f"{r['seconds'].get(s, 0):.1f}" for s in stages)
                     + f" | {r['total_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {acc} |")
    return "\n".join(lines) + "\n"


def scale_figure(records: list[dict[str, Any]]):
    import plotly.graph_objects as go

    fig = go.Figure()
    ks = [r["clients"] for r in records]
    for stage in dict.fromkeys(s for r in records for s in r["seconds"]):
        fig.add_trace(go.Scatter(x=ks, y=[r["seconds"].get(stage, 0) for r in records], mode="lines+markers",
                                 name=stage))
    fig.update_layout(title="Seconds per stage against the number of clients K", xaxis_title="clients K",
                      yaxis_title="seconds", xaxis_type="log", template="plotly_white")
    return fig
