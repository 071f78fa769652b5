"""``pararl plan --flops`` on every 8B config: per-actor GPU memory measured on fake tensors beside
``cluster.memory``'s estimate, FLOPs per trajectory against the released generator, GPU-hours per 100
steps. The released layouts' config.json files (LLaDA-8B, 134,656 ids) are written to a temporary
folder; no weights are read. Run from the repository root: ``python bench/plan.py``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.plan.command import plan_main  # noqa: E402 -- after the path above
from cluster.run_config import load_run_config  # noqa: E402
from pararl.testing import PLAN_8B_CONFIGS, write_8b_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.35)
    parser.add_argument("--only", help="one config path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for config in PLAN_8B_CONFIGS:
            if args.only and args.only != config:
                continue
            preset = load_run_config(str(ROOT / config)).sampler.preset
            print(f"\n## {config}\n", flush=True)
            plan_main(argparse.Namespace(config=str(ROOT / config), overrides=[f"model={write_8b_config(Path(tmp) / preset, preset)}"],
                                         gpu_memory_gb=80.0, flops=True, mfu=args.mfu, json=None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
