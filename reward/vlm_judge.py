"""The ``vlm`` judge: a vision-language model behind any OpenAI-compatible chat-completions endpoint.

A hosted model, or vLLM / SGLang serving an open one: ``base_url`` and ``model`` name it, the API key
comes from the environment variable ``api_key_env`` names and goes nowhere but the request header (not
into the identity, a log, an error or a cache). One request per sample asks for every score that
applies to it, each on a 0-10 scale (ParaBench's six, our own templates), in one JSON object.

An answer is parsed strictly: every asked score an integer from 0 to 10, nothing else counted. A
malformed or refused answer is asked again, then recorded as missing (None), never as zero. A 429 or
a server error is retried with backoff (``Retry-After`` honoured), a request has a timeout, at most
``concurrency`` requests are in flight, and each judgment is cached on disk keyed by (judge, model,
templates, sample), so an interrupted or repeated evaluation pays for nothing twice.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from pararl.errors import ConfigError
from pararl.files import atomic_write
from reward.judges import Judgment, Sample, register_judge

log = logging.getLogger(__name__)
TEMPLATE_VERSION = "parabench-v1"
ASK = {
    "text_quality": "text_quality: is the reasoning text fluent, coherent and free of errors and repetition?",
    "text_alignment": "text_alignment: does the reasoning text address the instruction and plan what it asks for?",
    "image_consistency": "image_consistency: does the output image keep what the instruction does not ask to change in "
                         "the input image (first image: input, second: output)?",
    "image_alignment": "image_alignment: does the output image carry out the instruction?",
    "image_quality": "image_quality: is the output image well formed, free of artefacts and visually coherent?",
    "output_alignment": "output_alignment: does the output image show what the reasoning text says it will show?",
}
INTRO = ("You are judging the output of a model that was given an instruction and produced a reasoning text and an "
         "image.\nInstruction: {prompt}\nReasoning text: {text}\n\nRate each item on an integer scale from 0 (not at all) "
         "to 10 (completely):\n{items}\n\nAnswer with one JSON object and nothing else, mapping each item name to its "
         "integer, e.g. {example}.")
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class Malformed(ValueError):
    """The model answered, but not with the scores asked for."""


class GaveUp(RuntimeError):
    """A transient failure (429, 5xx, a timeout) that outlasted the retries: the judgment is missing."""


def asked(sample: Sample) -> tuple[str, ...]:
    """The scores that apply: the image's only with an image, consistency only for an edit."""
    need_image = {"image_consistency", "image_alignment", "image_quality", "output_alignment"}
    return tuple(s for s in ASK if (s not in need_image or sample.image is not None)
                 and (s != "image_consistency" or sample.input_image is not None))


