"""The code version of a computation: a hash of the project's source files it can run.

A cache entry (the default run's world, warm-up and CLIP) must be rebuilt when the code that built it
changes, not only its settings; otherwise a cache built by older code is silently reused and a fresh
clone gets other figures than the one that filled the cache. The files are found statically: the
transitive closure of the project's own imports (those inside functions included, where this project
keeps its lazy imports), starting from the named modules. Third-party packages are pinned by
``constraints.txt`` and left out.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path) -> set[str]:
    """Module names this file imports (absolute, and relative ones resolved); may name non-modules."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = _package_of(name, path).split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return found


def source_files(modules: Iterable[str], root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file for every project module reachable from ``modules`` (parents included)."""
    todo, seen = list(modules), {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name, root)
        if path is None:
            continue
        seen[name] = path
        parents = [name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)]
        todo.extend([*parents, *_imports(name, path)])
    return seen


def code_version(modules: Iterable[str], root: Path = ROOT) -> str:
    """A 16-hex-digit hash of the source of every project module reachable from ``modules``."""
    digest = hashlib.sha256()
    for name, path in sorted(source_files(modules, root).items()):
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
