"""MLflow tracking on a real sqlite store; an unreachable server warns and the run goes on."""
import logging
import re
import warnings

import mlflow
from PIL import Image

from cluster.run_config import RunConfig
from cluster.tracking import Tracker, flatten


def test_params_metrics_and_pictures_land_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(tmp_path / "run", "exp", "first")
    assert tracker.enabled and (tmp_path / "run" / "mlflow.db").is_file()
    tracker.log_config(RunConfig())
    tracker.log_metrics({"reward/mean": 0.5, "loss": float("nan")}, step=0)
    tracker.log_metrics({"reward/mean": 0.7}, step=1)
    tracker.log_image(Image.new("RGB", (8, 8), "red"), "snapshots/step_1.png")
    tracker.finish()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    run = client.get_run(tracker.run_id)
    assert run.data.params["sampler.steps"] == "32" and "reward.max_batch_size" in run.data.params
    assert [m.value for m in client.get_metric_history(tracker.run_id, "reward.mean")] == [0.5, 0.7]
    assert "loss" not in run.data.metrics  # a NaN is not logged as a number
    paths = {a.path for a in client.list_artifacts(tracker.run_id, "snapshots")}
    assert paths == {"snapshots/step_1.png"}
    assert (tmp_path / "run" / "mlartifacts").is_dir()
    # the experiment opens on its runs and charts in MLflow 3's UI, not on the GenAI overview
    assert client.get_experiment_by_name("exp").tags["mlflow.experimentKind"] == "custom_model_development"


def test_unreachable_server_warns_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with caplog.at_level(logging.WARNING, logger="cluster.tracking"):
        tracker = Tracker(tmp_path, "exp", "r", tracking_uri="http://127.0.0.1:9")
    assert re.search("unavailable .* the run continues without tracking", caplog.text), caplog.text
    assert not tracker.enabled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.log_metrics({"a": 1.0}, step=0)  # silently skipped now
        tracker.finish()


def test_flatten_names_nested_keys():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": {}}) == {"a.b": "1", "a.c.d": "x", "e": "{}"}
