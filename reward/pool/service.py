"""The reward pool: a Ray Serve deployment whose replicas are the reward actors.

``@serve.batch`` gathers requests from every rollout worker into batches of up to ``max_batch_size``
trajectories, so a CLIP forward always sees a full batch however the work was split upstream. The
replica's event loop stays free while a batch is scored (on the replica's one torch thread), so
health checks and the next batch's requests are not held up. Requests go to the replica with the
fewest in flight (``reward.pool.routing``). An optional HTTP route, protected by a bearer token,
serves raw scores to other machines (the ``remote`` reward backend).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import torch
from ray import serve
from ray.serve.config import RequestRouterConfig

from pararl.bundle import load_codecs
from pararl.errors import ConfigError, RunError
from reward.config import RewardConfig, RewardHttpConfig, check_reward_config
from reward.messages import ChunkResult, ScoreChunk, TooLarge, decode_images
from reward.pool.routing import LeastLoadedRouter
from reward.scorer import SemanticScorer
from reward.stats import RewardStatsError

APP_NAME = "pararl-reward"


def trajectory_count(chunks: list[ScoreChunk]) -> int:
    """A batch's size is its trajectories, not its requests (each request carries a chunk)."""
    return sum(len(chunk) for chunk in chunks)


@serve.deployment
class RewardReplica:
    def __init__(self, model_folder: str, cfg: RewardConfig, http_token: str | None,
                 named_format: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        # One thread owns every torch call of the replica, the model's construction included: torch
        # work split between Serve's threads gives each its own OpenMP team, and the same CLIP batch
        # then took 21-25 ms instead of 16-19 ms (tiny open_clip, 2 threads).
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-torch")
        self.scorer = self.torch_thread.submit(self._build_scorer, model_folder, named_format).result()
        self.score.set_max_batch_size(self.cfg.max_batch_size)
        self.score.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.http_token, self.http = http_token, cfg.http
        self.node = ray.util.get_node_ip_address()

    def _build_scorer(self, model_folder: str, named_format: dict[str, Any] | None) -> SemanticScorer:
        torch.set_num_threads(max(1, int(self.cfg.cpus_per_replica)))  # a replica's threads follow its CPUs
        return SemanticScorer(load_codecs(model_folder, named_format), self.cfg)

    async def _on_torch_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.torch_thread, fn, *args)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=trajectory_count)
    async def score(self, chunks: list[ScoreChunk]) -> list[ChunkResult]:
        """One scoring pass over every trajectory of the merged requests, answered per request."""
        results = await self._on_torch_thread(self.scorer.score_chunks, chunks)
        for result in results:
            result.node = self.node
        return results

    def identities(self) -> dict[str, str]:
        return {label: m.identity for label, m in self.scorer.models.items()}

    def pid(self) -> int:
        return os.getpid()

    async def __call__(self, request: Any) -> Any:
        """HTTP: ``POST {"images": <npy base64>, "texts": [...]}`` with ``Authorization: Bearer TOKEN``.

        401 for a missing or wrong token (compared in constant time), 413 for a body, an image count
        or an image side above the configured limits (the body is never read past its limit), 400 for
        any other malformed body; a request this route refuses never reaches the reward model.
        """
        from starlette.responses import JSONResponse

        given = request.headers.get("authorization", "")
        if not self.http_token or not hmac.compare_digest(given.encode(), f"Bearer {self.http_token}".encode()):
            return JSONResponse({"error": "missing or wrong token"}, status_code=401)
        try:
            images, texts = parse_http_request(await read_capped(request, int(self.http.max_body_mb * 2**20)), self.http)
        except TooLarge as err:
            return JSONResponse({"error": f"request too large: {err}"}, status_code=413)
        except (ValueError, KeyError, TypeError, EOFError, OSError) as err:
            return JSONResponse({"error": f"bad request: {err}"}, status_code=400)
        scores = await self._on_torch_thread(self.scorer.raw_scores, images, texts) if texts else {}
        return JSONResponse({
            "identities": self.identities(),
            "scores": {label: s.tolist() for label, s in scores.items()},
        })


