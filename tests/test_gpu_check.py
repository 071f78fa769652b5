"""bench/gpu_check.py cannot rot: its dry run (every part at toy sizes on the CPU) passes here, and a
part that fails is reported while the others still run."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402 -- a script of bench/, importable once its folder is on the path


def test_dry_run_runs_every_part(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DS_ACCELERATOR": "cpu",
           "PARARL_WHEELS": str(tmp_path / "no-wheels")}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run"], capture_output=True,
                          text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["errors"] == {} and figures["dry_run"] is True and figures["missing_packages"] == []
    assert set(gpu_check.PARTS) <= set(figures)
    assert figures["env"]["device"] == "cpu"
    sampler = figures["sampler"]
    assert sampler["sampler_s"] > 0 and sampler["floor_s"] > 0 and sampler["speedup_vs_loop"] > 0
    parity = figures["parity"]
    assert parity["equal_tokens_cpu_float32"] == 1.0 and parity["logp_gap_max_cpu_float32"] == 0.0  # the same computation
    assert 0.0 <= parity["equal_tokens_cpu_bfloat16"] <= 1.0 and parity["logp_gap_max_cpu_bfloat16"] > 0.0
    learner = figures["learner"]
    assert learner["step_s"] > 0 and learner["windows"] == 3 and learner["tflops"] > 0 and learner["mfu"] is None
    memory = figures["memory"]
    assert memory["rollout_predicted_gib"] > 0 and memory["learner_predicted_gib"] > 0
    assert memory["rollout_measured_gib"] is None  # no GPU: nothing measured, nothing made up
    e2e = figures["e2e"]
    assert e2e["steps"] == gpu_check.DRY.e2e_steps and e2e["time_step_s"] > 0 and e2e["compute_learner_s"] > 0
    assert e2e["time_rollout_s"] > 0 and e2e["time_sync_s"] >= 0


def test_a_failing_part_is_reported_and_the_rest_run(tmp_path):
    check = gpu_check.Check(dry=True, work=tmp_path)

    def broken(c):
        raise RuntimeError("CUDA error: out of memory")

    check.run("broken", broken)
    check.run("env", gpu_check.env_part)
    assert check.errors == {"broken": "RuntimeError: CUDA error: out of memory"}
    assert check.figures["env"]["device"] == "cpu" and "wall_s" in check.figures["broken"]
    assert "broken   FAILED (RuntimeError: CUDA error: out of memory)" in gpu_check.table(check.figures, check.errors)


def test_pieces_of_a_wheel_are_joined(tmp_path):
    whole = bytes(range(256)) * 1000
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    (tmp_path / "1" / "big-1.0-py3-none-any.whl.part00").write_bytes(whole[:100_000])
    (tmp_path / "2" / "big-1.0-py3-none-any.whl.part01").write_bytes(whole[100_000:])
    (tmp_path / "2" / "small-1.0-py3-none-any.whl").write_bytes(b"x")
    files = gpu_check.wheel_files(tmp_path)
    assert [f.name for f in files] == ["big-1.0-py3-none-any.whl", "small-1.0-py3-none-any.whl"]
    assert files[0].read_bytes() == whole


def test_wheels_are_cut_into_loads(tmp_path, monkeypatch):
    import gpu_wheels

    monkeypatch.setattr(gpu_wheels, "LOAD", 100)
    sizes = {"a.whl": 250, "b.whl": 60, "c.whl": 30, "d.whl": 100}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"x" * size)
    plan = gpu_wheels.loads([tmp_path / n for n in sizes])
    assert all(sum(take for _, _, take in load) <= 100 for load in plan)
    covered = {}
    for load in plan:
        for f, start, take in load:
            covered.setdefault(f.name, []).append((start, take))
    for name, size in sizes.items():  # every byte once, in order
        spans = sorted(covered[name])
        assert spans[0][0] == 0 and sum(t for _, t in spans) == size
        assert all(s + t == n for (s, t), (n, _) in zip(spans, spans[1:]))
