"""The three-node cluster that the multi-node tests and the fault soak (``bench/soak.py``) share: a
head and two worker nodes in network namespaces (``cluster.testing.netns``), and the tiny run placed on
them by resources.

- head: a learner rank, and room for two reward replicas (one spare: a replica that w1 loses is
  replaced here);
- w1: a rollout worker and a reward replica (losing w1 loses one of each, and the run goes on);
- w2: a rollout worker and a learner rank (losing w2 stops the run; it resumes from its checkpoint).
"""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

from cluster.testing.netns import NamespaceCluster, Node
from cluster.testing.tiny_run import tiny_run


def three_nodes(workdir: Path) -> NamespaceCluster:
    return NamespaceCluster([Node("head", 2, {"learner_node": 1, "reward_node": 2}),
                             Node("w1", 2, {"rollout_node": 1, "reward_node": 1}),
                             Node("w2", 2, {"rollout_node": 1, "learner_node": 1})], workdir)


def placed_run(cluster: NamespaceCluster, tmp: Path, **cluster_settings) -> Path:
    """The tiny run joined to ``cluster`` by address: rollout workers on w1 and w2, learner ranks on the
    head and w2, reward replicas on the head and w1 (Serve spreads them). ``cluster_settings`` override
    the ``cluster`` section (how a lost worker is handled, above all)."""
    tmp.mkdir(parents=True, exist_ok=True)
    setup = tiny_run(tmp)
    raw = setup["raw"]
    raw["cluster"].update({"address": cluster.gcs, "rollout_resources": {"rollout_node": 1}, "learner_ranks": 2,
                           "learner_resources": {"learner_node": 1}, **cluster_settings})
    raw["reward"].update({"replicas": 2, "resources_per_replica": {"reward_node": 1}, "request_size": 1})
    raw["learner"]["micro_batch_size"] = 1  # 2 ranks x 1: a step's trajectories are whole optimizer steps
    path = setup["tmp"] / "multinode.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_training(cluster: NamespaceCluster, config: Path, run_dir: Path, output: Path, *overrides: str) -> subprocess.Popen:
    """``pararl train`` on the head node, in a process group of its own (a scheduler's stop signal goes
    to the whole group), its output appended to ``output`` (a pipe nobody reads would fill and stall it)."""
    cmd = [sys.executable, "-m", "pararl.cli", "train", str(config), f"run_dir={run_dir}", *overrides]
    with open(output, "a") as out:
        return cluster.popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def latest(run_dir: Path, key: str = "reward.mean") -> tuple[int, float | None]:
    """How many values of metric ``key`` the run has logged so far, and the last of them (a read-only peek
    at its database: the run owns it)."""
    db = run_dir / "mlflow.db"
    if not db.is_file():
        return 0, None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            rows = con.execute("SELECT step, value FROM metrics WHERE key = ? ORDER BY step", (key,)).fetchall()
    except sqlite3.OperationalError:  # not made yet, or busy
        return 0, None
    return len(rows), (rows[-1][1] if rows else None)
