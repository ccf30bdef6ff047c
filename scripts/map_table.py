"""The map's tables for the README and docs/results.md, from `fedmitr bench` records.

    python scripts/map_table.py assets/bench/bench.json              # "Results in short"
    python scripts/map_table.py assets/bench/bench.json --paired     # FedMITR against each method, per seed

One row per setting (tokens, where the clients start, alpha); test accuracy in %, mean ± std over
the seeds a method has there (the count in brackets where it is under 3); the best student of a row
in bold. ``--paired``: FedMITR minus each other method on the same clients, the mean and then each
seed, and how many seeds FedMITR is ahead. Records of one cell that were run in two passes (the
map's pass A and pass B) must hold the same clients: the script refuses cells whose clients'
accuracies differ between the passes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

STUDENTS = ("dense-kd", "sparse-kd", "fedmitr-unweighted", "fedmitr", "dense-gen", "co-boosting")
LABELS = {"dense-gen": "dense-gen (DENSE)", "co-boosting": "co-boosting (Co-Boosting)", "fedmitr": "**fedmitr**"}
TOKENS = {"cpu": 16, "cpu-49": 49}


def load(paths: list[str]) -> list[dict]:
    records = []
    for p in paths:
        records.extend(json.loads(Path(p).read_text())["records"])
    return records


def setting(r: dict) -> tuple:
    alpha = "IID" if r["alpha"] is None or r["alpha"] == "iid" else f"{float(r['alpha']):g}"
    preset = r["setting"].split(" ")[0]
    return TOKENS.get(preset, preset), r.get("client_init", "scratch"), alpha


def by_cell(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(setting, seed) -> method -> record; refuses a cell whose passes trained different clients."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in records:
        cell = cells.setdefault((*setting(r), r["seed"]), {})
        for other in cell.values():
            if [round(a, 6) for a in other["client_accuracy"]] != [round(a, 6) for a in r["client_accuracy"]]:
                sys.exit(f"cell {setting(r)} seed {r['seed']}: {r['method']} and {other['method']} were run on "
                         f"different clients; rerun one pass")
        cell[r["method"]] = r
    return cells


def fmt(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.1f} (1)"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" + (f" ({len(values)})" if len(values) < 3 else "")


def order(key: tuple) -> tuple:
    tokens, init, alpha = key
    return (tokens, init != "scratch", alpha == "IID", alpha)


def results_table(cells: dict[tuple, dict[str, dict]]) -> str:
    settings = sorted({c[:3] for c in cells}, key=order)
    methods = [m for m in STUDENTS if any(m in ms for ms in cells.values())]
    head = ["tokens, clients", "α", "ensemble (teacher)", *(LABELS.get(m, m) for m in methods)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in settings:
        seeds = {c[3]: ms for c, ms in cells.items() if c[:3] == s}
        values = {m: [ms[m]["accuracy"] for ms in seeds.values() if m in ms] for m in ["ensemble", *methods]}
        best = max((statistics.mean(v), m) for m, v in values.items() if v and m != "ensemble")[1]
        row = [f"{s[0]}, {'from scratch' if s[1] == 'scratch' else 'pretrained'}", s[2]]
        for m in ["ensemble", *methods]:
            text = fmt(values[m]) if values[m] else "-"
            row.append(f"**{text}**" if m == best else text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def paired_table(cells: dict[tuple, dict[str, dict]], ours: str = "fedmitr") -> str:
    settings = sorted({c[:3] for c in cells}, key=order)
    others = [m for m in STUDENTS if m != ours and any(m in ms for ms in cells.values())]
    head = ["tokens, clients", "α", *(f"{ours} − {m}" for m in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in settings:
        row = [f"{s[0]}, {'from scratch' if s[1] == 'scratch' else 'pretrained'}", s[2]]
        for m in others:
            diffs = [100 * (ms[ours]["accuracy"] - ms[m]["accuracy"])
                     for c, ms in sorted(cells.items()) if c[:3] == s and ours in ms and m in ms]
            if not diffs:
                row.append("-")
                continue
            ahead = sum(d > 0 for d in diffs)
            row.append(f"{statistics.mean(diffs):+.1f} ({', '.join(f'{d:+.1f}' for d in diffs)}; "
                       f"{ahead}/{len(diffs)} ahead)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="bench.json files (e.g. assets/bench/bench.json)")
    parser.add_argument("--paired", action="store_true", help="FedMITR minus each method, per seed")
    args = parser.parse_args(argv)
    cells = by_cell(load(args.files))
    print(paired_table(cells) if args.paired else results_table(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