async def read_capped(request: Any, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed ``limit`` bytes (by its header, or while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"{int(declared)} bytes, the limit is {limit} (reward.http.max_body_mb)")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise TooLarge(f"more than {limit} bytes (reward.http.max_body_mb)")
    return bytes(body)


def parse_http_request(raw: bytes, limits: RewardHttpConfig) -> tuple[torch.Tensor, list[str]]:
    """(images [N, 3, H, W], N texts) from a request body, or the reason it is refused."""
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError(f"the body must be a JSON object with images and texts, got a {type(body).__name__}")
    texts = body.get("texts", [])
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of strings")
    if len(texts) > limits.max_images:
        raise TooLarge(f"{len(texts)} texts, the limit is {limits.max_images} (reward.http.max_images)")
    if not texts:
        return torch.zeros(0, 3, 1, 1), []
    if not isinstance(body.get("images"), str):
        raise ValueError("images must be a base64 string of an .npy uint8 array [N, 3, H, W]")
    images = decode_images(body["images"], max_side=limits.max_image_side)
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images for {len(texts)} texts")
    return images, texts


def resolve_token(cfg: RewardConfig) -> str | None:
    if not cfg.http.enabled:
        return None
    token = cfg.http.token or os.environ.get(cfg.http.token_env)
    if not token:
        raise ConfigError(f"reward.http.enabled is true but no token is set (reward.http.token or ${cfg.http.token_env})")
    return token


def start_reward_pool(cfg: RewardConfig, model_folder: str,
                      named_format: dict[str, Any] | None = None) -> serve.handle.DeploymentHandle:
    """Deploy the pool into the running Ray; returns the handle rollout workers and the driver call."""
    check_reward_config(cfg)
    token = resolve_token(cfg)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's progress lines, not a run's
    quiet = {"log_level": "WARNING"}  # the controller's and replicas' own: their warnings still reach the driver
    if cfg.http.enabled:
        serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port}, logging_config=quiet)
    else:
        serve.start(proxy_location="Disabled", logging_config=quiet)
    replica = RewardReplica.options(
        num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica,
                           "resources": dict(cfg.resources_per_replica)},
        # the concurrency limit must let a full batch form; when every slot is taken Serve's router
        # backs off before it retries, so the queue belongs in the replica (checked by check_reward_config)
        max_ongoing_requests=cfg.max_ongoing_requests,
        # one access-log line per request costs the replica a file write under the GIL, per request
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
        request_router_config=RequestRouterConfig(request_router_class=LeastLoadedRouter),
    )
    app = replica.bind(str(model_folder), cfg, token, named_format)
    try:
        return serve.run(app, name=APP_NAME, route_prefix=cfg.http.route if cfg.http.enabled else None)
    except RuntimeError as err:
        why = replica_error()
        if "RewardStatsError: " in why:  # the user's stats file, not the pool: one line, as the check says it
            raise RewardStatsError(why.split("RewardStatsError: ", 1)[1]) from err
        raise RunError(f"reward pool failed to start: {why}") from err


def replica_error() -> str:
    """The replica constructor's own error line, out of Serve's status message."""
    try:
        for app in serve.status().applications.values():
            for dep in app.deployments.values():
                lines = [ln for ln in (dep.message or "").splitlines() if ln.strip()]
                errors = [ln for ln in lines if "Error:" in ln and "RuntimeError: Traceback" not in ln]
                if errors:
                    return errors[-1].strip()
    except Exception:  # noqa: BLE001 - status itself unavailable: say so rather than hide the original error
        pass
    return "see the Ray Serve controller log"


def stop_reward_pool() -> None:
    serve.delete(APP_NAME)


__all__ = ["RewardReplica", "start_reward_pool", "stop_reward_pool"]
