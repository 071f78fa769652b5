"""Token formats: where a model family puts the prompt, the input image and the two output spans.

The sampler, the learner and the reward service all need to know which columns hold the output
image and the output text, which ids are image codes, and what the unconditional (CFG) sequence
looks like. One object per family answers all of that, so no other module hard-codes an id.
"""
from __future__ import annotations

from typing import Any

from pararl.formats.base import TEXT_VOCABS, FormatBase, OutputLayout, PromptTokens
from pararl.formats.dimoo import DIMOO_EDIT_INSTRUCTION, DIMOO_GENERATE_INSTRUCTION, DimooFormat, mmada_a_format
from pararl.formats.parallel import WORLD_SPECIAL_TOKENS, ParallelFormat, mmada_m_format, world_format
from pararl.registry import Registry

__all__ = ["TEXT_VOCABS", "FormatBase", "OutputLayout", "PromptTokens", "DIMOO_EDIT_INSTRUCTION",
           "DIMOO_GENERATE_INSTRUCTION", "DimooFormat", "mmada_a_format", "WORLD_SPECIAL_TOKENS",
           "ParallelFormat", "mmada_m_format", "world_format", "FORMAT_LAYOUTS", "format_from_dict"]

FORMAT_LAYOUTS: Registry[type] = Registry("token-format layout")
FORMAT_LAYOUTS.add("parallel", ParallelFormat)
FORMAT_LAYOUTS.add(DimooFormat.LAYOUT, DimooFormat)


def format_from_dict(fields: dict[str, Any]) -> FormatBase:
    """A format saved with ``to_dict`` (``pararl.json``): its ``layout`` names the class (none: ParallelFormat)."""
    layout = fields.get("layout", "parallel")
    return FORMAT_LAYOUTS.get(layout).from_dict(fields)