def parse_scores(content: str, names: Sequence[str]) -> dict[str, float]:
    """The one JSON object in ``content`` (a fenced block allowed), each asked name an integer 0..10."""
    found = re.findall(r"\{[^{}]*\}", content or "")
    if len(found) != 1:
        raise Malformed(f"expected one JSON object, found {len(found)}")
    try:
        obj = json.loads(found[0])
    except json.JSONDecodeError as err:
        raise Malformed(f"not JSON: {err}") from err
    out = {}
    for name in names:
        value = obj.get(name) if isinstance(obj, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not 0 <= value <= 10:
            raise Malformed(f"{name}: {value!r} is not an integer from 0 to 10")
        out[name] = float(value)
    return out


def pixels(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [0, 1] -> the 8-bit pixels the judge is shown (and the cache key is made of)."""
    return (image.clamp(0, 1) * 255).round().byte().cpu()


def png_url(image: torch.Tensor) -> str:
    from PIL import Image

    array = pixels(image).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def sample_digest(sample: Sample) -> str:
    """What the judgment depends on in the sample: its texts and the images' pixels."""
    h = hashlib.sha256(json.dumps([sample.task, sample.prompt, sample.text]).encode())
    for image in (sample.input_image, sample.image):
        h.update(b"-" if image is None else pixels(image).numpy().tobytes())
    return h.hexdigest()


@register_judge("vlm")
class VLMJudge:
    name = "vlm"
    gives = tuple(ASK)

    def __init__(self, base_url: str, model: str, api_key_env: Optional[str] = "OPENAI_API_KEY", concurrency: int = 4,
                 timeout_s: float = 60.0, retries: int = 3, malformed_retries: int = 1, backoff_s: float = 1.0,
                 max_tokens: int = 200, cache_dir: Optional[str] = None) -> None:
        if concurrency < 1 or retries < 0 or malformed_retries < 0 or timeout_s <= 0:
            raise ConfigError("vlm judge: concurrency >= 1, retries >= 0, malformed_retries >= 0 and timeout_s > 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.concurrency, self.timeout_s = model, concurrency, timeout_s
        self.retries, self.malformed_retries, self.backoff_s, self.max_tokens = retries, malformed_retries, backoff_s, max_tokens
        self._key_env = api_key_env
        self.cache = Path(cache_dir).expanduser() if cache_dir else Path("~/.cache/pararl/judgments").expanduser()
        templates = hashlib.sha256(json.dumps([INTRO, ASK]).encode()).hexdigest()[:12]
        self.identity = f"vlm:{self.model}:{TEMPLATE_VERSION}:{templates}"
        self.requests = 0  # requests sent (a cached judgment sends none)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self._key_env) if self._key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _body(self, sample: Sample, names: Sequence[str]) -> bytes:
        text = INTRO.format(prompt=sample.prompt, text=sample.text, items="\n".join(ASK[n] for n in names),
                            example=json.dumps({n: 7 for n in names}))
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        for image in (sample.input_image if "image_consistency" in names else None, sample.image):
            if image is not None:
                content.append({"type": "image_url", "image_url": {"url": png_url(image)}})
        return json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()

    def _post(self, body: bytes) -> str:
        """One answer's text; transient failures retried with backoff, the rest raised."""
        for attempt in range(self.retries + 1):
            self.requests += 1
            request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)["choices"][0]["message"]["content"] or ""
                except (ValueError, KeyError, IndexError, TypeError) as err:  # not a chat-completions answer
                    raise Malformed(f"the endpoint's answer is not a chat completion ({type(err).__name__})") from None
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_STATUS:  # a wrong key, model or URL: every request would fail the same
                    raise RuntimeError(f"vlm judge {self.model} at {self.url}: HTTP {err.code}") from None
                if attempt == self.retries:
                    raise GaveUp(f"HTTP {err.code}") from None
                wait = float(err.headers.get("Retry-After") or self.backoff_s * 2**attempt)
            except (urllib.error.URLError, TimeoutError, OSError) as err:
                if attempt == self.retries:
                    raise GaveUp(type(err).__name__) from None
                wait = self.backoff_s * 2**attempt
            log.warning("vlm judge %s: attempt %d failed, retrying in %.1f s", self.model, attempt + 1, wait)
            time.sleep(min(wait, 60.0))
        raise AssertionError("unreachable")

    def _one(self, sample: Sample) -> Judgment:
        names = asked(sample)
        path = self.cache / hashlib.sha256(f"{self.identity}|{sample_digest(sample)}".encode()).hexdigest()[:32]
        path = path.with_suffix(".json")
        if path.is_file():
            return json.loads(path.read_text())
        body = self._body(sample, names)
        judgment: Judgment = {n: None for n in names}
        for _ in range(self.malformed_retries + 1):
            try:
                judgment = parse_scores(self._post(body), names)
                break
            except Malformed as err:
                log.warning("vlm judge %s: malformed answer for %s (%s)", self.model, sample.key, err)
            except GaveUp as err:
                log.warning("vlm judge %s: no answer for %s after %d tries (%s)", self.model, sample.key,
                            self.retries + 1, err)
                break
        if all(v is not None for v in judgment.values()):  # a missing judgment is asked again next time
            atomic_write(path, json.dumps(judgment))
        return judgment

    def judge(self, samples: Sequence[Sample]) -> list[Judgment]:
        self.cache.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, samples))
