"""The tests' tiny models: ``pararl.tiny`` (shared with bench/, which never imports tests/) and the tiny
CLIP of ``reward.testing``."""
from pararl.tiny import CODEBOOK, IMAGE_TOKENS, TEXT_VOCAB, WORDS, tiny_bundle, tiny_config, tiny_format, tiny_policy  # noqa: F401
from reward.testing import TINY_CLIP, tiny_clip  # noqa: F401
