"""The reward pool on real Ray Serve: batching, results to the right trajectory, replica death, HTTP."""
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
import torch

from pararl.bundle import load_codecs
from reward.config import RewardConfig, RewardHttpConfig, RewardModelConfig
from reward.messages import encode_images
from reward.pool.client import RewardClient
from reward.pool.service import start_reward_pool, stop_reward_pool
from reward.remote import RemoteReward
from reward.scorer import ScoreRequest, SemanticScorer
from tests.tiny import tiny_bundle


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("pool"))[0]


def word_requests(codecs, n: int) -> list[ScoreRequest]:
    """n trajectories with 2 snapshots each, every one with a different number of words."""
    fmt = codecs.fmt
    words = codecs.encode_text("red green blue yellow square circle triangle top")
    reqs = []
    for k in range(n):
        text = torch.full((2, 8), fmt.mask_id)
        text[0, : k % 8] = torch.tensor(words[: k % 8], dtype=torch.long)
        text[1, :] = torch.tensor(words)
        image = fmt.image_ids(torch.full((2, 16), k % 8))
        reqs.append(ScoreRequest(image, text, steps=[3, 7], key=k))
    return reqs


def user_cfg(**kw) -> RewardConfig:
    delay = kw.pop("delay_s", 0.0)
    models = {"words": RewardModelConfig("tests.user_rewards:WordCountReward", {"delay_s": delay}, standardize=False)}
    return RewardConfig(models=models, **kw)


@pytest.mark.parametrize("request_size", [1, 4])
def test_64_requests_form_full_batches_and_each_gets_its_own_score(ray_local, folder, request_size):
    """One trajectory per request (Serve merges 16 requests), and chunks of 4 (it merges 4)."""
    cfg = user_cfg(max_batch_size=16, batch_wait_timeout_s=2.0, replicas=1, cpus_per_replica=1, delay_s=0.05,
                   request_size=request_size)
    handle = start_reward_pool(cfg, str(folder))
    try:
        codecs = load_codecs(folder)
        requests = word_requests(codecs, 64)
        results, retries = RewardClient(cfg, handle=handle).score_requests(requests)
        local = SemanticScorer(codecs, cfg).score_batch(requests)
        assert [r.key for r in results] == list(range(64)) and retries == 0
        for got, want in zip(results, local):
            assert torch.allclose(got.raw["words"], want.raw["words"])
        assert max(r.batch_size for r in results) <= 16
        batches = 64 / sum(1 / r.batch_size for r in results)
        assert batches >= 14, f"mean batch size {batches:.1f} for 64 trajectories with max 16"
    finally:
        stop_reward_pool()


def test_request_size_larger_than_the_batch_is_refused():
    from reward.config import check_reward_config

    with pytest.raises(ValueError, match="request_size must be between 1 and reward.max_batch_size"):
        check_reward_config(user_cfg(max_batch_size=4, request_size=8))


def test_a_trajectory_scored_twice_or_left_unscored_fails_the_step_naming_it():
    from reward.pool.client import RewardError, check_answered

    check_answered([0, 1, 2], [2, 0, 1])  # each once, in any order
    with pytest.raises(RewardError, match=r"answers do not match .*: scored more than once: trajectories \[1\]$"):
        check_answered([0, 1, 2], [0, 1, 1, 2])
    with pytest.raises(RewardError, match=r": left unscored: trajectories \[2\]$"):
        check_answered([0, 1, 2], [0, 1])
    with pytest.raises(RewardError, match=r": scored unasked: trajectories \[5\]$"):
        check_answered([0, 1], [0, 1, 5])


def test_a_burst_of_requests_is_spread_over_the_replicas(ray_local, folder):
    """Serve's default router sent 63 and 64 of these 64 requests to one of the two replicas; ours splits them."""
    cfg = user_cfg(max_batch_size=4, batch_wait_timeout_s=0.01, replicas=2, cpus_per_replica=0.5, delay_s=0.02,
                   request_size=1)
    handle = start_reward_pool(cfg, str(folder))
    try:
        client = RewardClient(cfg, handle=handle)
        requests = word_requests(load_codecs(folder), 64)
        client.score_requests(requests)  # the handle learns both replicas (a first burst may still lean)
        results, _ = client.score_requests(requests)
        per_replica = sorted(Counter(r.replica for r in results).values())
        assert len(per_replica) == 2 and per_replica[0] >= 30, f"64 requests split {per_replica}"
    finally:
        stop_reward_pool()


