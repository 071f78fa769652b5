"""Token formats: where a model family puts the prompt, the input image and the two output spans.

The sampler, the learner and the reward service all need to know which columns hold the output
image and the output text, which ids are image codes, and what the unconditional (CFG) sequence
looks like. One object per family answers all of that, so no other module hard-codes an id.
"""
from __future__ import annotations

from typing import Any

from pararl.formats.base import TEXT_VOCABS, FormatBase, OutputLayout, PromptTokens
from pararl.formats.dimoo import (DIMOO_EDIT_INSTRUCTION, DIMOO_GENERATE_INSTRUCTION, DimooFormat,
                                  mmada_a_format)
from pararl.formats.parallel import WORLD_SPECIAL_TOKENS, ParallelFormat, mmada_m_format, world_format

__all__ = ["TEXT_VOCABS", "FormatBase", "OutputLayout", "PromptTokens", "DIMOO_EDIT_INSTRUCTION",
           "DIMOO_GENERATE_INSTRUCTION", "DimooFormat", "mmada_a_format", "WORLD_SPECIAL_TOKENS",
           "ParallelFormat", "mmada_m_format", "world_format", "FORMAT_LAYOUTS", "format_from_dict"]

FORMAT_LAYOUTS: dict[str, type] = {"parallel": ParallelFormat, DimooFormat.LAYOUT: DimooFormat}


def format_from_dict(fields: dict[str, Any]) -> FormatBase:
    """A format saved with ``to_dict`` (``pararl.json``): its ``layout`` names the class (none: ParallelFormat)."""
    layout = fields.get("layout", "parallel")
    if layout not in FORMAT_LAYOUTS:
        raise ValueError(f"unknown token-format layout {layout!r}; known: {', '.join(sorted(FORMAT_LAYOUTS))}")
    return FORMAT_LAYOUTS[layout].from_dict(fields)
