"""How far one judge can be trusted against another: per-sample agreement of two judges' scores.

Reads a ``pararl eval`` folder judged by both (default: ``clip`` against the world's exact ``world``
judge, on output alignment) and prints, per model and pooled, the Pearson correlation of the two
scores over the samples both judged, the point-biserial reading when the reference is 0/1 (the mean
CLIP score where the reference says yes and where it says no), and each judge's paired difference
with its 95% interval from ``eval.json``. The last line is one JSON object.
Run: ``.venv/bin/python bench/judge_agreement.py EVAL_DIR [--judge clip] [--reference world] [--score output_alignment]``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def pairs(folder: Path, judge: str, reference: str, score: str, tag: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for f in sorted((folder / "judgments" / judge / tag).glob("*.json")):
        other = folder / "judgments" / reference / tag / f.name
        a, b = json.loads(f.read_text()).get(score), json.loads(other.read_text()).get(score) if other.is_file() else None
        if a is not None and b is not None:
            xs.append(a)
            ys.append(b)
    return xs, ys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--judge", default="clip")
    parser.add_argument("--reference", default="world")
    parser.add_argument("--score", default="output_alignment")
    args = parser.parse_args()
    folder = Path(args.folder)
    result = json.loads((folder / "eval.json").read_text())
    out: dict = {"score": args.score, "judge": args.judge, "reference": args.reference, "by_model": {}}
    pooled_x, pooled_y = [], []
    for tag in result["models"]:
        xs, ys = pairs(folder, args.judge, args.reference, args.score, tag)
        pooled_x += xs
        pooled_y += ys
        yes = [x for x, y in zip(xs, ys) if y >= 0.5]
        no = [x for x, y in zip(xs, ys) if y < 0.5]
        out["by_model"][tag] = {"n": len(xs), "r": pearson(xs, ys), "judge_mean_where_reference_yes": sum(yes) / len(yes) if yes else None,
                                "judge_mean_where_reference_no": sum(no) / len(no) if no else None}
    out["pooled_r"] = pearson(pooled_x, pooled_y)
    for who in (args.judge, args.reference):
        row = result["scores"].get(f"{who}/{args.score}", {})
        out[f"{who}_difference"] = row.get("difference")
        out[f"{who}_means"] = {t: row[t]["mean"] for t in result["models"] if t in row}
    print(f"{args.judge} against {args.reference} on {args.score}, per sample:")
    for tag, row in out["by_model"].items():
        print(f"  {tag:<9} n {row['n']:>4}  r {row['r']:+.3f}  {args.judge} where {args.reference} says yes "
              f"{row['judge_mean_where_reference_yes']}, no {row['judge_mean_where_reference_no']}")
    print(f"  pooled r {out['pooled_r']:+.3f}")
    for who in (args.judge, args.reference):
        d = out[f"{who}_difference"]
        if d:
            print(f"  {who} difference (model - baseline) {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] over {d['n']} samples")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
