"""The policy model: LLaDA-architecture bidirectional transformer and its checkpoint format."""
from pararl.models.config import LLaDAConfig
from pararl.models.llada import LLaDAModelLM
from pararl.models.loading import CheckpointError, build_policy, load_policy, read_config

__all__ = ["LLaDAConfig", "LLaDAModelLM", "CheckpointError", "build_policy", "load_policy", "read_config"]
