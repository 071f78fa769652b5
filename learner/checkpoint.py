"""Checkpoints that resume exactly, and that a crash mid-write can never corrupt.

Layout under the checkpoint folder::

    step-00000012/            one complete checkpoint
        deepspeed/            DeepSpeed's engine state (weights, optimizer partitions of every rank)
        rng-rank00000.pt      each rank's RNG states
        run_state.json        step, policy version, data position, reward-stats file, ...
        policy_config.json    the policy's config.json (export writes a model folder from it)
        meta.json             ZeRO stage, world size, precision, the folder the policy came from
        COMPLETE              size (and sha256) of every file above; written last
    latest                    the name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step-XXXXXXXX`` and renamed only after every rank has written
and ``COMPLETE`` is on disk; ``latest`` is replaced (write + rename) only after that. A crash leaves a
``.tmp-*`` folder that nothing loads (the next save deletes it), and a folder whose files do not
match its ``COMPLETE`` record (truncated, edited) is refused at load with the file named.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pararl.errors import CheckpointError
from pararl.files import atomic_write, write_synced

COMPLETE, LATEST, DS_TAG = "COMPLETE", "latest", "deepspeed"
PREFIX, TMP_PREFIX = "step-", ".tmp-"


@dataclass
class RunState:
    """What the driver needs to continue where it stopped, besides the engine's own state."""

    step: int = 0  # completed iterations: the resumed run's next iteration is ``step``
    policy_version: int = 0
    data_position: int = 0
    reward_stats_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path, checksums: bool) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, **({"sha256": _sha256(p)} if checksums else {})}
            for p in files}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, root: str | Path, state: RunState, keep_last: int = 3, checksums: bool = True,
                    source: str | None = None, adapters: dict | None = None,
                    files: dict[str, bytes] | None = None) -> Path:
    """Collective: every rank calls it. Returns the complete checkpoint folder. ``adapters``: the LoRA
    settings of a run that trains adapters (export merges them). ``files``: what the driver keeps with
    the checkpoint (its queued rollouts), written by rank 0 and sealed with the rest."""
    rank, world = _rank_world()
    root = Path(root)
    name = checkpoint_name(state.step)
    final, tmp = root / name, root / f"{TMP_PREFIX}{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a crash: never complete, never loaded
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    torch.save(rng_state(), tmp / f"rng-rank{rank:05d}.pt")
    _barrier()
    if rank == 0:
        for name, data in (files or {}).items():
            write_synced(tmp / name, data)
        _finalize(engine, root, tmp, final, state, world, checksums, source, adapters)
        prune(root, keep_last)
    _barrier()
    return final


def _finalize(engine, root: Path, tmp: Path, final: Path, state: RunState, world: int, checksums: bool,
              source: str | None, adapters: dict | None) -> None:
    """Rank 0: the small files, then COMPLETE, then the rename, then ``latest``: each only after the one before."""
    cfg = engine.module.config
    write_synced(tmp / "run_state.json", json.dumps(asdict(state), indent=1))
    write_synced(tmp / "policy_config.json", cfg.to_json_string())
    meta = {"zero_stage": engine.zero_optimization_stage(), "world_size": world, "bf16": bool(engine.bfloat16_enabled()),
            "source": source, "global_steps": int(engine.global_steps), "adapters": adapters}
    write_synced(tmp / "meta.json", json.dumps(meta, indent=1))
    write_synced(tmp / COMPLETE, json.dumps({"files": _manifest(tmp, checksums)}, indent=1))
    if final.exists():  # the same step saved again: replace it whole
        old = root / f"{TMP_PREFIX}old-{final.name}"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    atomic_write(root / LATEST, final.name)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)."""
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    done = sorted(p for p in root.glob(f"{PREFIX}*") if (p / COMPLETE).is_file())
    for old in done[: max(len(done) - keep_last, 0)]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def verify(path: str | Path) -> dict[str, Any]:
    """The COMPLETE record of ``path`` after checking every file against it (size, and sha256 if recorded)."""
    path = Path(path)
    record_file = path / COMPLETE
    if not record_file.is_file():
        raise CheckpointError(f"{path} has no {COMPLETE} marker: an unfinished or foreign checkpoint, refused")
    try:
        record = json.loads(record_file.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{record_file} is unreadable: {err}") from err
    for rel, want in record.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {rel} is missing")
        if f.stat().st_size != want["size"]:
            raise CheckpointError(f"checkpoint {path}: {rel} has {f.stat().st_size} bytes, {want['size']} were written (truncated?)")
        if "sha256" in want and _sha256(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {rel} does not match its checksum")
    return record


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``latest`` names under ``root``, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    target = Path(root) / pointer.read_text().strip()
    if not target.is_dir():
        raise CheckpointError(f"{pointer} names {target.name}, which does not exist")
    return target


def resolve_checkpoint(path: str | Path | None) -> Path:
    """A checkpoint folder itself, or the one a run folder's ``latest`` names; an error when neither."""
    if path is None:
        raise CheckpointError("no checkpoint given and no checkpoint folder configured")
    path = Path(path)
    if (path / COMPLETE).is_file() or path.name.startswith(PREFIX) or path.name.startswith(TMP_PREFIX):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path} is neither a checkpoint nor a folder with a '{LATEST}' pointer")
    return found


def load_checkpoint(engine, path: str | Path) -> RunState:
    """Collective: restore engine state (weights, optimizer, step counters), this rank's RNG, the run state."""
    path = Path(path)
    verify(path)
    rank, world = _rank_world()
    meta = json.loads((path / "meta.json").read_text())
    if meta["world_size"] != world and meta["zero_stage"] > 0:
        raise CheckpointError(f"{path} was written by {meta['world_size']} ranks with ZeRO-{meta['zero_stage']}; "
                              f"this group has {world}: ZeRO partitions do not re-split")
    loaded, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load the engine state in {path / DS_TAG}")
    rng_file = path / f"rng-rank{rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return RunState(**json.loads((path / "run_state.json").read_text()))
