"""Command line: ``fedmitr run`` (one pipeline run), ``fedmitr bench`` (a grid of runs), and sharing:
``fedmitr export``, ``push``, ``export-synthetic`` and ``eval``.

Bad input prints one line on stderr, ``fedmitr: error: <what was wrong and what is allowed>``, and
exits with code 2 before anything is written. Progress goes to stderr (a progress bar on a
terminal, plain lines in a log file); results go to stdout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

from fedmitr.catalog import DATASETS
from fedmitr.config import PRESETS, RunConfig, apply_overrides, load_config_file, parse_alpha, preset_config
from fedmitr.errors import USER_ERRORS, ConfigError, SettingError, excerpt, redact
from fedmitr.events import BenchCell, Event, Metric, Progress, StageFinished, StageStarted
from fedmitr.knobs import KNOBS, config_from_knobs
from fedmitr.methods import METHODS, headline, parse_methods
from fedmitr.rundir import RunDir, check_out_dir


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit 2 (argparse's convention)
        raise SystemExit(_fail(f"{message} (see `{self.prog} --help`)"))


def _fail(message: str) -> int:
    print(f"fedmitr: error: {redact(message)}", file=sys.stderr)
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
    run.add_argument("--quiet", action="store_true", help="no progress output, only the results table")

    bench = sub.add_parser("bench", help="compare methods over a grid of alpha and seeds",
                           description="Every method on the same trained clients, over a grid of skews and "
                                       "seeds, at equal iterations and (sparse methods) at equal wall-clock. "
                                       "Writes bench.json, bench.md and frontier-<setting>.html.")
    add_run_flags(bench)
    _add_share_commands(sub)
    _add_pretrain_command(sub)
    bench.add_argument("--alphas", default="0.1,0.3,0.5,iid", help="comma-separated skews (default: 0.1,0.3,0.5,iid)")
    bench.add_argument("--seeds", default="0,1", help="comma-separated integer seeds (default: 0,1)")
    bench.add_argument("--no-equal-time", action="store_true", help="skip the equal wall-clock reruns")
    bench.add_argument("--equal-time", default=None, metavar="METHODS",
                       help="comma-separated sparse or generator methods to rerun with dense inversion's "
                            "synthesis seconds (default: every such method that runs)")
    bench.add_argument("--out", default="bench", help="output directory (default: bench)")
    bench.add_argument("--speed-only", action="store_true",
                       help="only time dense vs sparse inversion (equal iterations and images) on one set of "
                            "trained clients, --repeats times each; writes speed.json")
    bench.add_argument("--repeats", default="3", help="timing repeats for --speed-only (default: 3)")
    bench.add_argument("--scale", default=None, metavar="KS",
                       help="only measure the cost of K clients: one run per K (e.g. 5,10,20,50), each in its own "
                            "process; writes scale.json, scale.md and scale.html with seconds per stage and peak RSS")
    bench.add_argument("--merge", nargs="+", default=None, metavar="BENCH_JSON",
                       help="only rebuild bench.md and the frontier plots in --out from existing bench.json files "
                            "(e.g. halves of a grid run in parallel); trains nothing")
    return parser


def _add_share_commands(sub) -> None:
    export = sub.add_parser("export", help="write a run's global model as a timm Hub folder with a model card",
                            description="Write RUN_DIR's global model of --method into DIR exactly as `fedmitr push` "
                                        "would upload it: timm's Hub layout (config.json, model.safetensors), the "
                                        "run's config and metrics, the accuracy curve and a model card.")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("out", metavar="DIR")
    _add_share_flags(export)

    push = sub.add_parser("push", help="push a run's global model to the Hugging Face Hub",
                          description="Export RUN_DIR's global model and push it to --repo as one commit. The token "
                                      "comes from HF_TOKEN or `hf auth login`; it is never printed.")
    push.add_argument("run_dir", metavar="RUN_DIR")
    push.add_argument("--repo", required=True, metavar="USER/NAME", help="model repo on the Hub (created if needed)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    _add_share_flags(push)

    synthetic = sub.add_parser("export-synthetic", help="save a run's synthetic images as a datasets dataset",
                               description="Save every synthetic image of --method with its label and per-patch "
                                           "density, mask, stop iteration and token label (datasets save_to_disk); "
                                           "with --repo, push it to the Hub as a dataset.")
    synthetic.add_argument("run_dir", metavar="RUN_DIR")
    synthetic.add_argument("out", metavar="DIR")
    synthetic.add_argument("--method", default=headline().name,
                           help=f"an inversion method of the run (default: {headline().name})")
    synthetic.add_argument("--repo", default=None, metavar="USER/NAME", help="also push it as a Hub dataset")
    synthetic.add_argument("--private", action="store_true", help="create the dataset repo private")

    evaluate = sub.add_parser("eval", help="test accuracy and confusion matrix of a shared checkpoint",
                              description="Load a checkpoint (hf-hub:USER/NAME or local-dir:PATH, as timm does) and "
                                          "evaluate it on a dataset's test split.")
    evaluate.add_argument("--model", required=True, metavar="REF", help="hf-hub:USER/NAME or local-dir:PATH")
    evaluate.add_argument("--dataset", default=None,
                          help=f"dataset to test on (default: the one the model was trained on): {', '.join(DATASETS)}")


def _add_pretrain_command(sub) -> None:
    pre = sub.add_parser("pretrain", help="pretrain a client backbone on drawn fractals (offline)",
                         description="Draw fractals of random iterated function systems and train the preset's "
                                     "scratch ViT on them (class token and every patch token), then write its "
                                     "backbone: the start `--init fractal` or `--init PATH` gives the clients.")
    pre.add_argument("--preset", default="cpu", help=f"whose model architecture: {', '.join(PRESETS)} (default: cpu)")
    pre.add_argument("--out", default="pretrained",
                     help="a .safetensors path, or a folder for fractal-<architecture>.safetensors (default: "
                          "pretrained/; fedmitr/bundled/pretrained/ refreshes the bundled ones)")
    for name, default, what in (("classes", 100, "fractal classes"), ("instances", 60, "images per class"),
                                ("epochs", 30, "training epochs"), ("seed", 0, "seed of the fractals and the training")):
        pre.add_argument(f"--{name}", default=str(default), help=f"{what} (default: {default})")


def _add_share_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default=headline().name,
                   help=f"whose global model: a method of the run (default: {headline().name})")
    p.add_argument("--with-clients", action="store_true", help="also include the client models under clients/")
    p.add_argument("--with-synthetic", action="store_true", help="also include the synthetic set under synthetic/")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """One flag per knob of :data:`fedmitr.knobs.KNOBS` (unset: the preset's value), and --config."""
    p.add_argument("--config", default=None,
                   help="YAML or JSON file of nested overrides, e.g. {clients: {epochs: 20}}")
    extra = {
        "preset": f" (default: cpu): {', '.join(PRESETS)}",
        "dataset": f" (default: mnist5k, bundled): {', '.join(DATASETS)}",
        "methods": f" (default: fedavg,ensemble,{headline().name}; bench: all): {', '.join(METHODS)}",
    }
    for name, knob in KNOBS.items():
        p.add_argument(f"--{name}", default="cpu" if name == "preset" else None,
                       help=knob.help + extra.get(name, " (default: the preset's)"))


def _int(flag: str, value: str, minimum: int | None = None) -> int:
    try:
        out = int(value)
    except ValueError:
        raise ConfigError(f"{flag} must be an integer (got {excerpt(value)})") from None
    if minimum is not None and out < minimum:
        raise ConfigError(f"{flag} must be >= {minimum} (got {out})")
    return out


def config_from_args(args: argparse.Namespace, default_methods: tuple[str, ...] | None = None) -> RunConfig:
    """The preset, then ``--config``, then the flags; validated. A refused flag is named as it was
    typed ("--keep must be in (0, 1] (got 1.5)"); a refused value of the --config file keeps the
    field's name, which is what the file says."""
    cfg = preset_config(args.preset)
    if args.config:
        cfg = apply_overrides(cfg, load_config_file(args.config))
    values = {name: getattr(args, name) for name in KNOBS if name != "preset" and getattr(args, name) is not None}
    if "methods" not in values and default_methods is not None:
        values["methods"] = default_methods
    try:
        return config_from_knobs(values, base=cfg)
    except SettingError as err:
        raise ConfigError(err.named(f"--{err.setting}")) from None


def parse_grid(alphas: str, seeds: str) -> tuple[list[float | None], list[int]]:
    alpha_list = [parse_alpha(a.strip()) for a in alphas.split(",") if a.strip()]
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers (got {excerpt(seeds)})") from None
    if not alpha_list or not seed_list:
        raise ConfigError("--alphas and --seeds need at least one value each")
    return alpha_list, seed_list


class ProgressPrinter:
    """Renders pipeline events on ``stream`` (stderr).

    On a terminal: a tqdm bar per stage. Elsewhere (a log file, CI): plain lines only, one when a
    stage starts, every 10% of its steps, and when it ends, so a log reads top to bottom.
    ``quiet`` drops everything; ``brief`` keeps only stage, cell and result lines (the benchmark).
    """

    def __init__(self, quiet: bool = False, brief: bool = False, stream: TextIO | None = None):
        self.quiet, self.brief = quiet, brief
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bars: dict[str, Any] = {}  # stage -> its tqdm bar (methods run side by side have one each)
        self._shown_tenth: dict[str, int] = {}

    def write(self, line: str) -> None:
        if self.bars:
            next(iter(self.bars.values())).write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        if isinstance(event, BenchCell):
            self.write(f"[bench {event.index}/{event.total}] {event.cell} seed={event.seed}")
        elif isinstance(event, StageStarted):
            self.close(event.stage)
            if not self.brief:
                self.write(f"[{event.stage}] started" + (f" ({event.info})" if event.info else ""))
                if event.total and self.tty:
                    self._bar(event.stage, event.total)
            self._shown_tenth[event.stage] = -1
        elif isinstance(event, Progress) and not self.brief:
            self._progress(event)
        elif isinstance(event, Metric):
            if self.brief and (event.step is not None or event.client is not None):
                return
            step = f" round {event.step}" if event.step is not None else ""
            self.write(f"  {event.source}{step}: {event.name} = {_shown(event.name, event.value)}")
        elif isinstance(event, StageFinished):
            self.close(event.stage)
            if not self.brief:
                self.write(f"[{event.stage}] done in {event.seconds:.1f} s")

    def _progress(self, event: Progress) -> None:
        detail = event.message + "".join(f" {k}={v:.3f}" for k, v in event.values.items())
        if self.tty and event.stage not in self.bars and event.total:
            self._bar(event.stage, event.total)  # a method's first report (side by side: no total at its start)
        bar = self.bars.get(event.stage)
        if bar is not None:
            bar.total = event.total
            bar.n = event.step
            bar.set_postfix_str(detail, refresh=False)
            bar.refresh()
            return
        tenth = int(10 * event.step / max(1, event.total))
        if tenth > self._shown_tenth.get(event.stage, -1):
            self._shown_tenth[event.stage] = tenth
            self.write(f"  {event.stage} {event.step}/{event.total} {detail}")

    def _bar(self, stage: str, total: int) -> None:
        from tqdm import tqdm

        self.bars[stage] = tqdm(total=total, desc=stage, file=self.stream, leave=False, position=len(self.bars))

    def close(self, stage: str | None = None) -> None:
        """Close the progress bar of ``stage`` (None: every bar)."""
        for name in [stage] if stage is not None else list(self.bars):
            bar = self.bars.pop(name, None)
            if bar is not None:
                bar.close()


def _shown(name: str, value: float) -> str:
    """A metric as people read it: accuracies in percent, as the app and the README show them
    (metrics.json keeps the fractions)."""
    return f"{value:.1%}" if name.endswith("accuracy") else f"{value:.4g}"


def results_table(metrics: dict[str, Any]) -> str:
    """Test accuracy (in percent) and seconds of every client and method, one row each."""
    rows = [("method", "accuracy", "seconds")]
    for c in metrics["clients"]:
        rows.append((f"client {c['index'] + 1} (n={c['num_samples']})", f"{c['accuracy']:.1%}", f"{c['seconds']:.1f}"))
    for name, m in metrics["methods"].items():
        rows.append((name, f"{m['accuracy']:.1%}", f"{m['seconds']:.1f}"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(r[i].ljust(width[i]) for i in range(3)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in width))
    return "\n".join(lines)


def default_out(cfg: RunConfig) -> Path:
    alpha = "iid" if cfg.data.alpha is None else f"{cfg.data.alpha:g}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.data.dataset.replace('/', '_')}-k{cfg.data.num_clients}-a{alpha}-s{cfg.seed}-{stamp}"


def check_data(cfg: RunConfig) -> None:
    """What the data of ``cfg`` can be checked for before torch is imported (in a fraction of a
    second): a bundled dataset's client split is drawn from its labels, as the run will draw it; a
    Hub dataset is refused at once when the Hub is off or out of reach and nothing is cached."""
    from fedmitr.catalog import is_hub_dataset

    if is_hub_dataset(cfg.data.dataset):
        from fedmitr.online import require_hub_dataset

        require_hub_dataset(cfg.data.dataset)
    else:
        from fedmitr.partition import check_split

        check_split(cfg)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # every argument is checked before torch is imported,
    check_data(cfg)  # and the data as far as it can be without it
    out = check_out_dir(Path(args.out) if args.out else default_out(cfg))

    from fedmitr.pipeline import run
    from fedmitr.runtime import end_processes, launched_processes

    # Under torchrun / accelerate launch every process runs this; only the main one reports.
    main_process = int(os.environ.get("RANK", "0") or 0) == 0
    printer = ProgressPrinter(quiet=args.quiet or not main_process)
    result = run(cfg, out_dir=RunDir(out), on_event=printer)  # `out` was checked above, before any work
    printer.close()
    end_processes()
    if main_process:
        print(results_table(result.metrics))
        processes = launched_processes()
        print(f"\nwrote {out / 'metrics.json'}" + (f" ({processes} processes)" if processes > 1 else ""))
    return 0


def cmd_bench(args: argparse.Namespace, command: str) -> int:
    import json

    if args.merge:
        from fedmitr import bench

        print(bench.merge(args.merge, args.out, "fedmitr bench (merged: " + " ".join(args.merge) + ")"))
        return 0
    # Every argument is checked before torch is imported.
    if args.scale is not None:
        ks = [_int("--scale", k.strip(), minimum=2) for k in args.scale.split(",") if k.strip()]
        if not ks:
            raise ConfigError("--scale needs numbers of clients, e.g. 5,10,20,50")
        cfg = config_from_args(args)
        check_out_dir(args.out)
        from fedmitr import bench

        records = bench.scale(cfg, ks, args.out, ProgressPrinter(brief=True))
        print(bench.scale_table(records))
        return 0
    cfg = config_from_args(args, default_methods=tuple(METHODS))
    check_out_dir(args.out)
    printer = ProgressPrinter(brief=True)
    if args.speed_only:
        repeats = _int("--repeats", args.repeats, minimum=1)
        from fedmitr import bench

        result = bench.inversion_speed(cfg, repeats, printer)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps(result, indent=2))
        print(f"inversion of {result['images']} images x {result['iterations']} iterations on {result['device']}: "
              f"dense {result['dense_mean']:.2f} s, sparse {result['sparse_mean']:.2f} s "
              f"({result['active_patches_at_end']}/{result['patches']} patches active at the end), "
              f"inversion_speedup {result['inversion_speedup']:.2f}x")
        return 0
    alphas, seeds = parse_grid(args.alphas, args.seeds)
    equal_time: bool | tuple[str, ...] = not args.no_equal_time
    if args.equal_time is not None and equal_time:
        equal_time = parse_methods(args.equal_time)
        sparse = [m for m in cfg.methods if METHODS[m].sparse or METHODS[m].generative]
        wrong = [m for m in equal_time if m not in sparse]
        if wrong:
            raise ConfigError(f"--equal-time takes sparse or generator methods that run ({', '.join(sparse) or 'none'}); "
                              f"not {', '.join(excerpt(m) for m in wrong[:3])}")
    from fedmitr import bench

    print(bench.run_bench(cfg, alphas, seeds, args.out, equal_time=equal_time, command=command, on_event=printer))
    return 0


def cmd_share(args: argparse.Namespace) -> int:
    from fedmitr import hub

    if args.command == "export":
        out = hub.export(args.run_dir, args.out, method=args.method, include_clients=args.with_clients,
                         include_synthetic=args.with_synthetic)
        print(f"wrote {out} (load it with timm.create_model('local-dir:{out}', pretrained=True))")
    elif args.command == "push":
        url = hub.push(args.run_dir, args.repo, private=args.private, method=args.method,
                       include_clients=args.with_clients, include_synthetic=args.with_synthetic)
        print(f"pushed {args.method} to {url}")
    elif args.command == "export-synthetic":
        where = hub.export_synthetic(args.run_dir, args.out, method=args.method, repo_id=args.repo,
                                     private=args.private)
        print(f"wrote {where}")
    else:
        model, info = hub.load(args.model)
        trained_on = info.get("dataset", {}).get("name")
        dataset = args.dataset or trained_on
        if not dataset:
            raise ConfigError("this checkpoint does not say which dataset it was trained on; pass --dataset")
        if trained_on and dataset != trained_on:
            print(f"fedmitr: warning: this model was trained on {trained_on}; its accuracy on {dataset} says little "
                  f"about it (other images, other classes)", file=sys.stderr)
        result = hub.evaluate_checkpoint(model, dataset, info.get("aux_head"))
        if "vote_accuracy" in result:
            print(f"{result['dataset']}: test accuracy {result['vote_accuracy']:.1%} on {result['num_test']} images "
                  f"with fedmitr's vote (class token + {result['vote']:g} x the aux head's max over patch tokens); "
                  f"{result['accuracy']:.1%} with the class token alone, as timm predicts\n")
        else:
            print(f"{result['dataset']}: test accuracy {result['accuracy']:.1%} on {result['num_test']} images\n")
        print(confusion_table(result["confusion"], result["class_names"]))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = preset_config(args.preset)
    recipe = {name: _int(f"--{name}", getattr(args, name), minimum=0 if name == "seed" else 1)
              for name in ("classes", "instances", "epochs", "seed")}
    from fedmitr.pretrain import PretrainConfig, pretrain, save_backbone

    if cfg.model.arch != "scratch":
        raise ConfigError(f"the {args.preset} preset uses timm's {cfg.model.arch}, which has its own weights; "
                          f"pretrain a scratch preset (tiny, cpu, cpu-49)")
    from fedmitr.data import open_dataset

    ds = open_dataset(cfg.data.dataset, 10, 10)  # only its image size and channels
    started = time.perf_counter()
    backbone = pretrain(cfg.model, PretrainConfig(**recipe).validate(), image_size=ds.image_size, channels=ds.channels,
                        on_progress=lambda stage, i, n: print(f"  {stage} {i}/{n}", file=sys.stderr, flush=True)
                        if i == n or stage == "train" else None)
    path = save_backbone(backbone, args.out)
    r = backbone.record
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - started:.0f} s "
          f"(drawing {r['draw_seconds']} s, training {r['train_seconds']} s, {r['threads']} threads); held-out fractals: "
          f"image accuracy {r['held_out_image_accuracy']:.1%}, patch accuracy {r['held_out_patch_accuracy']:.1%}")
    return 0


def confusion_table(confusion: list[list[int]], names: list[str]) -> str:
    """Rows: the true class; columns: the predicted class."""
    width = max(4, *(len(n) for n in names), *(len(str(v)) for row in confusion for v in row))
    lines = ["true\\pred " + " ".join(n.rjust(width) for n in names)]
    for name, row in zip(names, confusion):
        lines.append(name.rjust(10) + " " + " ".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "pretrain":
            return cmd_pretrain(args)
        if args.command in ("export", "push", "export-synthetic", "eval"):
            return cmd_share(args)
        return cmd_bench(args, command="fedmitr " + shlex.join(argv))
    except USER_ERRORS as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        print("fedmitr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
