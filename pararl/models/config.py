"""The policy's config class: LLaDA's own config fields, so a real checkpoint's config.json loads as is.

Field names and meanings follow the reference LLaDA implementation (model_type ``llada``), and the
MMaDA variant (model_type ``mmada``) adds vocabulary fields on top; every field we do not use is kept
verbatim so that ``save_pretrained`` writes a config the reference implementation reads back.
"""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from pararl.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llada", "mmada")


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_ratio: int = 4,
        mlp_hidden_size: int | None = None,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        weight_tying: bool = False,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        mask_token_id: int = 126336,
        max_sequence_length: int = 4096,
        block_type: str = "llama",
        activation_type: str = "silu",
        layer_norm_type: str = "rms",
        rope: bool = True,
        alibi: bool = False,
        **kwargs: Any,
    ) -> None:
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden_size = mlp_hidden_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.embedding_size = embedding_size
        self.weight_tying = weight_tying
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.mask_token_id = mask_token_id
        self.max_sequence_length = max_sequence_length
        self.block_type = block_type
        self.activation_type = activation_type
        self.layer_norm_type = layer_norm_type
        self.rope = rope
        self.alibi = alibi
        kwargs.setdefault("use_cache", False)
        # transformers' own tying machinery must stay off: LLaDA ties by reusing wte in the head.
        kwargs["tie_word_embeddings"] = False
        super().__init__(vocab_size=vocab_size, **kwargs)
        self._check()

    def to_dict(self) -> dict[str, Any]:
        """As saved in config.json: an MMaDA checkpoint stays model_type ``mmada`` (transformers would write
        the class's ``llada``), so a policy exported from an -M run is still recognised as -M."""
        out = super().to_dict()
        if self.__dict__.get("model_type") in SUPPORTED_MODEL_TYPES:
            out["model_type"] = self.__dict__["model_type"]
        return out

    # The names transformers' generic code looks for.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        # LLaDA: when mlp_hidden_size is set it overrides mlp_ratio.
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def output_size(self) -> int:
        return self.embedding_size or self.vocab_size

    def _check(self) -> None:
        """Refuse architectures this implementation would silently compute differently."""
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            problems.append(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            problems.append("the head dimension must be even for rotate-half RoPE")
        if self.output_size < self.vocab_size:
            problems.append(f"embedding_size {self.embedding_size} is smaller than vocab_size {self.vocab_size}")
        for field, supported in (("block_type", "llama"), ("activation_type", "silu"), ("layer_norm_type", "rms")):
            if getattr(self, field) != supported:
                problems.append(f"{field}={getattr(self, field)!r} is not supported (only {supported!r})")
        if not self.rope or self.alibi:
            problems.append("only RoPE position encoding is supported (rope=true, alibi=false)")
        # Reference fields that change the forward and that this implementation does not compute
        # (scale_logits and input_emb_norm it does): refused by name rather than ignored.
        for field, inert in (("clip_qkv", None), ("attention_layer_norm", False), ("multi_query_attention", None)):
            value = getattr(self, field, inert)
            if value not in (inert, False, None):
                problems.append(f"{field}={value!r} is not supported")
        if problems:
            raise CheckpointError("unsupported LLaDA config: " + "; ".join(problems))


# LLaDA-8B's architecture (its released config.json); the MMaDA-Parallel checkpoints keep it and grow
# the embedding to 126464 + 8192 rows for the image codes (``llada_8b_config(embedding_size=134656)``).
LLADA_8B = dict(
    d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, rope_theta=500000.0,
    rms_norm_eps=1e-5, vocab_size=126464, embedding_size=126464, weight_tying=False, include_bias=False,
    include_qkv_bias=False, mask_token_id=126336, max_sequence_length=4096,
)


def llada_8b_config(**overrides: Any) -> LLaDAConfig:
    return LLaDAConfig(**{**LLADA_8B, **overrides})


def parameter_count(config: LLaDAConfig) -> int:
    """Parameters of the policy a config describes, counted from its fields (no model is built)."""
    d, f, v = config.d_model, config.ffn_hidden_size, config.output_size
    kv = config.kv_heads * (d // config.n_heads)
    bias, qkv_bias = config.include_bias, config.include_bias or config.include_qkv_bias
    attn = d * d + 2 * d * kv + d * d + (d + 2 * kv if qkv_bias else 0) + (d if bias else 0)
    mlp = 3 * d * f + (2 * f + d if bias else 0)
    block = attn + mlp + 2 * d
    head = 0 if config.weight_tying else d * v + (v if bias else 0)
    return config.n_layers * block + v * d + d + head


def _register() -> None:
    """Let transformers' Auto* classes (AutoTokenizer reads config.json) know the llada model type."""
    from transformers import AutoConfig

    try:
        AutoConfig.register("llada", LLaDAConfig)
    except ValueError:  # already registered (re-import)
        pass


_register()
