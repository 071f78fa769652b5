"""The tests' name for ``pararl.testing``: tiny checkpoints in the released layouts, built in code."""
from pararl.testing import (  # noqa: F401 -- re-exported for the tests
    A_SPECIALS,
    LLADA_VOCAB,
    M_SPECIALS,
    MMADA_VOCAB,
    WORDS,
    a_tokenizer,
    id_tokenizer,
    tiny_llada_fields,
    tiny_magvit2,
    tiny_vqmodel,
    write_a_checkpoint,
    write_m_checkpoint,
    write_policy,
)
