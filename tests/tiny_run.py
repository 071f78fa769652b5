"""The tiny ParaRL run the cluster tests share (``cluster.testing.tiny_run``, which the soak shares too)."""
from cluster.testing.tiny_run import PROMPTS, tiny_run  # noqa: F401
