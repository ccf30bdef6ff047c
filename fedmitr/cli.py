"""Command line: ``fedmitr run`` (one pipeline run) and ``fedmitr bench`` (a grid of runs).

Bad input prints one line on stderr, ``fedmitr: error: <what was wrong and what is allowed>``, and
exits with code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fedmitr.config import ConfigError, PRESETS, apply_overrides, load_config_file, parse_alpha, preset_config
from fedmitr.data import DATASETS, DatasetUnavailable
from fedmitr.events import Event, Metric, Progress, StageFinished, StageStarted
from fedmitr.methods import METHODS, parse_methods
from fedmitr.models import ModelUnavailable

USER_ERRORS = (ConfigError, DatasetUnavailable, ModelUnavailable)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit 2 (argparse's convention)
        raise SystemExit(_fail(f"{message} (see `{self.prog} --help`)"))


def _fail(message: str) -> int:
    print(f"fedmitr: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedmitr", description="One-shot federated learning with ViTs (FedMITR).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="train the clients once and run the server methods",
                         description="Train K clients on non-IID splits of a dataset, once, then run the "
                                     "chosen server-side methods on the same clients. Flags override the "
                                     "preset, and --config overrides the preset before the flags do.")
    add_run_flags(run)
    run.add_argument("--out", default=None,
                     help="run directory for config.json, metrics.json and checkpoints "
                          "(default: runs/<dataset>-k<clients>-a<alpha>-s<seed>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no progress bar, only the results table")

    from fedmitr.bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", help=f"starting config: {', '.join(PRESETS)} (default: cpu)")
    p.add_argument("--config", default=None,
                   help="YAML or JSON file of nested overrides, e.g. {clients: {epochs: 20}}")
    p.add_argument("--dataset", default=None,
                   help=f"dataset: {', '.join(DATASETS)} or hf:owner/name (default: mnist5k, bundled)")
    p.add_argument("--clients", type=str, default=None, help="number of clients K, >= 2 (default: 5)")
    p.add_argument("--alpha", default=None,
                   help="Dirichlet label skew, a number > 0 (0.1 extreme, 0.5 moderate), or 'iid' (default: 0.5)")
    p.add_argument("--seed", type=str, default=None, help="integer seed for split, models and synthesis (default: 0)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods to run: {', '.join(METHODS)} (default: fedavg,ensemble)")
    p.add_argument("--epochs", type=str, default=None, help="local training epochs per client (preset default)")


def _int(flag: str, value: str, minimum: int | None = None) -> int:
    try:
        out = int(value)
    except ValueError:
        raise ConfigError(f"{flag} must be an integer (got {value!r})") from None
    if minimum is not None and out < minimum:
        raise ConfigError(f"{flag} must be >= {minimum} (got {out})")
    return out


def config_from_args(args: argparse.Namespace):
    cfg = preset_config(args.preset)
    if args.config:
        cfg = apply_overrides(cfg, load_config_file(args.config))
    over: dict[str, Any] = {}
    data: dict[str, Any] = {}
    if args.dataset is not None:
        data["dataset"] = args.dataset
    if args.clients is not None:
        data["num_clients"] = _int("--clients", args.clients, minimum=2)
    if args.alpha is not None:
        data["alpha"] = parse_alpha(args.alpha)
    if data:
        over["data"] = data
    if args.seed is not None:
        over["seed"] = _int("--seed", args.seed)
    if args.methods is not None:
        over["methods"] = parse_methods(args.methods)
    if args.epochs is not None:
        over["clients"] = {"epochs": _int("--epochs", args.epochs, minimum=1)}
    return apply_overrides(cfg, over).validate()


class ProgressPrinter:
    """Renders pipeline events on stderr: a tqdm bar per stage, and one line per metric."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if isinstance(event, StageStarted):
            self.close()
            info = f" ({event.info})" if event.info else ""
            if event.total:
                self.bar = tqdm(total=event.total, desc=event.stage, file=sys.stderr, leave=False)
            else:
                tqdm.write(f"[{event.stage}] started{info}", file=sys.stderr)
            if event.total and info:
                tqdm.write(f"[{event.stage}] started{info}", file=sys.stderr)
        elif isinstance(event, Progress) and self.bar is not None:
            self.bar.n = event.step
            self.bar.set_postfix_str(event.message + "".join(f" {k}={v:.3f}" for k, v in event.values.items()),
                                     refresh=False)
            self.bar.refresh()
        elif isinstance(event, Metric):
            step = f" round {event.step}" if event.step is not None else ""
            tqdm.write(f"  {event.source}{step}: {event.name} = {event.value:.4f}", file=sys.stderr)
        elif isinstance(event, StageFinished):
            self.close()
            tqdm.write(f"[{event.stage}] done in {event.seconds:.1f} s", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def results_table(metrics: dict[str, Any]) -> str:
    rows = [("method", "accuracy", "seconds")]
    for c in metrics["clients"]:
        rows.append((f"client {c['index'] + 1} (n={c['num_samples']})", f"{c['accuracy']:.4f}", f"{c['seconds']:.1f}"))
    for name, m in metrics["methods"].items():
        rows.append((name, f"{m['accuracy']:.4f}", f"{m['seconds']:.1f}"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(r[i].ljust(width[i]) for i in range(3)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in width))
    return "\n".join(lines)


def default_out(cfg) -> Path:
    alpha = "iid" if cfg.data.alpha is None else f"{cfg.data.alpha:g}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.data.dataset.replace('/', '_')}-k{cfg.data.num_clients}-a{alpha}-s{cfg.seed}-{stamp}"


def cmd_run(args: argparse.Namespace) -> int:
    from fedmitr.pipeline import check_out_dir, run

    cfg = config_from_args(args)
    out = Path(args.out) if args.out else default_out(cfg)
    check_out_dir(out)
    printer = ProgressPrinter(quiet=args.quiet)
    result = run(cfg, out_dir=out, on_event=printer)
    printer.close()
    print(results_table(result.metrics))
    print(f"\nwrote {out / 'metrics.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "bench":
            from fedmitr.bench import cmd_bench

            return cmd_bench(args)
    except USER_ERRORS as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        print("fedmitr: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
