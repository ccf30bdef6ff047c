"""Tables of a validation sweep (the JSON lines `scripts/sweep.py` writes), for docs/results.md.

    python scripts/sweep_table.py assets/bench/validation/relabel-classes.jsonl --against sparse-kd

Per variant: its validation accuracy in every cell (preset, alpha, seed), the mean over the cells
every variant ran, the paired difference to ``--against`` on the same clients, and, where the run
read them, the aux head alone (max over tokens), the class token alone and the best vote's lambda.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def cell(r: dict) -> tuple:
    return (r["preset"], r.get("client_init", "scratch"), str(r["alpha"]), r["seed"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--against", default="sparse-kd", help="the variant paired differences are taken against")
    parser.add_argument("--key", default="accuracy", help="the record's field to tabulate (accuracy, cls_accuracy)")
    args = parser.parse_args(argv)
    records = [json.loads(line) for f in args.files for line in Path(f).read_text().splitlines() if line.strip()]
    by = {(r["variant"], cell(r)): r for r in records}
    variants = list(dict.fromkeys(r["variant"] for r in records))
    cells = sorted({cell(r) for r in records}, key=lambda c: (c[0], c[1], float(c[2]) if c[2] != "iid" else 1e9, c[3]))
    names = [f"{p}{'/' + i if i != 'scratch' else ''} α{a} s{s}" for p, i, a, s in cells]
    print(f"Validation accuracy in % ({args.key}); mean over the cells each variant ran (how many); "
          f"paired: the mean difference to {args.against} on the same clients.\n")
    print("| variant | " + " | ".join(names) + " | mean | paired | aux alone (max) | vote's best λ |")
    print("|---|" + "---|" * (len(cells) + 4))
    for v in variants:
        row = [f"{100 * by[(v, c)][args.key]:.1f}" if (v, c) in by and by[(v, c)].get(args.key) is not None else "–"
               for c in cells]
        mine = [by[(v, c)][args.key] for c in cells if (v, c) in by and by[(v, c)].get(args.key) is not None]
        mean = f"{100 * statistics.mean(mine):.1f} ({len(mine)})" if mine else "–"
        pairs = [100 * (by[(v, c)][args.key] - by[(args.against, c)]["accuracy"]) for c in cells
                 if (v, c) in by and (args.against, c) in by and by[(v, c)].get(args.key) is not None]
        paired = f"{statistics.mean(pairs):+.1f} ({sum(p > 0 for p in pairs)}/{len(pairs)} up)" if pairs else "–"
        aux = [by[(v, c)]["aux_accuracy"]["max"] for c in cells if (v, c) in by and by[(v, c)].get("aux_accuracy")]
        votes: dict[str, list[float]] = {}
        for c in cells:
            for lam, acc in (by[(v, c)].get("vote_accuracy") or {}).items() if (v, c) in by else ():
                votes.setdefault(lam, []).append(acc)
        best = max(votes.items(), key=lambda kv: statistics.mean(kv[1])) if votes else None
        print(f"| {v} | " + " | ".join(row) + f" | {mean} | {paired} | "
              + (f"{100 * statistics.mean(aux):.1f}" if aux else "–") + " | "
              + (f"{best[0]}: {100 * statistics.mean(best[1]):.1f}" if best else "–") + " |")
    print("\nThe paper's gradient claims, mean over the cells each variant ran: the student's minibatch gradient "
          "variance relative to the mean gradient's squared norm (KD alone / KD + token loss), and the spread "
          "(std / mean across iterations after the last stop) of the inversion's pixel-gradient norm.\n")
    print("| variant | cells | gradient variance, KD | KD + token | inversion gradient spread |")
    print("|---|---|---|---|---|")
    for v in variants:
        grads = [by[(v, c)].get("gradient_variance") or {} for c in cells if (v, c) in by]
        kd = [g["distill"]["kd"]["relative"] for g in grads if "distill" in g]
        both = [g["distill"]["kd+token"]["relative"] for g in grads if "kd+token" in g.get("distill", {})]
        spread = [g["inversion"]["over_iterations"] for g in grads if "inversion" in g]

        def fmt(values: list[float]) -> str:
            return f"{statistics.mean(values):.3f}" if values else "–"

        print(f"| {v} | {len(grads)} | {fmt(kd)} | {fmt(both)} | {fmt(spread)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
