"""``pararl eval``: the judges (a VLM behind a real loopback chat-completions server, a tiny CLIP), the
paired comparison, the outputs (eval.json, report, MLflow), resume, and bad input."""
import json
import logging
import math
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from cluster.eval_command import paired, t95
from pararl.cli import main
from reward.judges import SCORES, Sample, build_judge
from reward.testing import tiny_clip
from reward.vlm_judge import Malformed, parse_scores

SECRET = "sk-test-0123456789-never-log-me"
GOOD = json.dumps({s: 7 for s in SCORES})


class ChatServer:
    """A chat-completions endpoint on 127.0.0.1 answering from a script: each entry is an answer text, an
    HTTP status (int), a raw body (bytes) or ('sleep', seconds, answer); when the script runs out, it
    answers GOOD."""

    def __init__(self, script=(), delay: float = 0.0) -> None:
        self.script, self.delay = list(script), delay
        self.requests, self.auth, self.in_flight, self.max_in_flight = [], [], 0, 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.auth.append(self.headers.get("Authorization"))
                    step = server.script.pop(0) if server.script else GOOD
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    if isinstance(step, tuple):
                        time.sleep(step[1])
                        step = step[2]
                    if isinstance(step, int):
                        self.send_response(step)
                        self.send_header("Retry-After", "0")
                        self.end_headers()
                        return
                    data = step if isinstance(step, bytes) else json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": step}}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def image(seed: int) -> torch.Tensor:
    return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(seed))


def samples(n: int, edit: bool = True) -> list[Sample]:
    return [Sample(f"s{i}", "edit" if edit else "generate", f"make the circle blue {i}", f"a blue circle {i}", image(i),
                   image(100 + i) if edit else None) for i in range(n)]


@pytest.fixture
def vlm(tmp_path, monkeypatch):
    monkeypatch.setenv("PARARL_TEST_KEY", SECRET)
    servers = []

    def make(script=(), delay=0.0, **kwargs):
        server = ChatServer(script, delay)
        servers.append(server)
        judge = build_judge("vlm", {"base_url": server.url, "model": "tiny-vl", "api_key_env": "PARARL_TEST_KEY",
                                    "cache_dir": str(tmp_path / "cache"), "backoff_s": 0.01, "timeout_s": 2.0, **kwargs})
        return server, judge

    yield make
    for s in servers:
        s.close()


def test_vlm_judge_parses_retries_and_counts_missing(vlm, caplog):
    caplog.set_level(logging.DEBUG)
    bad_twice = ["I cannot rate images.", "scores: 7, 7"]
    server, judge = vlm(["not json", GOOD, 429, GOOD, ("sleep", 3.0, GOOD), GOOD, *bad_twice], concurrency=1)
    out = judge.judge(samples(4))
    assert out[0] == {s: 7.0 for s in SCORES}  # a malformed answer asked again
    assert out[1] == out[0] and out[2] == out[0]  # a 429 and a timeout retried
    assert out[3] == {s: None for s in SCORES}  # malformed twice: missing, never zero
    assert len(server.requests) == 8
    body = server.requests[0]["messages"][0]["content"]
    assert [c["type"] for c in body] == ["text", "image_url", "image_url"]  # the edit's input, then its output
    assert all(a == f"Bearer {SECRET}" for a in server.auth)
    # the key reaches the server and nothing else: not a log line, the identity, or the cache
    assert SECRET not in caplog.text and SECRET not in judge.identity
    assert all(SECRET not in f.read_text() for f in judge.cache.iterdir())
    # a second run pays for nothing judged; the missing judgment is asked again
    again = judge.judge(samples(4))
    assert again[:3] == out[:3] and again[3] == {s: 7.0 for s in SCORES} and len(server.requests) == 9


def test_vlm_judge_concurrency_limit_and_fatal_errors(vlm):
    server, judge = vlm(delay=0.2, concurrency=3)
    assert all(j["text_quality"] == 7.0 for j in judge.judge(samples(9, edit=False)))
    assert server.max_in_flight == 3
    assert "image_consistency" not in server.requests[0]["messages"][0]["content"][0]["text"]  # no input image, not asked
    server, judge = vlm([401])
    with pytest.raises(RuntimeError, match="HTTP 401") as err:
        judge.judge(samples(1))
    assert SECRET not in str(err.value)
    server, judge = vlm([b"<html>bad gateway</html>", GOOD])  # a 200 that is not a chat completion: asked again
    assert judge.judge(samples(1))[0]["text_quality"] == 7.0 and len(server.requests) == 2


