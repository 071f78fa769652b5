"""The reward service: swappable reward models, ParaRL's semantic reward, a batching Ray Serve pool."""
from reward import clip_models, remote  # noqa: F401  (register open_clip, hf_clip, function, remote)
from reward.base import REWARD_MODELS, RewardModel, build_reward_model, register_reward_model

__all__ = ["REWARD_MODELS", "RewardModel", "build_reward_model", "register_reward_model"]
