"""The generated world's exact checks as a ``pararl eval`` judge (``--judge world``).

The world knows the truth, so on it a judge can be exact: output alignment is 1 where the final text
names exactly the objects the image shows, image alignment is 1 where the image obeys the prompt
(given the input scene when editing). It is the yardstick a CLIP judge is measured against.
"""
from __future__ import annotations

from typing import Sequence

from reward.judges import Judgment, Sample
from shapeworld.checks import image_follows
from shapeworld.rewards import world_spec
from shapeworld.scene import ImageParse


class WorldJudge:
    name = "world"
    gives = ("output_alignment", "image_alignment")

    def __init__(self, world: str) -> None:
        self.spec = world_spec(world)
        self.codec = self.spec.codec()
        self.identity = f"world-judge({self.spec.to_dict()})"

    def _parse(self, image) -> ImageParse:
        return self.spec.parse_image(self.codec.encode(image[None])[0])

    def judge(self, samples: Sequence[Sample]) -> list[Judgment]:
        out: list[Judgment] = []
        for s in samples:
            if s.image is None:
                out.append({})
                continue
            codes = self.codec.encode(s.image[None])[0]
            before = self._parse(s.input_image) if s.input_image is not None else None
            out.append({"output_alignment": float(self.spec.aligned(s.text, codes)),
                        "image_alignment": float(image_follows(self.spec, s.prompt, before, self.spec.parse_image(codes)))})
        return out