def test_parse_scores_is_strict():
    names = ("text_quality", "image_quality")
    assert parse_scores('```json\n{"text_quality": 3, "image_quality": 10}\n```', names) == {"text_quality": 3.0,
                                                                                               "image_quality": 10.0}
    for bad in ['{"text_quality": 3}', '{"text_quality": 3, "image_quality": 11}', '{"text_quality": 3.5, "image_quality": 1}',
                '{"text_quality": "3", "image_quality": 1}', '{"text_quality": true, "image_quality": 1}',
                '{"a": 1} {"b": 2}', "", "no"]:
        with pytest.raises(Malformed):
            parse_scores(bad, names)


def test_clip_judge_against_the_model_by_hand(tmp_path):
    kwargs = tiny_clip(tmp_path)
    judge = build_judge("clip", {"reward_model": "open_clip", **kwargs})
    items = samples(3)
    items.append(Sample("text-only", "reason", "how many", "two", None))
    items[2].input_image = items[2].image.clone()  # an edit that changed nothing
    out = judge.judge(items)
    images = torch.stack([s.image for s in items[:3]])
    by_hand = judge.model.score(images, [s.text for s in items[:3]])
    prompts = judge.model.score(images, [s.prompt for s in items[:3]])
    for i in range(3):
        assert out[i]["output_alignment"] == pytest.approx(float(by_hand[i]), abs=1e-6)
        assert out[i]["image_alignment"] == pytest.approx(float(prompts[i]), abs=1e-6)
    a, b = judge.model.embed_images(items[0].input_image[None]), judge.model.embed_images(items[0].image[None])
    assert out[0]["image_consistency"] == pytest.approx(float(torch.cosine_similarity(a, b)[0]), abs=1e-6)
    assert out[2]["image_consistency"] == pytest.approx(1.0, abs=1e-5) and out[3] == {}


