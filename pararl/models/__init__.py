"""The policy model: LLaDA-architecture bidirectional transformer and its checkpoint format."""
from pararl.models.config import LLADA_8B, LLaDAConfig, llada_8b_config, parameter_count
from pararl.models.llada import LLaDAModelLM
from pararl.models.loading import CheckpointError, build_policy, load_policy, read_config

__all__ = ["LLADA_8B", "LLaDAConfig", "llada_8b_config", "parameter_count", "LLaDAModelLM", "CheckpointError", "build_policy",
           "load_policy", "read_config"]
