"""CLIP reward backends: open_clip, transformers ``CLIPModel``, and a plain Python function.

The score is the cosine similarity of the image and text embeddings (the unscaled CLIP score);
its scale does not matter because ParaRL standardises it with training-data statistics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from reward.base import as_scores, file_digest, import_object, register_reward_model

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def prepare_images(images: torch.Tensor, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> the model's input: resized (bicubic) and normalised, as its preprocess does."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
    x = images.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    m = torch.tensor(mean, device=x.device)[:, None, None]
    s = torch.tensor(std, device=x.device)[:, None, None]
    return (x - m) / s


def _cosine(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    return (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)


@register_reward_model("open_clip")
class OpenClipReward:
    """``model`` is an open_clip config name (built-in or registered with ``config_file``);
    ``pretrained`` a local weights file or a cached pretrained tag (no download at run time)."""

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None, config_file: str | None = None,
                 device: str = "cpu", precision: str = "fp32") -> None:
        import open_clip

        if config_file is not None:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"open_clip config file {config_file} does not exist")
            open_clip.add_model_config(config_file)
        self.identity = self.identity_of(model, pretrained)
        self.model, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device, precision=precision)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", self.model.visual.image_size)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean, self.std = cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD)
        self.device = device

    @staticmethod
    def identity_of(model: str = "ViT-B-32", pretrained: str | None = None, **_: Any) -> str:
        """The identity without building the model, so a run checks its reward stats before Ray starts."""
        if pretrained is not None and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
            if not Path(pretrained).is_file():
                raise FileNotFoundError(f"open_clip weights file {pretrained} does not exist")
            return f"open_clip:{model}:{file_digest(pretrained)}"
        return f"open_clip:{model}:{pretrained or 'random'}"

    @torch.inference_mode()
    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        x = prepare_images(images.to(self.device), self.size, self.mean, self.std)
        img = self.model.encode_image(x)
        txt = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        return as_scores(_cosine(img, txt), len(texts), self.identity)

    @torch.inference_mode()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (an edit's input against its output: the judges' image consistency)."""
        return self.model.encode_image(prepare_images(images.to(self.device), self.size, self.mean, self.std)).float().cpu()


@register_reward_model("hf_clip")
class HFClipReward:
    """transformers ``CLIPModel`` from a local folder; its own tokenizer if the folder has one,
    else open_clip's (the same BPE vocabulary, shipped with the package)."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a CLIPModel folder (no config.json)")
        self.model = CLIPModel.from_pretrained(str(folder)).to(device).eval()
        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
            self.tokenize = lambda t: tok(list(t), padding="max_length", truncation=True,
                                          max_length=self.model.config.text_config.max_position_embeddings,
                                          return_tensors="pt")["input_ids"]
        except (OSError, ValueError, TypeError):
            import open_clip

            ctx = self.model.config.text_config.max_position_embeddings
            simple = open_clip.get_tokenizer("ViT-B-32", context_length=ctx)
            self.tokenize = lambda t: simple(list(t))
        size = self.model.config.vision_config.image_size
        self.size, self.device = (size, size), device
        self.identity = self.identity_of(path)

    @staticmethod
    def identity_of(path: str, **_: Any) -> str:
        folder = Path(path)
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        return f"hf_clip:{folder.name}:{file_digest(weights[0]) if weights else 'unknown'}"

    @torch.inference_mode()
    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        x = prepare_images(images.to(self.device), self.size, CLIP_MEAN, CLIP_STD)
        img = self.model.get_image_features(pixel_values=x)
        txt = self.model.get_text_features(input_ids=self.tokenize(texts).to(self.device))
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        return as_scores(_cosine(img, txt), len(texts), self.identity)

    @torch.inference_mode()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        img = self.model.get_image_features(pixel_values=prepare_images(images.to(self.device), self.size, CLIP_MEAN, CLIP_STD))
        return getattr(img, "pooler_output", img).float().cpu()


@register_reward_model("function")
class FunctionReward:
    """A plain Python function ``fn(images, texts) -> scores``, named ``module:function``."""

    def __init__(self, fn: str | Callable[..., Any], **kwargs: Any) -> None:
        self.fn = import_object(fn) if isinstance(fn, str) else fn
        self.kwargs = kwargs
        self.identity = self.identity_of(fn)

    @staticmethod
    def identity_of(fn: str | Callable[..., Any], **_: Any) -> str:
        return f"function:{fn if isinstance(fn, str) else getattr(fn, '__qualname__', fn)}"

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        return as_scores(self.fn(images, list(texts), **self.kwargs), len(texts), self.identity)
