"""A noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4).

The U-Net's encoder half, from ``ddpm_fast.unet``'s own blocks: time embedding, conv_in, the down
path (ResBlocks with the time embedding, attention where configured, downsampling) and the middle
(ResBlock, attention, ResBlock), then GroupNorm + SiLU and a pooled head:

    x_t, t -> conv_in -> [level 0 .. L-1: num_res_blocks x (ResBlock [+ attention]), downsample]
           -> middle -> GroupNorm + SiLU -> pool -> (N, num_classes) logits

``pool="attention"`` is their attention pooling (``AttentionPool2d``: the mean token prepended,
learned positional embeddings, multi-head attention read at the mean token, a linear projection);
it fixes the input size (``sample_size``). ``pool="mean"``: a spatial mean and a linear layer (any
size divisible by 2 ** (levels - 1)).

``sample(model, classifier=clf, classifier_scale=s, class_labels=y)`` guides an (unconditional)
diffusion model with it; ``ddpm-fast train --task classifier`` trains it on noised images
(``ddpm_fast.train_classifier``). Presets: ``"classifier"`` (Dhariwal's classifier settings at 32x32:
width 128, two ResBlocks per level, attention at 16x16 and 8x8, scale-shift time conditioning,
attention pooling) and ``"tiny"`` (the tiny U-Net's encoder, for the digits on a CPU).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._backends import op_backend
from ._fileio import atomic_directory, read_manifest, read_verified
from .ops import group_norm_silu
from .unet import Level, Middle, TimeEmbedding, UNetConfig, timestep_embedding

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_FORMAT = "ddpm_fast.Classifier"
POOLS = ("attention", "mean")
# The architecture fields shared with UNetConfig (their meaning and checks are the U-Net's).
_ENCODER_FIELDS = (
    "sample_size",
    "in_channels",
    "base_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "mid_attention",
    "num_heads",
    "head_channels",
    "dropout",
    "num_groups",
    "norm_eps",
    "time_conditioning",
    "time_embed_dim",
    "flip_sin_to_cos",
    "freq_shift",
    "downsample_padding",
)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The classifier's architecture: ``num_classes`` outputs, the head (``pool``, and for attention
    pooling ``pool_head_channels`` per head), and the encoder fields of ``UNetConfig`` (same names,
    meanings and checks: ``encoder_config()``)."""

    num_classes: int = 10
    pool: str = "attention"
    pool_head_channels: int = 64
    sample_size: int = 32
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)
    mid_attention: bool = True
    num_heads: int = 1
    head_channels: int | None = 64
    dropout: float = 0.0
    num_groups: int = 32
    norm_eps: float = 1e-6
    time_conditioning: str = "scale_shift"
    time_embed_dim: int | None = None
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    downsample_padding: int = 0

    def __post_init__(self) -> None:
        for name in ("channel_mult", "attention_resolutions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"ClassifierConfig.num_classes must be an int >= 2, got {self.num_classes!r}")
        if self.pool not in POOLS:
            raise ValueError(f"ClassifierConfig.pool must be one of {POOLS}, got {self.pool!r}")
        if not isinstance(self.pool_head_channels, int) or self.pool_head_channels < 1:
            raise ValueError(
                f"ClassifierConfig.pool_head_channels must be a positive int, got {self.pool_head_channels!r}"
            )
        self.encoder_config()  # the U-Net's checks of the shared fields

    def encoder_config(self) -> UNetConfig:
        """The U-Net config whose encoder half this is (unconditional)."""
        return UNetConfig(**{name: getattr(self, name) for name in _ENCODER_FIELDS})

    @property
    def out_channels(self) -> int:
        return self.base_channels * self.channel_mult[-1]

    @property
    def pool_heads(self) -> int:
        return max(1, self.out_channels // self.pool_head_channels)

    @property
    def pool_tokens(self) -> int:
        side = self.sample_size >> (len(self.channel_mult) - 1)
        return side * side

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassifierConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown ClassifierConfig keys {unknown} (is this a U-Net's config?); valid: {sorted(names)}"
            )
        return cls(**d)


_TINY = dict(
    base_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    num_groups=8,
    head_channels=None,
    pool_head_channels=32,
    time_conditioning="add",
)
PRESETS: dict[str, dict[str, Any]] = {"classifier": {}, "tiny": _TINY}


def preset_config(name: str, **overrides: Any) -> ClassifierConfig:
    """A preset's ClassifierConfig ("classifier", "tiny") with overrides. Attention goes where the
    preset's U-Net has it: at sample_size // 2 (and // 4 for "classifier") unless overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown classifier preset {name!r}; presets: {', '.join(PRESETS)}")
    kwargs = {**PRESETS[name], **overrides}
    if "attention_resolutions" not in overrides:
        size = kwargs.get("sample_size", 32)
        kwargs["attention_resolutions"] = (size // 2,) if name == "tiny" else (size // 2, size // 4)
    return ClassifierConfig(**kwargs)


class AttentionPool(nn.Module):
    """Dhariwal & Nichol's AttentionPool2d (after CLIP's): tokens = [mean, pixels] + positional
    embeddings, multi-head attention, read at the mean token, projected to ``out_dim``. Only the
    mean token's query is computed (the other tokens' outputs are never read)."""

    def __init__(self, tokens: int, channels: int, heads: int, out_dim: int):
        super().__init__()
        self.tokens, self.heads = tokens, heads
        self.pos = nn.Parameter(torch.randn(tokens + 1, channels) / channels**0.5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, c = h.shape[:2]
        if h.shape[2] * h.shape[3] != self.tokens:
            raise ValueError(
                f"attention pooling was built for {self.tokens} positions, got {tuple(h.shape[2:])}: the input "
                "must be sample_size x sample_size (or use pool='mean')"
            )
        x = h.flatten(2).transpose(1, 2)  # (N, S, C)
        x = torch.cat([x.mean(1, keepdim=True), x], dim=1) + self.pos.to(x.dtype)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        split = lambda z: z.reshape(n, z.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q[:, :1]), split(k), split(v))  # (N, heads, 1, C / heads)
        return self.proj(o.transpose(1, 2).reshape(n, c))


class Classifier(nn.Module):
    """``classifier(x_t, t)`` -> (N, num_classes) float32 logits of p(y | x_t, t).

    Attributes: ``config`` (ClassifierConfig), ``num_classes``, ``in_channels``, ``sample_size``,
    ``backend`` (the fused ops' backend, as ``UNet.backend``)."""

    def __init__(self, config: ClassifierConfig, *, backend: str | None = None):
        super().__init__()
        if not isinstance(config, ClassifierConfig):
            raise TypeError(f"Classifier takes a ClassifierConfig, got {type(config).__name__}")
        self.config, self.backend = config, backend
        enc = config.encoder_config()
        blocks, k, chans = enc.block_channels()["down"], enc.num_res_blocks, enc.level_channels
        self.conv_in = nn.Conv2d(enc.in_channels, enc.base_channels, 3, padding=1)
        self.time_embed = TimeEmbedding(enc)
        pad = enc.downsample_padding
        self.down = nn.ModuleList(
            Level(
                blocks[i * k : (i + 1) * k],
                enc.attention_at(i),
                nn.Conv2d(c, c, 3, stride=2, padding=pad) if i < enc.num_levels - 1 else None,
                enc,
            )
            for i, c in enumerate(chans)
        )
        self.mid = Middle(chans[-1], enc)
        self.norm_out = nn.GroupNorm(enc.num_groups, chans[-1], enc.norm_eps)
        if config.pool == "attention":
            self.head = AttentionPool(config.pool_tokens, chans[-1], config.pool_heads, config.num_classes)
        else:
            self.head = nn.Linear(chans[-1], config.num_classes)
        self.to(memory_format=torch.channels_last)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def sample_size(self) -> int:
        return self.config.sample_size

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @classmethod
    def from_preset(cls, name: str, *, backend: str | None = None, **overrides: Any) -> Classifier:
        return cls(preset_config(name, **overrides), backend=backend)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        """x: (N, in_channels, H, W) float (H, W divisible by 2 ** (levels - 1); sample_size for
        attention pooling); t: (N,) timesteps (int64 or float), a scalar tensor or a number.
        Returns (N, num_classes) float32 logits."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() != 4:
            raise TypeError(f"x must be a float (N, {cfg.in_channels}, H, W) tensor, got {getattr(x, 'shape', x)!r}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels; this classifier takes {cfg.in_channels}")
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x's height and width {tuple(x.shape[2:])} must be divisible by {factor}")
        n = x.shape[0]
        if not isinstance(t, torch.Tensor):
            t = torch.full((n,), float(t), device=x.device)
        t = t.to(x.device).reshape(-1).expand(n) if t.numel() == 1 else t.to(x.device)
        if t.shape != (n,):
            raise ValueError(f"t must be a scalar or have shape ({n},), got {tuple(t.shape)}")
        backend = op_backend("group_norm_silu", self.backend)
        emb = timestep_embedding(t, cfg.base_channels, cfg.flip_sin_to_cos, cfg.freq_shift).to(self.dtype)
        emb = F.silu(self.time_embed.linear_2(F.silu(self.time_embed.linear_1(emb))))

        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))
        for level in self.down:
            for i, block in enumerate(level.res):
                h = block(h, emb, backend)
                if level.attn is not None:
                    h = level.attn[i](h, backend)
            if level.resample is not None:
                if cfg.downsample_padding == 0:
                    h = F.pad(h, (0, 1, 0, 1))
                h = level.resample(h)
        h = self.mid.res[0](h, emb, backend)
        if self.mid.attn is not None:
            h = self.mid.attn(h, backend)
        h = self.mid.res[1](h, emb, backend)
        nrm = self.norm_out
        h = group_norm_silu(h, nrm.num_groups, nrm.weight, nrm.bias, nrm.eps, backend=backend)
        if cfg.pool == "mean":
            return self.head(h.mean(dim=(2, 3))).float()
        return self.head(h).float()

    # -------------------------------------------------- files
    def save(self, path_dir: str | os.PathLike) -> Path:
        """``config.json`` + ``model.safetensors`` (+ ``manifest.json``), written atomically (as UNet.save)."""
        from safetensors.torch import save_file

        target = Path(path_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        config_json = json.dumps(self.config.to_dict(), indent=2, sort_keys=True)
        with atomic_directory(target) as tmp:
            (tmp / CONFIG_NAME).write_text(config_json + "\n")
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": _FORMAT, "config": config_json})
        return target

    @classmethod
    def load(cls, path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Classifier:
        """A classifier from ``save``'s directory, or the EMA weights of a training checkpoint (a run,
        checkpoints or step directory of ``ddpm-fast train --task classifier``); in eval mode."""
        from safetensors.torch import load_file

        from . import checkpoint as ckpt

        path = Path(path)
        if (path / WEIGHTS_NAME).is_file() and not (path / "ema.safetensors").is_file():
            manifest = read_manifest(path)
            config = read_verified(path / CONFIG_NAME, manifest, lambda p: json.loads(p.read_text()))
            weights = read_verified(path / WEIGHTS_NAME, manifest, lambda p: load_file(str(p)))
        else:
            loaded = ckpt.load_checkpoint(path, training_state=False, weights=False)
            config, weights = loaded.model_config, loaded.ema_state
        model = cls(ClassifierConfig.from_dict(config))
        model.load_state_dict(weights)
        return model.to(map_location).eval()


def build_classifier(preset: str, in_channels: int, num_classes: int, image_size: int) -> Classifier:
    """The trainer's classifier: a preset for this data (channels, classes, image side)."""
    return Classifier.from_preset(preset, in_channels=in_channels, num_classes=num_classes, sample_size=image_size)
