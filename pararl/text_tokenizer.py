"""Word-level text tokenizers built with the `tokenizers` library, saved as PreTrainedTokenizerFast.

The generated world (and tests) need a text tokenizer that is saved next to the model exactly as a
real checkpoint's is, so the same ``AutoTokenizer``-style loading code serves both.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pararl.formats import WORLD_SPECIAL_TOKENS


def build_word_tokenizer(words: Iterable[str], specials: Sequence[str] = WORLD_SPECIAL_TOKENS) -> PreTrainedTokenizerFast:
    """Specials take ids 0..k-1 in order (the world format relies on it), then the words, sorted."""
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in sorted(set(words) - set(specials)):
        vocab[word] = len(vocab)
    if "<unk>" not in vocab:
        vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token=specials[0], mask_token="<mask>")
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in ("<pad>", "<mask>")]})
    return fast
