"""The generated world's exact checks as a ``pararl eval`` judge (``--judge world``).

The world knows the truth, so on it a judge can be exact: output alignment is 1 where the final text
names exactly the objects the image shows, image alignment is 1 where the image obeys the prompt
(given the input scene when editing). It is the yardstick a CLIP judge is measured against.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from reward.judges import Judgment, Sample
from shapeworld.dataset import load_world_config
from shapeworld.tasks import PromptError, follows


class WorldJudge:
    name = "world"
    gives = ("output_alignment", "image_alignment")

    def __init__(self, world: str) -> None:
        self.spec = load_world_config(Path(world).parent if Path(world).is_file() else world).spec
        self.codec = self.spec.codec()
        self.identity = f"world-judge({self.spec.to_dict()})"

    def _follows(self, sample: Sample, objects) -> float:
        before = None
        if sample.input_image is not None:
            before = self.spec.parse_image(self.codec.encode(sample.input_image[None])[0]).objects
        try:
            return float(follows(self.spec, sample.prompt, before, objects))
        except PromptError:
            return 0.0

    def judge(self, samples: Sequence[Sample]) -> list[Judgment]:
        out: list[Judgment] = []
        for s in samples:
            if s.image is None:
                out.append({})
                continue
            codes = self.codec.encode(s.image[None])[0]
            parsed = self.spec.parse_image(codes)
            out.append({"output_alignment": float(self.spec.aligned(s.text, codes)),
                        "image_alignment": 0.0 if parsed.garbled else self._follows(s, parsed.objects)})
        return out
