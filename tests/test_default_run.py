"""The default run, shortened: world, warm-up, CLIP, ParaRL on real Ray, evaluation before and after;
then every command the README gives a user after `make train`, run on that finished run."""
import importlib.util
import json
from pathlib import Path

import mlflow
import pytest

from cluster.run_config import load_run_config
from learner.sft import SFTConfig
from shapeworld.default_run import default_run, summary_table
from shapeworld.prepare import PrepareConfig
from tests.test_world_pipeline import ARCH, TINY_CLIP, WORLD

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]
PREPARE = PrepareConfig(world=WORLD, policy=ARCH, sft=SFTConfig(steps=3, batch_size=8), clip=TINY_CLIP, stats_batch=32)
SHORT = ["train.steps=2", "train.checkpoint_every=1", "train.eval_prompts=4", "data.prompts_per_step=2", "data.group_size=2",
         "learner.micro_batch_size=2", "sampler.steps=4", "reward.sampled_steps=2", "reward.first_step=0.5"]


@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("default")
    results = default_run(overrides=[f"run_dir={tmp / 'run'}", *SHORT], cache_dir=str(tmp / "cache"), eval_samples=1,
                          prepare_cfg=PREPARE)
    return tmp, results


def test_shortened_default_run_end_to_end(finished, capsys):
    tmp, results = finished
    for when in ("before", "after"):
        assert results[when]["n"] == 4 and 0 <= results[when]["aligned"] <= 1 and 0 <= results[when]["reward"] <= 1
    saved = json.loads((tmp / "run" / "results.json").read_text())
    assert saved["after"] == results["after"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'run' / 'mlflow.db'}")
    metrics = client.get_run(results["run_id"]).data.metrics
    assert {"eval.before.aligned", "eval.after.aligned", "eval.after.reward", "reward.mean"} <= set(metrics)
    assert (tmp / "run" / "final-policy" / "pararl.json").is_file()
    # the before/after evaluation is a pararl eval: its table, report and MLflow run, the same figures
    scores = json.loads((tmp / "run" / "held-out" / "eval.json").read_text())["scores"]
    for when, tag in (("before", "baseline"), ("after", "model")):
        assert results[when]["aligned"] == scores["world/output_alignment"][tag]["mean"]
        assert results[when]["reward"] == pytest.approx(scores["reward/reward"][tag]["mean"], abs=1e-12)
    assert scores["world/output_alignment"]["difference"]["n"] == 4
    change = results["change"]["aligned"]  # the summary's paired change: the eval's, sample by sample
    assert change["n"] == 4 and change["mean"] == pytest.approx(results["after"]["aligned"] - results["before"]["aligned"])
    assert (change["lo"], change["hi"]) == pytest.approx((scores["world/output_alignment"]["difference"]["lo"],
                                                          scores["world/output_alignment"]["difference"]["hi"]), nan_ok=True)
    cfg = load_run_config(tmp / "run" / "config.yaml")
    table = summary_table(results["before"], results["after"], results["change"], cfg, results, tmp / "run")
    row = next(line for line in table.splitlines() if line.startswith("exact alignment"))
    assert row.endswith(f"[{change['lo']:+.3f}, {change['hi']:+.3f}]"), table
    assert (tmp / "run" / "held-out" / "report.html").is_file()
    evals = client.search_runs([client.get_experiment_by_name("pararl-default-eval").experiment_id])
    assert len(evals) == 1 and "world.output_alignment.difference" in evals[0].data.metrics
    # make train again into the same folder: refused before any work, the finished run untouched
    with pytest.raises(ValueError, match="holds a finished default run"):
        default_run(overrides=[f"run_dir={tmp / 'run'}"], cache_dir=str(tmp / "cache"), prepare_cfg=PREPARE)
    assert json.loads((tmp / "run" / "results.json").read_text()) == saved


def test_the_readme_commands_work_on_the_finished_run(finished, capsys, monkeypatch):
    from pararl.cli import main
    from reward.stats import load_stats

    tmp, results = finished
    run, config = tmp / "run", str(tmp / "run" / "config.yaml")
    # pararl sample on the exported policy, as the README writes it: the folder's own sampler settings
    # (4 steps, 16 image tokens) apply, not the sampler's defaults for a released model
    assert main(["sample", "--model", str(run / "final-policy"), "--prompt", "add a red square top left",
                 "--out", str(tmp / "sample")]) == 0, capsys.readouterr().err
    assert {p.name for p in (tmp / "sample").iterdir()} == {"image.png", "text.txt", "snapshots.png"}
    # pararl doctor on the run's config
    assert main(["doctor", config, "--load"]) == 0
    assert capsys.readouterr().out.strip().endswith("pararl doctor: ready")
    # pararl reward-stats on the run's config measures what the preparation measured
    assert main(["reward-stats", config, f"reward.stats_file={tmp / 'stats.json'}"]) == 0
    ours, prepared = load_stats(tmp / "stats.json")["clip"], load_stats(results["prepare"]["reward_stats"])["clip"]
    assert ours.count == prepared.count and abs(ours.mean - prepared.mean) < 1e-5 and abs(ours.std - prepared.std) < 1e-5
    # pararl eval: the trained policy against the warm-up, judged by the CLIP and by the world's checks
    world = Path(results["prepare"]["eval"]).parent / "world.json"
    assert main(["eval", config, "--model", str(run / "final-policy"), "--baseline", results["prepare"]["model"],
                 "--judge", "clip", "--judge", "world", f"evaluation.judges.world.world={world}", "evaluation.prompts=4",
                 "--out", str(tmp / "eval")]) == 0, capsys.readouterr().err
    scores = json.loads((tmp / "eval" / "eval.json").read_text())["scores"]
    assert {"clip/output_alignment", "world/output_alignment", "world/image_alignment"} <= set(scores)
    assert scores["world/output_alignment"]["difference"]["n"] == 4
    # bench/e2e.py on the finished run: one mode (running ahead: the k >= 1 critical path; the
    # synchronous loop is the run's own, colocated runs are tests/test_colocated.py's), into its own
    # fresh folder (the run's checkpoints are another run's), and its closing JSON line
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    monkeypatch.setenv("PARARL_E2E_STEPS", "3")
    monkeypatch.setenv("PARARL_E2E_MODES", "k1")
    monkeypatch.setattr("sys.argv", ["e2e.py", config])
    capsys.readouterr()
    e2e.main()
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [m["mode"] for m in last["modes"]] == ["k1"]
    assert [m["steps_timed"] for m in last["modes"]] == [1] and [m["staleness_max"] for m in last["modes"]] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
