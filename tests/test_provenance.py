"""The code version of a cache entry follows every project file its modules can run, and only those."""
from pararl.provenance import code_version, source_files


def _tree(root):
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "sub" / "__init__.py").write_text("")
    (root / "pkg" / "a.py").write_text("import torch\n\ndef f():\n    from .sub import c  # a lazy, relative import\n    return c\n")
    (root / "pkg" / "sub" / "c.py").write_text("from pkg.b import x\n")
    (root / "pkg" / "b.py").write_text("x = 1\n")
    (root / "pkg" / "unrelated.py").write_text("y = 2\n")


def test_the_version_follows_lazy_and_relative_imports_and_ignores_other_files(tmp_path):
    _tree(tmp_path)
    assert sorted(source_files(["pkg.a"], tmp_path)) == ["pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"]
    before = code_version(["pkg.a"], tmp_path)
    (tmp_path / "pkg" / "unrelated.py").write_text("y = 3\n")
    assert code_version(["pkg.a"], tmp_path) == before
    (tmp_path / "pkg" / "b.py").write_text("x = 2\n")  # two imports away, reached through a function body
    assert code_version(["pkg.a"], tmp_path) != before


def test_the_preparation_stages_cover_the_code_they_run():
    from shapeworld.prepare import STAGE_CODE

    assert {"learner.sft", "learner.engine", "pararl.models.llada", "shapeworld.prepare"} <= set(source_files(STAGE_CODE["policy"]))
    assert {"reward.train_clip", "reward.stats", "shapeworld.prepare"} <= set(source_files(STAGE_CODE["clip"]))
    assert {"shapeworld.scene", "shapeworld.tasks"} <= set(source_files(STAGE_CODE["world"]))
