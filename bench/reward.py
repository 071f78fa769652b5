"""Reward pool throughput: images per second through Ray Serve against the bare model in one process.

For the tiny open_clip model and ViT-B-32 (random weights), trajectories of SNAPSHOTS sampled steps
each, as the driver sends them: the floor is the reward model scoring the same images in batches of
``max_batch_size`` trajectories in this process (2 torch threads); the pool is one replica per
core (1 CPU, 1 torch thread each) fed every trajectory at once in requests of ``--request-size``
trajectories, merged by ``@serve.batch``; and the pool again with one image per request and per batch.
The last line is one JSON object; ``ratio`` is the lower pool / bare figure of the two models.
Run: ``.venv/bin/python bench/reward.py``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Ray starts its workers at nice 15; anything else running at nice 0 then starves them and the figure
# measures the scheduler, not this code. The benchmark runs its workers at normal priority.
sys.path.insert(0, str(ROOT))
for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost",
                   "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402

from pararl.bundle import Codecs  # noqa: E402
from pararl.formats import world_format  # noqa: E402
from pararl.image_tokenizers import PaletteCodec  # noqa: E402
from pararl.text_tokenizer import build_word_tokenizer  # noqa: E402
from reward.base import build_reward_model  # noqa: E402
from reward.config import RewardConfig, RewardModelConfig  # noqa: E402
from reward.pool.client import RewardClient  # noqa: E402
from reward.pool.service import start_reward_pool, stop_reward_pool  # noqa: E402
from reward.scorer import ScoreRequest  # noqa: E402
from reward.testing import tiny_clip  # noqa: E402

WORDS = "a red green blue yellow square circle triangle top bottom left right".split()
BATCH = 64  # trajectories per reward-model call (configs/default.yaml's reward.max_batch_size)
SNAPSHOTS = 3  # sampled steps per trajectory (the default run's s)
SECONDS = 3.0  # timed passes over all the images until this long, median (a pass of the tiny model is under a second)


def make_requests(codecs: Codecs, n: int, snapshots: int = SNAPSHOTS) -> list[ScoreRequest]:
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for k in range(n):
        codes = torch.randint(0, codecs.image_tokenizer.codebook_size, (snapshots, 16), generator=gen)
        texts = [" ".join(WORDS[w] for w in torch.randint(len(WORDS), (8,), generator=gen).tolist()) for _ in range(snapshots)]
        text = torch.tensor([codecs.encode_text(t) for t in texts])
        reqs.append(ScoreRequest(codecs.fmt.image_ids(codes), text, steps=list(range(snapshots)), key=k))
    return reqs


def timed_passes(one_pass) -> float:
    """Median images per second over passes until SECONDS have gone by (at least one)."""
    rates, start = [], time.perf_counter()
    while not rates or time.perf_counter() - start < SECONDS:
        rates.append(one_pass())
    return statistics.median(rates)


def pool_rate(cfg: RewardConfig, folder: str, requests: list[ScoreRequest]) -> float:
    """Images per second through the pool, every request in flight at once."""
    handle = start_reward_pool(cfg, folder)
    try:
        client = RewardClient(cfg, handle=handle)
        client.score_requests(requests[: 2 * cfg.request_size])  # warm-up: two requests, both replicas

        def one_pass() -> float:
            t = time.perf_counter()
            client.score_requests(requests)
            return sum(len(r.steps) for r in requests) / (time.perf_counter() - t)

        return timed_passes(one_pass)
    finally:
        stop_reward_pool()


def bare_rate(model, images: torch.Tensor, texts: list[str]) -> float:
    """Images per second of the reward model alone, in batches of BATCH trajectories, in this process."""
    torch.set_num_threads(2)
    per_call = BATCH * SNAPSHOTS
    model.score(images[:per_call], texts[:per_call])  # warm-up

    def one_pass() -> float:
        t = time.perf_counter()
        for i in range(0, len(images), per_call):
            model.score(images[i : i + per_call], texts[i : i + per_call])
        return len(images) / (time.perf_counter() - t)

    return timed_passes(one_pass)


def main() -> None:
    import argparse

    import ray
    from ray import serve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2, help="default: one per core")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="each replica's torch threads follow its CPUs")
    parser.add_argument("--request-size", type=int, default=BATCH,
                        help="trajectories per pool request (default: a batch; configs/default.yaml has 32 to spread "
                             "a step's 64 over replicas)")
    parser.add_argument("--models", default="tiny open_clip,ViT-B-32", help="comma-separated subset of the two models")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    tok = build_word_tokenizer(WORDS)
    codecs = Codecs(tok, world_format(len(tok), 8, 16), PaletteCodec(grid=(4, 4), patch=8, codebook_size=8))
    codecs.save(tmp / "codecs")
    models = {"tiny open_clip": (tiny_clip(tmp), 2048), "ViT-B-32": ({"model": "ViT-B-32"}, 2 * BATCH)}
    models = {name: models[name] for name in args.models.split(",")}
    work = {}
    for name, (kwargs, n) in models.items():
        requests = make_requests(codecs, n)
        images = codecs.decode_images(torch.cat([r.image_ids for r in requests]))
        texts = [codecs.decode_text(row) for r in requests for row in r.text_ids]
        work[name] = (requests, images, texts, bare_rate(build_reward_model("open_clip", kwargs), images, texts))
    # the same floor again with Ray and Serve's controller idling on the same 2 cores: the part of the
    # gap that is the cluster's background cost, not the pool's batching and transport
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    rows = []
    for name, (kwargs, n) in models.items():
        requests, images, texts, alone = work[name]
        bare = bare_rate(build_reward_model("open_clip", kwargs), images, texts)
        base = dict(models={"clip": RewardModelConfig("open_clip", kwargs, standardize=False)},
                    replicas=args.replicas, cpus_per_replica=args.cpus_per_replica, batch_wait_timeout_s=0.05)
        batched = pool_rate(RewardConfig(max_batch_size=BATCH, request_size=args.request_size, **base), str(tmp / "codecs"), requests)
        single = pool_rate(RewardConfig(max_batch_size=1, request_size=1, **base), str(tmp / "codecs"),
                           make_requests(codecs, max(32, n // 16), snapshots=1))
        rows.append({"model": name, "images": len(images), "bare_alone_per_s": alone, "bare_per_s": bare,
                     "pool_per_s": batched, "pool_one_per_request_per_s": single,
                     "pool_over_bare_alone": batched / alone, "pool_over_bare": batched / bare,
                     "batched_over_one_per_request": batched / single})
    ray.shutdown()
    print(f"images/s; {BATCH} trajectories of {SNAPSHOTS} snapshots per batch, {args.request_size} per request; "
          f"{args.replicas} replica(s) with {args.cpus_per_replica:g} CPUs each (as many torch threads); bare: 2 torch threads")
    print("bare alone: nothing else running; bare: the same with Ray and Serve idle on the machine")
    print(f"{'model':>15} {'bare alone':>11} {'bare':>9} {'pool':>9} {'pool/alone':>11} {'pool/bare':>10} "
          f"{'1 per req':>10} {'batched gain':>13}")
    for r in rows:
        print(f"{r['model']:>15} {r['bare_alone_per_s']:>11.1f} {r['bare_per_s']:>9.1f} {r['pool_per_s']:>9.1f} "
              f"{r['pool_over_bare_alone']:>11.3f} {r['pool_over_bare']:>10.3f} "
              f"{r['pool_one_per_request_per_s']:>10.1f} {r['batched_over_one_per_request']:>12.2f}x")
    print(json.dumps({"ratio": min(r["pool_over_bare_alone"] for r in rows),
                      "ratio_same_conditions": min(r["pool_over_bare"] for r in rows), "models": rows}))


if __name__ == "__main__":
    main()
