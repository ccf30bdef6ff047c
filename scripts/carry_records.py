"""Carry records of methods a change of defaults did not touch from an earlier map into new cells.

    python scripts/carry_records.py --earlier assets/bench/bench.json \
        --methods dense-kd,fedmitr=fedmitr-keptview bench/*/bench.json

Dense inversion has no stopped patch to fill or hide, and the earlier default fixes its own fill and
view, so on the same clients their records are what a rerun gives. A record is carried only into
the cell of the same setting, alpha and seed whose clients are the same, checked by every client's
accuracy (equal to the last digit). Where a new cell ran the method itself, the two are compared
instead and the script says whether they agree; nothing is carried there. Carried records say so
(``"carried_from"``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--earlier", required=True, help="bench.json of the earlier map")
    parser.add_argument("--methods", required=True, help="OLD[=NEW],...: methods to carry (renamed to NEW)")
    parser.add_argument("cells", nargs="+", help="bench.json of each new cell (rewritten in place)")
    args = parser.parse_args(argv)
    names = dict((p.split("=") + p.split("="))[:2] for p in args.methods.split(","))
    earlier = json.loads(Path(args.earlier).read_text())["records"]
    status = 0
    for path in map(Path, args.cells):
        data = json.loads(path.read_text())
        records = data["records"]
        cell = records[0]
        key = (cell["setting"], cell["alpha"], cell["seed"])
        old = [r for r in earlier if (r["setting"], r["alpha"], r["seed"]) == key]
        if not old or old[0]["client_accuracy"] != cell["client_accuracy"]:
            print(f"{path}: no earlier cell with the same clients; nothing carried", file=sys.stderr)
            status = 1
            continue
        have = {r["method"]: r for r in records}
        for src, dst in names.items():
            found = [r for r in old if r["method"] == src and r.get("budget", "iterations") == "iterations"]
            if not found:
                continue
            if dst in have:  # ran here too: the check that carrying is sound
                same = have[dst]["curve"] == found[0]["curve"]
                print(f"{path}: {dst} reruns {'exactly' if same else 'DIFFERENTLY'} "
                      f"({have[dst]['accuracy']:.4f} against {found[0]['accuracy']:.4f})", file=sys.stderr)
                status |= 0 if same else 1
                continue
            records.append({**found[0], "method": dst, "carried_from": f"{args.earlier} ({src})"})
            print(f"{path}: carried {src} as {dst}", file=sys.stderr)
        path.write_text(json.dumps(data, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
