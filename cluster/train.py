"""``pararl train CONFIG [key=value ...]``: a whole ParaRL run, then where to look at it."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cluster.run_config import load_run_config
from pararl.errors import ConfigError


def check_run_dir(cfg) -> None:
    """A new run never starts over an earlier one's checkpoints: they would be rotated away."""
    from learner.checkpoint import latest_checkpoint

    if cfg.train.resume:
        return
    earlier = latest_checkpoint(cfg.learner.checkpoint.folder)
    if earlier is not None:
        raise ConfigError(f"{cfg.learner.checkpoint.folder} holds a checkpoint of an earlier run ({earlier.name}): "
                         "continue it with train.resume=true, or set run_dir to a new folder")


def train(config: str | Path | None, overrides: Sequence[str] = ()) -> dict:
    from cluster.driver import Driver

    cfg = load_run_config(config, overrides)
    check_run_dir(cfg)
    driver = Driver(cfg)
    try:
        state = driver.run()
    finally:
        driver.shutdown()
    run_dir = Path(cfg.run_dir).resolve()
    stopped = int(driver.stop_requested or 0)
    what = f"stopped by signal {stopped}, checkpoint written" if stopped else "finished"
    print(f"ParaRL run {what} at step {state.step} (policy version {state.policy_version})")
    print(f"  checkpoints: {cfg.learner.checkpoint.folder}")
    print(f"  MLflow:      {driver.tracker.uri}")
    if driver.tracker.uri.startswith("sqlite:"):
        print(f"  look at it:  .venv/bin/mlflow ui --backend-store-uri {driver.tracker.uri}")
    return {"state": state, "run_dir": run_dir, "metrics": getattr(driver, "last_metrics", {}), "run_id": driver.tracker.run_id,
            "signal": stopped}