def test_replica_killed_while_a_batch_is_in_flight_loses_no_request(ray_local, folder):
    import ray

    # batches of 1 s: the kill at 0.5 s lands inside the first batch of whichever replica it hits
    cfg = user_cfg(max_batch_size=8, batch_wait_timeout_s=0.05, replicas=2, cpus_per_replica=0.5, delay_s=1.0, retries=5,
                   request_size=1)
    handle = start_reward_pool(cfg, str(folder))
    try:
        codecs = load_codecs(folder)
        requests = word_requests(codecs, 48)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "RewardReplica" in a["name"]]
        assert len(replicas) == 2
        victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])

        def kill_soon():
            time.sleep(0.5)  # both replicas are scoring their first batch
            ray.kill(victim, no_restart=False)

        client = RewardClient(cfg, handle=handle)
        client.score_requests(requests[:2])  # the handle's router is set up before the clock starts
        killer = threading.Thread(target=kill_soon)
        killer.start()
        results, retries = client.score_requests(requests)
        killer.join()
        local = SemanticScorer(codecs, cfg).score_batch(requests)
        assert [r.key for r in results] == list(range(48))
        for got, want in zip(results, local):
            assert torch.allclose(got.raw["words"], want.raw["words"])
        assert retries >= 1, "the kill should have hit requests in flight"
        # the loss shows in the metrics once the replacement replica answers, retried or not
        deadline = time.monotonic() + 90
        while client.replica_losses == 0 and time.monotonic() < deadline:
            client.score_requests(requests[:8])
        assert len(client.replicas) == 3 and client.replica_losses == 1
    finally:
        stop_reward_pool()


def _post(url, body, token=None):
    """POST a JSON body (or raw bytes); (status, the JSON answer)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_route_needs_the_token_and_serves_the_remote_backend(ray_local, folder, monkeypatch):
    from ray import serve

    serve.shutdown()  # the HTTP proxy is configured when Serve starts
    monkeypatch.delenv("HTTP_PROXY", raising=False)  # urllib must reach loopback directly
    port = free_port()
    cfg = user_cfg(http=RewardHttpConfig(enabled=True, port=port, token="s3cret", max_body_mb=1.0, max_images=4,
                                         max_image_side=64))
    start_reward_pool(cfg, str(folder))
    try:
        url = f"http://127.0.0.1:{port}/reward"
        images = torch.rand(3, 3, 32, 32)
        body = {"images": encode_images(images), "texts": ["red square", "a blue circle top", ""]}
        assert _post(url, body)[0] == 401
        assert _post(url, body, token="wrong")[0] == 401
        status, answer = _post(url, body, token="s3cret")
        assert status == 200 and answer["identities"] == {"words": "word-count(delay=0.0)"}
        assert answer["scores"]["words"][2] == pytest.approx(10 * float((images[2, 0] * 255).round().mean() / 255), abs=1e-4)

        remote = RemoteReward(url, token="s3cret")
        local = SemanticScorer(load_codecs(folder), cfg)
        quantised = (images * 255).round() / 255
        assert torch.allclose(remote.score(images, body["texts"]), local.raw_scores(quantised, body["texts"])["words"])
        assert remote.identity == "remote:word-count(delay=0.0)"

        # every malformed body is a 400 naming the problem, never a 500
        bad = {b"[1, 2]": "must be a JSON object", b"{not json": "bad request",
               json.dumps({"images": "@@ not base64 @@", "texts": ["a"]}).encode(): "bad request",
               json.dumps({"images": encode_images(images), "texts": "red"}).encode(): "texts must be a list",
               json.dumps({"images": 7, "texts": ["a"]}).encode(): "images must be a base64 string",
               json.dumps({"images": encode_images(images[:2]), "texts": ["a", "b", "c"]}).encode(): "2 images for 3 texts"}
        for data, why in bad.items():
            status, answer = _post(url, data, token="s3cret")
            assert status == 400 and why in answer["error"], (data[:40], status, answer)
        # above the limits: 413, and the reward model never sees it
        big = {"images": encode_images(torch.rand(5, 3, 8, 8)), "texts": ["a"] * 5}
        assert _post(url, big, token="s3cret") == (413, {"error": "request too large: 5 texts, the limit is 4 "
                                                                  "(reward.http.max_images)"})
        status, answer = _post(url, {"images": encode_images(torch.rand(1, 3, 65, 65)), "texts": ["a"]}, token="s3cret")
        assert status == 413 and "65x65 pixels, the limit is 64" in answer["error"]
        status, answer = _post(url, b" " * (2 << 20), token="s3cret")
        assert status == 413 and "reward.http.max_body_mb" in answer["error"]
        with pytest.raises(RuntimeError, match="answered 401"):
            RemoteReward(url, token="nope")
    finally:
        stop_reward_pool()
        serve.shutdown()


def test_http_route_without_a_token_refuses_to_start(ray_local, folder, monkeypatch):
    monkeypatch.delenv("PARARL_REWARD_TOKEN", raising=False)
    with pytest.raises(ValueError, match="no token is set"):
        start_reward_pool(user_cfg(http=RewardHttpConfig(enabled=True)), str(folder))
