"""A reward backend that calls another machine's reward pool over its token-protected HTTP route.

It lets a reward model with conflicting dependencies run in its own environment: that environment
runs the pool with ``reward.http.enabled=true``, and this run names the URL.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Sequence

import torch

from pararl.errors import ConfigError, RunError
from reward.base import as_scores, register_reward_model
from reward.messages import encode_images


@register_reward_model("remote")
class RemoteReward:
    def __init__(self, url: str, label: str | None = None, token: str | None = None,
                 token_env: str = "PARARL_REWARD_TOKEN", timeout_s: float = 60.0) -> None:
        self.url, self.timeout_s = url, timeout_s
        self.token = token or os.environ.get(token_env)
        if not self.token:
            raise ConfigError(f"remote reward {url}: no token (pass token or set ${token_env})")
        identities = self._post(torch.zeros(0, 3, 1, 1), [])["identities"]
        if label is None and len(identities) != 1:
            raise ConfigError(f"remote reward {url} serves {sorted(identities)}: name one with label")
        self.label = label or next(iter(identities))
        if self.label not in identities:
            raise ConfigError(f"remote reward {url} has no reward model {self.label!r}; it serves {sorted(identities)}")
        self.identity = f"remote:{identities[self.label]}"

    def _post(self, images: torch.Tensor, texts: Sequence[str]) -> dict:
        body = json.dumps({"images": encode_images(images) if len(texts) else "", "texts": list(texts)}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raise RunError(f"remote reward {self.url} answered {err.code}: {err.read().decode(errors='replace')}") from err
        except urllib.error.URLError as err:
            raise RunError(f"remote reward {self.url} is unreachable: {err.reason}") from err

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        return as_scores(self._post(images, texts)["scores"][self.label], len(texts), self.identity)
