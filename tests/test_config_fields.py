"""Every setting is read by something: an ast walk over the project finds each field of every config
dataclass (``*Config``) read outside its own definition and the checks of its values. A setting that
is accepted, validated and then read by nothing fails here."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.test_layering import PROJECT, ROOT

CHECKS = ("check", "validate", "_check", "_validate")  # functions that only judge a value


def _is_dataclass(node: ast.ClassDef) -> bool:
    named = lambda d: getattr(d, "id", None) or getattr(getattr(d, "func", None), "id", None)  # noqa: E731
    return any(named(d) == "dataclass" for d in node.decorator_list)


def _fields(trees: dict[Path, ast.Module]) -> list[tuple[Path, str, str]]:
    return [(path, node.name, stmt.target.id) for path, tree in trees.items() for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and _is_dataclass(node)
            for stmt in node.body if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)]


def _reads(tree: ast.Module, skip_checks: bool) -> set[str]:
    """Attribute names loaded, and strings that could name one (``getattr(cfg, "x")``), outside the
    check functions when ``skip_checks``; class bodies of configs are definitions, not reads."""
    found: set[str] = set()

    def visit(node: ast.AST, judging: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and skip_checks and node.name.startswith(CHECKS):
            judging = True
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and _is_dataclass(node):
            return
        if not judging:
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                found.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
        for child in ast.iter_child_nodes(node):
            visit(child, judging)

    visit(tree, False)
    return found


def unread_settings(root: Path) -> list[str]:
    trees = {p: ast.parse(p.read_text(), filename=str(p)) for package in PROJECT for p in sorted((root / package).rglob("*.py"))}
    elsewhere = {p: _reads(tree, skip_checks=False) for p, tree in trees.items()}
    at_home = {p: _reads(tree, skip_checks=True) for p, tree in trees.items()}
    return [f"{path.relative_to(root)}: {cls}.{name}" for path, cls, name in _fields(trees)
            if not any(name in (at_home[p] if p == path else elsewhere[p]) for p in trees)]


def test_every_config_field_is_read_by_something():
    assert unread_settings(ROOT) == []


def test_the_walk_finds_a_setting_that_is_only_checked(tmp_path):
    """The check itself can fail: a setting validated in its own module and read nowhere else."""
    for package in PROJECT:
        (tmp_path / package).mkdir()
    (tmp_path / "learner" / "config.py").write_text(
        "from dataclasses import dataclass\n\n@dataclass\nclass LearnerConfig:\n    lr: float = 1e-6\n    every: int = 0\n\n"
        "def validate(cfg):\n    if cfg.every < 0 or cfg.lr <= 0:\n        raise ValueError('every')\n")
    (tmp_path / "learner" / "trainer.py").write_text("def step(cfg):\n    return cfg.lr\n")
    assert unread_settings(tmp_path) == ["learner/config.py: LearnerConfig.every"]