def test_paired_difference_by_hand():
    a = {"x": 0.9, "y": 0.5, "z": 0.7, "w": None, "v": 0.2}
    b = {"x": 0.4, "y": 0.6, "z": 0.2, "w": 0.1}  # v unjudged in b, w missing in a: both left out
    d = paired(a, b)
    diffs = [0.5, -0.1, 0.5]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, df 2)
    assert d["n"] == 3 and d["mean"] == pytest.approx(mean) and d["lo"] == pytest.approx(mean - half)
    assert d["hi"] == pytest.approx(mean + half)
    assert t95(200) == 1.96 and t95(25) == 2.086


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    from tests.tiny_run import tiny_run

    run = tiny_run(tmp_path)
    config, model, data = str(run["config"]), str(run["folder"]), str(tmp_path / "train.jsonl")
    cases = [(["--model", str(tmp_path / "nope"), "--data", data], "nope: not a model folder"),
             (["--model", model, "--data", data, "--judge", "oracle"], "unknown judge 'oracle'"),
             (["--model", model, "--data", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: not a dataset record")]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a red square"}\n{"task": "generate"}\n')
    capsys.readouterr()  # the fixture's own progress output
    for args, message in cases:
        assert main(["eval", config, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_eval_compares_two_models_writes_report_and_resumes(tmp_path, capsys):
    import mlflow

    from tests.tiny import tiny_bundle
    from tests.tiny_run import tiny_run

    run = tiny_run(tmp_path)
    baseline, _ = tiny_bundle(tmp_path, seed=5)
    out = tmp_path / "eval"
    args = ["eval", str(run["config"]), "--model", str(run["folder"]), "--baseline", str(baseline), "--data",
            str(tmp_path / "train.jsonl"), "--samples", "2", "--judge", "clip", "--judge", "reward", "--out", str(out),
            "evaluation.snapshots=2", "evaluation.batch_prompts=4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    row = result["scores"]["clip/output_alignment"]
    assert row["model"]["n"] == row["baseline"]["n"] == 6 * 2 and row["difference"]["n"] == 12
    assert row["difference"]["lo"] < row["difference"]["mean"] < row["difference"]["hi"]
    assert "clip/output_alignment" in printed and "report:" in printed
    assert set(result["scores"]) == {"clip/output_alignment", "clip/image_alignment", "reward/reward"}
    # the run's reward, from the snapshots saved beside each sample: what training scores, in [0, 1]
    reward = result["scores"]["reward/reward"]
    assert reward["model"]["n"] + reward["model"]["missing"] == 12 and 0 <= reward["model"]["mean"] <= 1
    samples = sorted((out / "samples" / "model").glob("*.json"))
    assert len(samples) == 12 and len(list((out / "samples" / "baseline").glob("*.png"))) == 12 * 2  # image + snapshots
    page = (out / "report.html").read_text()
    assert page.count("<img ") == 4 * 12  # per sample and model: output image and snapshots
    for src in re.findall(r'src="([^"]+)"', page):
        assert (out / src).is_file()
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("pararl-eval").experiment_id])
    assert mlrun.data.metrics["clip.output_alignment.difference"] == pytest.approx(row["difference"]["mean"])
    # resumed: nothing sampled or judged again, unless it is missing
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if "judgments" in p.parts or "samples" in p.parts}
    (out / "judgments" / "clip" / "baseline" / "00003-01.json").unlink()
    assert main(args) == 0
    again = {p: p.stat().st_mtime_ns for p in stamps if p.exists()}
    changed = [p for p in stamps if again.get(p) != stamps[p]]
    assert changed == [out / "judgments" / "clip" / "baseline" / "00003-01.json"]
    rerun = json.loads((out / "eval.json").read_text())["scores"]
    for key, row in result["scores"].items():  # the one sample judged again alone: equal to float noise
        assert rerun[key]["model"] == row["model"]
        assert rerun[key]["difference"]["mean"] == pytest.approx(row["difference"]["mean"], abs=1e-6)
    # the same folder with other seeds: refused in one line, nothing of the finished eval touched
    capsys.readouterr()
    assert main([*args, "evaluation.seed=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds an eval made with other settings (seed)" in err, err
    assert json.loads((out / "eval.json").read_text())["scores"] == rerun
    # more samples on the same folder: only the new ones are drawn and judged, the earlier ones kept
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and {"judgments", "samples"} & set(p.parts)}
    assert main([*args, "--samples", "3"]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "a sample or judgment made before was touched"
    grown = json.loads((out / "eval.json").read_text())
    assert grown["samples"] == 3 and grown["scores"]["clip/output_alignment"]["difference"]["n"] == 6 * 3
    assert (out / "samples" / "model" / "00005-02.json").is_file()


def test_same_model_and_seeds_differ_by_zero(tmp_path, capsys):
    from tests.tiny_run import tiny_run

    run = tiny_run(tmp_path)
    out = tmp_path / "eval"
    assert main(["eval", str(run["config"]), "--model", str(run["folder"]), "--baseline", str(run["folder"]), "--data",
                 str(tmp_path / "train.jsonl"), "--out", str(out), "evaluation.prompts=3"]) == 0
    d = json.loads((out / "eval.json").read_text())["scores"]["clip/output_alignment"]["difference"]
    assert d["n"] == 3 and d["mean"] == 0.0 and d["lo"] == d["hi"] == 0.0


def test_eval_with_the_vlm_judge_keeps_the_key_out_of_every_output(tmp_path, monkeypatch, capsys):
    from tests.tiny_run import tiny_run

    monkeypatch.setenv("PARARL_TEST_KEY", SECRET)
    server = ChatServer()
    try:
        run = tiny_run(tmp_path)
        out = tmp_path / "eval"
        args = ["eval", str(run["config"]), "--model", str(run["folder"]), "--data", str(tmp_path / "train.jsonl"),
                "--judge", "vlm", "--out", str(out), f"evaluation.judges.vlm.base_url={server.url}",
                "evaluation.judges.vlm.model=tiny-vl", "evaluation.judges.vlm.api_key_env=PARARL_TEST_KEY",
                "evaluation.prompts=3"]
        assert main(args) == 0
        assert len(server.requests) == 3 and all(a == f"Bearer {SECRET}" for a in server.auth)
        scores = json.loads((out / "eval.json").read_text())["scores"]
        assert scores["vlm/text_quality"]["model"] == {"mean": 7.0, "se": 0.0, "n": 3, "missing": 0}
        printed = capsys.readouterr()
        for f in out.rglob("*"):
            if f.is_file() and f.suffix in (".json", ".html", ".yaml", ".db", ".txt"):
                assert SECRET.encode() not in f.read_bytes(), f
        assert SECRET not in printed.out + printed.err
        shutil.rmtree(out / "judgments")  # judged again from scratch: every answer comes from the disk cache
        assert main(args) == 0 and len(server.requests) == 3
    finally:
        server.close()


def test_eval_on_ray_rollout_workers_samples_what_in_process_does(ray_local, tmp_path, capsys):
    """Three batches over two rollout workers of the running Ray: the same samples as in-process
    (a batch's seeds are its own, whichever worker samples it)."""
    from tests.tiny_run import tiny_run

    run = tiny_run(tmp_path)
    common = ["eval", str(run["config"]), "--model", str(run["folder"]), "--data", str(tmp_path / "train.jsonl"),
              "evaluation.batch_prompts=2", "--samples", "2"]
    assert main([*common, "--out", str(tmp_path / "ray"), "evaluation.workers=2"]) == 0
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    texts = {where: [json.loads(f.read_text())["text"] for f in sorted((tmp_path / where / "samples" / "model").glob("*.json"))]
             for where in ("ray", "local")}
    assert len(texts["ray"]) == 12 and texts["ray"] == texts["local"]
    assert (tmp_path / "ray" / "eval.json").read_text() == (tmp_path / "local" / "eval.json").read_text()
