"""The learner's command-line entries, for ``pararl.cli`` to mount (``pararl export CHECKPOINT --out DIR``)."""
from __future__ import annotations

import argparse

EXPORT_DTYPES = ("fp32", "bf16", "fp16")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder (step-XXXXXXXX) or a run's checkpoint folder (its 'latest')")
    parser.add_argument("--out", required=True, help="new folder for config.json + sharded safetensors")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default=None, help="cast the weights (default: fp32 master weights)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB or 500MB")


def export_main(args: argparse.Namespace) -> int:
    from learner.export import export_policy
    from pararl.devices import resolve_dtype

    dtype = getattr(args, "dtype", None)
    out = export_policy(args.checkpoint, args.out, dtype=resolve_dtype(dtype) if dtype else None,
                        max_shard_size=getattr(args, "max_shard_size", "2GB"))
    print(f"exported {args.checkpoint} -> {out}")
    return 0
