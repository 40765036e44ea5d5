"""CLIP-based rewards: CLIPScore, PickScore and the LAION aesthetic predictor v2.

All three embed images with a ``transformers.CLIPModel`` loaded from a hub id or a local folder
(``save_pretrained`` layout), in bf16/fp16 on a GPU and fp32 on the CPU, in batches of ``batch_size``. Images
are preprocessed by the checkpoint's own image processor (resize, centre crop, normalise) from 8-bit PIL
images, as the reference implementations (PickScore's, flow_grpo's, DDPO's) feed them; text is tokenised
by its tokenizer, padded to the model's full length so a prompt's embedding does not depend on its batch.
Each prompt is embedded once per batch (a GRPO batch repeats every prompt G times).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rewards.base import register, resolve_device, resolve_dtype, resolve_file, to_pil


def _load(loader: Callable, source: str, what: str, kwarg: str):
    try:
        return loader(source)
    except (OSError, ValueError) as error:
        raise OSError(
            f"cannot load the {what} from {source!r} ({type(error).__name__}: {error}). Pass a local folder "
            f"(save_pretrained layout) as reward_kwargs {kwarg!r}, or allow downloads (unset HF_HUB_OFFLINE)."
        ) from error


class ClipEmbedder:
    """A CLIP model with its tokenizer and image processor; unit-norm image and text embeddings.

    Args:
        model: hub id or local folder of a ``CLIPModel``.
        processor: hub id or folder of its tokenizer and image processor (default: ``model``'s own).
        device: default this process's GPU, else CPU.
        dtype: ``"auto"`` (bf16/fp16 on GPU, fp32 on CPU), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        batch_size: images (and prompts) per forward pass.
    """

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 32,
    ) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        clip = _load(CLIPModel.from_pretrained, model, "CLIP model", "model")
        # read before the cast: in bf16 ln(100) rounds to 4.594 and PickScore would read 1.1% low
        self._logit_scale = clip.logit_scale.detach().float().exp().cpu()
        self.model = clip.to(self.device, self.dtype).eval().requires_grad_(False)
        source = processor or model
        self.tokenizer = _load(AutoTokenizer.from_pretrained, source, "CLIP tokenizer", "processor")
        self.image_processor = _load(AutoImageProcessor.from_pretrained, source, "CLIP image processor", "processor")
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` at the checkpoint's precision (fp32), whatever dtype the model runs in."""
        return self._logit_scale

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, D]`` unit-norm fp32 (CPU)."""
        embeddings = []
        for chunk in images.split(self.batch_size):
            pixels = self.image_processor(images=to_pil(chunk), return_tensors="pt").pixel_values
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
            embeddings.append(F.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu())
        return torch.cat(embeddings)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """B prompts -> ``[B, D]`` unit-norm fp32 (CPU); repeated prompts are embedded once."""
        unique = list(dict.fromkeys(prompts))
        embeddings = []
        for start in range(0, len(unique), self.batch_size):
            tokens = self.tokenizer(
                unique[start : start + self.batch_size],
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            pooled = self.model.text_model(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            ).pooler_output
            embeddings.append(F.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu())
        table = torch.cat(embeddings)
        return table[torch.tensor([unique.index(p) for p in prompts])]


@register("clipscore")
class ClipScore:
    """CLIPScore (Hessel et al., 2021): ``score = w * max(cos(image, prompt), 0)``, w = 2.5; ``cosine`` raw.

    Default model CLIP ViT-L/14 (``openai/clip-vit-large-patch14``), as flow_grpo and DanceGRPO use.
    """

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        w: float = 2.5,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 32,
    ) -> None:
        self.clip = ClipEmbedder(model, processor, device, dtype, batch_size)
        self.w = w

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        cosine = (self.clip.embed_images(images) * self.clip.embed_texts(prompts)).sum(-1)
        return {"score": self.w * cosine.clamp(min=0), "cosine": cosine}


@register("pickscore")
class PickScore:
    """PickScore (Kirstain et al., 2023): ``score = scale * logit_scale * cos(image, prompt)``, about 17-24.

    The model is a fine-tuned CLIP ViT-H/14 (``yuvalkirstain/PickScore_v1``) with the processor of the
    LAION CLIP it started from. ``scale`` rescales the score (flow_grpo uses 1/26); 1 gives the paper's.
    """

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        scale: float = 1.0,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 32,
    ) -> None:
        self.clip = ClipEmbedder(model, processor, device, dtype, batch_size)
        self.scale = scale

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        cosine = (self.clip.embed_images(images) * self.clip.embed_texts(prompts)).sum(-1)
        return {"score": self.scale * self.clip.logit_scale * cosine}


def mlp_from_state_dict(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """The aesthetic predictor's MLP head, its layer sizes read from its weights.

    The LAION head is ``nn.Sequential`` with Linear layers at indices 0, 2, 4, 6, 7 and Dropout between
    (768 -> 1024 -> 128 -> 64 -> 16 -> 1); Dropout is the identity at inference, so any index not holding a
    Linear becomes ``nn.Identity``. Keys may carry a ``layers.`` prefix (DDPO's and TRL's files do).

    Raises:
        ValueError: when the weights are not such a head.
    """
    state = {key.removeprefix("layers."): value for key, value in state.items()}
    indices = sorted({int(key.split(".")[0]) for key in state if key.split(".")[0].isdigit()})
    if not indices or len(state) != 2 * len(indices):
        raise ValueError(f"not an MLP head state dict (keys: {sorted(state)[:8]})")
    layers: list[nn.Module] = [nn.Identity() for _ in range(indices[-1] + 1)]
    for index in indices:
        out_features, in_features = state[f"{index}.weight"].shape
        layers[index] = nn.Linear(in_features, out_features)
    head = nn.Sequential(*layers)
    head.load_state_dict(state)
    if head[indices[-1]].out_features != 1:
        raise ValueError(f"the aesthetic head must end in one output, got {head[indices[-1]].out_features}")
    return head


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``torch.save`` file (loaded with ``weights_only=True``)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


@register("aesthetic")
class AestheticScore:
    """LAION aesthetic predictor v2: an MLP on the unit-norm CLIP ViT-L/14 image embedding, scores ~1-10.

    Args:
        model: the CLIP it was trained on (hub id or folder); its embedding width must match the head's input.
        head: the MLP head weights: a local file, a local folder or a hub repo id holding ``head_file``.
            Default: the head DDPO and TRL use (``sac+logos+ava1-l14-linearMSE.pth``).
        head_file: the file name inside ``head`` when it is a folder or repo.
        device, dtype, batch_size: as for :class:`ClipEmbedder`; the head runs in fp32.
    """

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        head: str = "trl-lib/ddpo-aesthetic-predictor",
        head_file: str | None = "aesthetic-model.pth",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 32,
    ) -> None:
        self.clip = ClipEmbedder(model, None, device, dtype, batch_size)
        self.head = mlp_from_state_dict(load_state_dict_file(resolve_file(head, head_file, "aesthetic head")))
        self.head.eval().requires_grad_(False)
        width = self.clip.model.config.projection_dim
        head_width = next(layer for layer in self.head if isinstance(layer, nn.Linear)).in_features
        if head_width != width:
            raise ValueError(
                f"the aesthetic head takes {head_width}-d embeddings but the CLIP model {model!r} "
                f"gives {width}-d ones; the LAION head needs CLIP ViT-L/14 (768-d)"
            )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        return {"score": self.head(self.clip.embed_images(images)).squeeze(-1)}
