"""The map's tables for the README and docs/results.md, from `fedmitr bench` records.

    .venv/bin/python scripts/map_table.py assets/bench/bench.json              # "Results in short"
    .venv/bin/python scripts/map_table.py assets/bench/bench.json --paired     # FedMITR against each method, per seed

One row per setting (tokens, where the clients start, alpha); test accuracy in %, mean ± std over
the seeds a method has there (the count in brackets where it is under 3); the best student of a row
in bold. ``--paired``: FedMITR minus each other method on the same clients, the mean and then each
seed, and how many seeds FedMITR is ahead. A cell whose seed was run in two passes on different
clients (trained again on other hardware, where float kernels differ) holds a method twice: the
means take each seed's first record (list pass A's files first), and a difference pairs only
records on the same clients (``fedmitr.bench.same_clients_pairs``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedmitr.bench import one_per_seed, same_clients_pairs

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


def by_setting(records: list[dict]) -> dict[tuple, list[dict]]:
    """(tokens, start, alpha) -> its records, every pass."""
    settings: dict[tuple, list[dict]] = {}
    for r in records:
        settings.setdefault(setting(r), []).append(r)
    return settings


def fmt(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.1f} (1)"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" + (f" ({len(values)})" if len(values) < 3 else "")


def order(key: tuple) -> tuple:
    tokens, init, alpha = key
    return (tokens, init != "scratch", alpha == "IID", alpha)


def results_table(settings: dict[tuple, list[dict]]) -> str:
    firsts = {key: one_per_seed(rows) for key, rows in settings.items()}
    methods = [m for m in STUDENTS if any(r["method"] == m for rows in firsts.values() for r in rows)]
    head = ["tokens, clients", "α", "ensemble (teacher)", *(LABELS.get(m, m) for m in methods)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sorted(settings, key=order):
        values = {m: [r["accuracy"] for r in firsts[s] if r["method"] == m] for m in ["ensemble", *methods]}
        best = max((statistics.mean(v), m) for m, v in values.items() if v and m != "ensemble")[1]
        row = [f"{s[0]}, {'from scratch' if s[1] == 'scratch' else 'pretrained'}", s[2]]
        for m in ["ensemble", *methods]:
            text = fmt(values[m]) if values[m] else "-"
            row.append(f"**{text}**" if m == best else text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def paired_table(settings: dict[tuple, list[dict]], ours: str = "fedmitr") -> str:
    others = [m for m in STUDENTS if m != ours and any(r["method"] == m for rows in settings.values() for r in rows)]
    head = ["tokens, clients", "α", *(f"{ours} − {m}" for m in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sorted(settings, key=order):
        row = [f"{s[0]}, {'from scratch' if s[1] == 'scratch' else 'pretrained'}", s[2]]
        for m in others:
            pairs = same_clients_pairs(settings[s], ours, m)
            diffs = [100 * (a["accuracy"] - b["accuracy"]) for _, (a, b) in sorted(pairs.items())]
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
    settings = by_setting(load(args.files))
    print(paired_table(settings) if args.paired else results_table(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
