"""The house's one-way layers, read from the code itself (an ast walk over every module).

The core (``pararl``) imports no stage; rollout, reward and learner import only the core (never
each other); cluster composes them; the generated world (``shapeworld``) is an application on top.
The CLI is the one core module that reaches up, and only inside its subcommands. Ray is imported
only by cluster and by reward's serving package. A new import that breaks this fails here.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("pararl", "rollout", "reward", "learner", "cluster", "shapeworld")
ALLOWED = {  # package -> the project packages it may import
    "pararl": {"pararl"},
    "rollout": {"pararl", "rollout"},
    "reward": {"pararl", "reward"},
    "learner": {"pararl", "learner"},
    "cluster": {"pararl", "rollout", "reward", "learner", "cluster"},
    "shapeworld": set(PROJECT),
}
REACHES_UP = {"pararl.cli"}  # may import any stage, inside functions only
RAY_ALLOWED = ("cluster", "reward.pool")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, module: str, is_package: bool):
    """(imported module, line, at module level) for every import statement."""
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in top_level


def violations(root: Path) -> list[str]:
    """Every import in ``root``'s project packages that the layer table does not allow."""
    found = []
    for package in PROJECT:
        for path in sorted((root / package).rglob("*.py")):
            module = _module_name(path, root)
            tree = ast.parse(path.read_text(), filename=str(path))
            for name, line, module_level in _imports(tree, module, path.name == "__init__.py"):
                target = name.split(".")[0]
                where = f"{path.relative_to(root)}:{line} imports {name}"
                if target == "ray" and not module.startswith(RAY_ALLOWED):
                    found.append(f"{where} (Ray belongs to cluster/ and reward/pool/)")
                if target not in PROJECT or target in ALLOWED[package]:
                    continue
                if module in REACHES_UP and not module_level:
                    continue
                found.append(f"{where} ({package}/ may import only {', '.join(sorted(ALLOWED[package]))})")
    return found


def test_every_import_points_down_the_layers():
    assert violations(ROOT) == []


def test_benchmarks_never_import_the_tests():
    """What bench/ shares with the tests lives in the packages (e.g. ``reward.testing``)."""
    found = [f"{path.name}:{line} imports {name}" for path in sorted((ROOT / "bench").glob("*.py"))
             for name, line, _ in _imports(ast.parse(path.read_text()), "bench." + path.stem, False)
             if name.split(".")[0] == "tests"]
    assert found == []


def test_the_walk_catches_a_planted_upward_or_sideways_import(tmp_path):
    """The check itself can fail: a copy of the tree with bad imports planted in it."""
    for package in PROJECT:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "pararl" / "types.py").write_text("from reward.semantic import combine\n")
    (tmp_path / "rollout" / "worker.py").write_text("def f():\n    from learner import weights\n")
    (tmp_path / "learner" / "actor.py").write_text("import ray\n")
    (tmp_path / "reward" / "semantic.py").write_text("from . import base\nfrom ..cluster import driver\n")
    (tmp_path / "pararl" / "cli.py").write_text("from cluster.train import train\ndef run():\n    from cluster import doctor\n")
    (tmp_path / "cluster" / "driver.py").write_text("import ray\nfrom rollout import worker\nfrom learner import rank\n")
    found = violations(tmp_path)
    assert len(found) == 5, found
    assert [f.split(":")[0] for f in found] == ["pararl/cli.py", "pararl/types.py", "rollout/worker.py",
                                                 "reward/semantic.py", "learner/actor.py"], found


def test_the_sampler_the_loss_and_the_reward_load_without_ray_or_deepspeed():
    """Importing a stage loads only what it needs (measured in a fresh interpreter)."""
    code = ("import sys, rollout.sampler, rollout.worker, learner.loss, reward.semantic, reward, pararl.logprobs; "
            "print(sorted(m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_readme_layout_table_names_every_package():
    """The README's table is the map a new engineer reads first: it must show the folders that exist."""
    table = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("`")[1].rstrip("/") for line in table.splitlines() if line.startswith("| `")}
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {"bench", "tests"}
    assert rows == folders
