"""Weight sync: seconds to move a ~100M-parameter policy from learner rank 0 into 2 rollout workers.

Also, one new version of the same policy as LoRA adapters (rank 16: the bytes sent against the
full policy's) and colocated (``cluster.colocate``: the sampler reads the learner's own weights).

Timed from the start of the export to both workers confirming the load into their live model (warm
repeats, median), against the floor: the bytes delivered (model size x 2 workers) divided by this
machine's warm memcpy bandwidth, measured in the same run right before each timed sync (the
bandwidth drifts; see ``Memcpy``). The last line is one JSON object whose ``ratio`` is sync time /
floor (target <= 3), with the ratios against the pre-Ray and the highest readings beside it. Run: ``.venv/bin/python bench/sync.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Ray starts its workers at nice 15; anything else running at nice 0 then starves them and the figure
# measures the scheduler, not this code. The benchmark runs its workers at normal priority.
sys.path.insert(0, str(ROOT))
for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost",
                   "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0",
                   "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                   "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(key, value)

import ray  # noqa: E402
import torch  # noqa: E402

from cluster.colocated import ColocatedActor  # noqa: E402
from cluster.config import ClusterConfig, sync_bucket_bytes  # noqa: E402
from cluster.learner_group import LearnerActor, LearnerGroup  # noqa: E402
from cluster.placement import start_ray  # noqa: E402
from cluster.rollout_group import RolloutGroup  # noqa: E402
from cluster.weight_sync import build_weight_sync  # noqa: E402
from learner.config import LearnerConfig  # noqa: E402
from pararl.bundle import ModelBundle  # noqa: E402
from pararl.formats import world_format  # noqa: E402
from pararl.image_tokenizers import PaletteCodec  # noqa: E402
from pararl.lora import AdapterConfig  # noqa: E402
from pararl.models import LLaDAConfig, build_policy  # noqa: E402
from pararl.text_tokenizer import build_word_tokenizer  # noqa: E402
from rollout.config import SamplerConfig  # noqa: E402

REPEATS = 11
WARMUP = 8  # each worker faults in the object-store pages of every region the allocator cycles through


class Memcpy:
    """This machine's warm memcpy bandwidth, over buffers of the model's size.

    On this VM the figure drifts by up to 2x within a minute (13-38 GB/s: the host's memory traffic),
    so one reading taken before the syncs says little about the bandwidth the syncs had. The bench
    reads it before Ray starts (the quiet machine) and again right before every timed sync (paired).
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # warm: both buffers faulted in

    def bandwidth(self, repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            self.dst.copy_(self.src)
            times.append(time.perf_counter() - t)
        return self.nbytes / statistics.median(times)


def sync_seconds(sync, first_version: int, memcpy: Memcpy | None = None) -> tuple[list[float], list[float]]:
    """Warm-up broadcasts, then the timed ones (and the memcpy bandwidth read right before each)."""
    for v in range(first_version, first_version + WARMUP):  # warm: steady state, as in a run of hundreds of syncs
        sync.broadcast(v)
    times, paired = [], []
    for v in range(first_version + WARMUP, first_version + WARMUP + REPEATS):
        if memcpy is not None:
            paired.append(memcpy.bandwidth())
        times.append(sync.broadcast(v).seconds)
    return times, paired


def measure(cluster: ClusterConfig, model: Path, fmt, learner: LearnerConfig, colocated: bool = False,
            memcpy: Memcpy | None = None) -> dict:
    """Median seconds of a new policy version reaching the rollout workers, and its bytes; the workers
    then hold exactly the learner's weights."""
    transport = "colocated" if colocated else cluster.sync_transport
    sync = build_weight_sync(transport, bucket_bytes=sync_bucket_bytes(cluster), timeout_s=cluster.call_timeout_s)
    ranks = cluster.learner_ranks
    learners = LearnerGroup(learner, model, fmt, world=ranks, num_cpus=1,
                            actor_class=ColocatedActor if colocated else LearnerActor)
    rollouts = RolloutGroup(cluster, str(model), SamplerConfig(steps=4, text_len=8), None, sync, fmt.pad_id,
                            colocated=learners.group if colocated else None, adapters=learner.lora)
    sync.connect(learners.actors, rollouts.workers)
    times, paired = sync_seconds(sync, 1, memcpy)
    assert len(set(rollouts.hashes() + learners.weights_hashes())) == 1, "sync did not deliver the learner's weights"
    out = {"seconds": statistics.median(times), "repeats": times, "paired": paired,
           "bytes": 0 if colocated else learners.sync_bytes()}
    rollouts.shutdown()
    learners.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket-mb", type=float, default=ClusterConfig.sync_bucket_mb)
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads per rollout worker (the copy into the live model)")
    parser.add_argument("--object-store-mb", type=int, default=2048,
                        help="local object store, preallocated (cluster.preallocate_object_store); 0: Ray's default, not preallocated")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    tok = build_word_tokenizer([f"w{i}" for i in range(7000)])
    fmt = world_format(len(tok), 8, 16)
    config = LLaDAConfig(d_model=768, n_heads=12, n_layers=12, mlp_hidden_size=2048, vocab_size=fmt.vocab_size,
                         embedding_size=fmt.vocab_size, mask_token_id=fmt.mask_id)
    policy = build_policy(config)
    params = sum(p.numel() for p in policy.parameters())
    model_bytes = sum(t.numel() * t.element_size() for t in policy.state_dict().values())
    ModelBundle(tok, fmt, PaletteCodec(grid=(4, 4), patch=8, codebook_size=8), policy).save(tmp / "model")
    del policy
    memcpy = Memcpy(model_bytes)
    quiet = memcpy.bandwidth(REPEATS)  # before Ray starts

    cluster = ClusterConfig(rollout_workers=2, rollout_cpus=1, rollout_threads=args.worker_threads, call_timeout_s=600, num_cpus=4,
                            object_store_mb=args.object_store_mb or None, preallocate_object_store=args.object_store_mb > 0,
                            sync_bucket_mb=args.bucket_mb)
    start_ray(cluster)
    full = LearnerConfig(zero_stage=0, beta=0.0)
    store = measure(cluster, tmp / "model", fmt, full, memcpy=memcpy)
    lora = measure(cluster, tmp / "model", fmt, replace(full, lora=AdapterConfig(enabled=True)))
    colocated = measure(replace(cluster, colocate=True, rollout_workers=1, learner_ranks=1), tmp / "model", fmt, full,
                        colocated=True)
    ray.shutdown()

    median, times, paired = store["seconds"], store["repeats"], store["paired"]
    bandwidth = statistics.median(paired)
    floor, quiet_floor, strict_floor = (2 * model_bytes / bw for bw in (bandwidth, quiet, max(paired + [quiet])))
    store_kind = f"{args.object_store_mb} MiB preallocated" if args.object_store_mb else "Ray's default, not preallocated"
    print(f"model {params / 1e6:.1f}M params, {model_bytes / 2**20:.0f} MiB fp32; 2 rollout workers; "
          f"bucket {cluster.sync_bucket_mb} MiB; object store {store_kind}")
    print("floor: 2 x model bytes / memcpy bandwidth; paired: read before each timed sync (median); "
          "quiet: before Ray started; strict: the highest reading")
    print(f"{'floor':>7} {'memcpy GB/s':>12} {'floor s':>8} {'sync s (median)':>16} {'ratio':>6}")
    for label, bw, fl in (("paired", bandwidth, floor), ("quiet", quiet, quiet_floor), ("strict", max(paired + [quiet]), strict_floor)):
        print(f"{label:>7} {bw / 1e9:>12.2f} {fl:>8.3f} {median:>16.3f} {median / fl:>6.2f}")
    print(f"\n{'one new version':<34} {'s (median)':>10} {'bytes sent':>12}")
    for label, m in (("object store, full policy", store), ("object store, LoRA adapters (r 16)", lora),
                     ("colocated (in place)", colocated)):
        print(f"{label:<34} {m['seconds']:>10.4f} {m['bytes']:>12,}")
    print(json.dumps({"ratio": median / floor, "ratio_quiet_floor": median / quiet_floor, "ratio_strict_floor": median / strict_floor,
                      "seconds": median, "floor_seconds": floor, "repeats": times,
                      "memcpy_bytes_per_s": bandwidth, "memcpy_paired_bytes_per_s": paired, "memcpy_quiet_bytes_per_s": quiet,
                      "bucket_mb": cluster.sync_bucket_mb, "object_store_mb": args.object_store_mb,
                      "params": params, "model_bytes": model_bytes,
                      "colocated": {"seconds": colocated["seconds"], "speedup": median / colocated["seconds"]},
                      "lora": {"seconds": lora["seconds"], "bytes": lora["bytes"], "full_bytes": store["bytes"],
                               "bytes_fraction": lora["bytes"] / store["bytes"]}}))


if __name__ == "__main__":
    main()
