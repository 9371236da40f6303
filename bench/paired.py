"""Paired differences between two bigatlas variants of bench.quality's result files: each atlas and seed that
both tags ran on, the new tag's metric minus the base's, then per metric the mean, its standard error, and on how
many pairs it went up and down. The docs' "± (n of m up)" figures come from here.

    python -m bench.paired --out bench/results/pbmc.json --method bigatlas_labels --base default --new ewarm

Several --out files pool their rows (a tag's rows may live beside its base in another file); a row of the same
atlas, seed, method and tag in a later file replaces an earlier one. Prints JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .common import main
from .quality import TABLE

# the metrics bench.quality's table shows (not its seconds, which other jobs on the machine move), and the rarest
# hidden types' recall, which rows carry and the table does not
METRICS = (*(k for k, _ in TABLE if k != "train_seconds"), "heldout_rare_recall")


def add_arguments(p) -> None:
    p.add_argument("--out", nargs="+", required=True, help="bench.quality result file(s)")
    p.add_argument("--method", default="bigatlas", help="bigatlas or bigatlas_labels")
    p.add_argument("--base", default="default", help="the tag compared against")
    p.add_argument("--new", required=True, help="the tag compared")
    p.add_argument("--presets", nargs="*", default=None, help="only these atlases (default: every one both ran)")
    p.add_argument("--metrics", nargs="*", default=list(METRICS), help="metrics compared (those rows carry)")


def pooled_rows(files) -> dict:
    """(preset, seed, method, tag) -> row over the files, later files replacing earlier rows."""
    rows = {}
    for f in files:
        if not Path(f).exists():
            raise FileNotFoundError(f"{f}: no such result file")
        for r in json.loads(Path(f).read_text()).get("rows", []):
            rows[(r["preset"], r["seed"], r["method"], r.get("tag"))] = r
    return rows


def paired(rows: dict, method: str, base: str, new: str, metrics, presets=None) -> dict:
    """The pairs' differences (new − base) by atlas and seed, and per metric their mean, standard error (over
    pairs; None with one pair), count and the pairs up and down."""
    keys = sorted(
        (p, s)
        for p, s, m, t in rows
        if m == method and t == new and (p, s, m, base) in rows and (presets is None or p in presets)
    )
    if not keys:
        tags = sorted({t for _, _, m, t in rows if m == method})
        raise ValueError(f"no atlas and seed has both {method} rows {base!r} and {new!r} (its tags: {tags})")
    pairs, stats = [], {}
    for p, s in keys:
        a, b = rows[(p, s, method, base)], rows[(p, s, method, new)]
        diff = {k: round(b[k] - a[k], 4) for k in metrics if _number(a.get(k)) and _number(b.get(k))}
        pairs.append({"preset": p, "seed": s, **{k: [a[k], b[k]] for k in diff}})
        for k, d in diff.items():
            stats.setdefault(k, []).append(d)
    summary = {}
    for k in metrics:
        d = stats.get(k)
        if not d:
            continue
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else None
        summary[k] = {
            "mean": round(mean, 4), "se": None if se is None else round(se, 4), "n": len(d),
            "up": sum(x > 0 for x in d), "down": sum(x < 0 for x in d),
        }  # fmt: skip
    return {"method": method, "base": base, "new": new, "pairs": pairs, "summary": summary}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def run(args) -> dict:
    res = paired(pooled_rows(args.out), args.method, args.base, args.new, args.metrics, args.presets)
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
