"""MLflow tracking: params, per-step metrics, and pictures, in a sqlite store inside the run folder.

Tracking must never take a run down: an unreachable server (or any MLflow failure) is reported once
as a warning and the run goes on without it.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf
from PIL import Image

log = logging.getLogger(__name__)
# MLflow 3's UI opens an experiment of unknown kind on its GenAI overview (traces, no runs); this kind
# opens it on the runs table and their charts.
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}


_EMPTY_STORE: dict[str, bytes] = {}  # MLflow version -> an empty sqlite store, its schema migrated


def start_sqlite_store(uri: str) -> None:
    """A new sqlite store begins as a copy of an empty one migrated once per process: MLflow's schema
    migrations take seconds for every new store, and every run folder (and eval) makes one."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    if path.exists():
        return
    import tempfile

    import mlflow

    if mlflow.__version__ not in _EMPTY_STORE:
        with tempfile.TemporaryDirectory() as folder:
            empty = Path(folder) / "empty.db"
            mlflow.MlflowClient(f"sqlite:///{empty}").search_experiments()  # creates and migrates the schema
            _EMPTY_STORE[mlflow.__version__] = empty.read_bytes()
    from pararl.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, _EMPTY_STORE[mlflow.__version__])  # a reader never sees half a store


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:500]  # MLflow's param value limit
    return out


class Tracker:
    def __init__(self, run_dir: str | Path, experiment: str, run_name: str, tracking_uri: str | None = None,
                 run_id: str | None = None) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.enabled = True
        self.run_id: str | None = None
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.run_dir / 'mlflow.db'}"
        self.uri = uri
        try:
            from mlflow import MlflowClient

            # A client bound to this URI and run, not MLflow's process-global "active run": several
            # drivers in one process (tests, notebooks) never log into each other's runs.
            self.run_dir.mkdir(parents=True, exist_ok=True)
            start_sqlite_store(uri)
            self.client = MlflowClient(uri)
            if run_id is None:
                exp = self.client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(
                    experiment, artifact_location=(self.run_dir / "mlartifacts").as_uri(), tags=EXPERIMENT_TAGS)
                if exp is not None and EXPERIMENT_KIND not in exp.tags:
                    self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND, EXPERIMENT_TAGS[EXPERIMENT_KIND])
                run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            else:
                self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        except Exception as err:  # noqa: BLE001 - any tracking failure must leave the run alive
            self._disable(err)

    def _disable(self, err: Exception) -> None:
        if self.enabled:
            log.warning("MLflow tracking at %s is unavailable (%s: %s); the run continues without tracking",
                        self.uri, type(err).__name__, err)
        self.enabled = False

    def _call(self, fn: str, *args: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        try:
            getattr(self.client, fn)(self.run_id, *args, **kwargs)
        except Exception as err:  # noqa: BLE001
            self._disable(err)

    def log_config(self, cfg: Any) -> None:
        container = OmegaConf.to_container(OmegaConf.structured(cfg)) if not isinstance(cfg, Mapping) else cfg
        params = flatten(container)
        items = list(params.items())
        from mlflow.entities import Param

        for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
            self._call("log_batch", params=[Param(k, v) for k, v in items[i : i + 90]])
        self._call("log_text", OmegaConf.to_yaml(container), "config.yaml")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        clean = [Metric(k.replace("/", "."), float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        self._call("log_batch", metrics=clean)

    def last_logged_step(self, key: str = "policy_version") -> int:
        """The highest step this run has logged ``key`` at (-1: none, or tracking is off)."""
        if not self.enabled:
            return -1
        try:
            return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
        except Exception as err:  # noqa: BLE001 - any tracking failure must leave the run alive
            self._disable(err)
            return -1

    def log_image(self, image: Image.Image, name: str) -> None:
        self._call("log_image", image, artifact_file=name)

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        if Path(path).is_file():
            self._call("log_artifact", str(path), folder)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("set_terminated", status=status)

    def fail(self, reason: str, status: str = "FAILED") -> None:
        """The run ends on an error (or KILLED on an interrupt): the reason is kept as a tag."""
        self._call("set_tag", "failure", reason[:5000])
        self.finish(status)
