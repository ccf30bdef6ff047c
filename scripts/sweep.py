"""Compare variants of the server methods on the same trained clients, to choose settings.

    python scripts/sweep.py --preset cpu-49 --alpha 0.1 --seed 0 --variants scripts/sweep-variants.json --out sweep.jsonl

The clients are trained once on the preset's data with 20% of the training split held out
(``data.evaluate_on = "validation"``), so every accuracy here is a **validation** accuracy: settings
are chosen on it, never on the test split. Each variant is a method name plus nested config
overrides of its server stages, e.g.::

    {"fedmitr keep 0.85": {"method": "fedmitr", "overrides": {"inversion": {"keep_per_stop": 0.85}}}}

One JSON line per variant is appended to ``--out`` as soon as it finishes (accuracy, curve, stage
seconds), so a sweep cut short still reports what it did.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedmitr.config import apply_overrides, load_config_file, preset_config
from fedmitr.methods import run_method
from fedmitr.pipeline import train
from fedmitr.server import ServerContext


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--config", default=None, help="YAML/JSON overrides of the preset (clients, model, ...)")
    parser.add_argument("--alpha", default="0.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", required=True, help="JSON file: name -> {method, overrides}")
    parser.add_argument("--out", required=True, help="JSON-lines file to append results to")
    args = parser.parse_args(argv)

    cfg = preset_config(args.preset)
    if args.config:
        cfg = apply_overrides(cfg, load_config_file(args.config))
    cfg = apply_overrides(cfg, {"seed": args.seed, "data": {"alpha": args.alpha, "evaluate_on": "validation"}})
    variants = json.loads(Path(args.variants).read_text())
    for name, spec in variants.items():  # check every variant before the clients train
        apply_overrides(cfg, spec.get("overrides", {})).validate()

    t0 = time.perf_counter()
    fed = train(cfg)
    base = {"preset": args.preset, "client_init": cfg.model.init, "alpha": args.alpha, "seed": args.seed,
            "client_seconds": time.perf_counter() - t0, "client_accuracy": fed.client_accuracy,
            "ensemble_accuracy": fed.ensemble.evaluate(fed.dataset.test), "patch_accuracy": fed.patch_accuracy,
            "device": str(fed.device)}
    for name, spec in variants.items():
        variant_cfg = apply_overrides(cfg, spec.get("overrides", {})).validate()
        server = ServerContext(variant_cfg, fed.dataset, fed.ensemble, fed.accelerator.device)
        result = run_method(spec["method"], server)
        record = {**base, "variant": name, "method": spec["method"], **result.to_dict()}
        with open(args.out, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"{args.preset} a={args.alpha} s={args.seed} {name}: {result.accuracy:.4f} ({result.seconds:.1f} s)",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
