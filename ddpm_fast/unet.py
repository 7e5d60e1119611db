"""The DDPM U-Net (Ho et al. 2020, as diffusers' UNet2DModel builds it) on ddpm_fast's fused ops.

    x -> conv_in -> [level 0 .. L-1: num_res_blocks x (ResBlock [+ attention]), downsample] -> middle
      (ResBlock, attention, ResBlock) -> [level L-1 .. 0: (num_res_blocks + 1) x (concat skip, ResBlock
      [+ attention]), upsample] -> GroupNorm + SiLU -> conv_out

Every GroupNorm + SiLU runs through ``ops.group_norm_silu`` with the time embedding folded in (added
before the statistics for ``time_conditioning="add"``, DDPM's; ``(1 + scale) n + shift`` after them
for ``"scale_shift"``, improved-diffusion's), self-attention through ``attention_block`` (GroupNorm,
one (3C, C) qkv projection, softmax attention over the H*W pixels, output projection and the
residual add in one call). Activations are channels_last; under bf16 autocast the convolutions and
projections run in bf16 and the norm statistics and softmax in fp32 (inside the ops).

``UNet(config, backend=...)`` (or ``model.backend = ...``) picks the ops' backend: ``None`` = the
fastest here, ``"reference"`` = ``ddpm_fast.reference``'s plain PyTorch (the tests' oracle).

Checkpoints: ``model.save(dir)`` writes ``config.json`` and ``model.safetensors`` (the config also in
the safetensors metadata) and ``manifest.json`` (their sha256); ``UNet.load(dir or file)`` checks the
files against it and names a damaged one in a ``CheckpointError``. diffusers ``UNet2DModel`` weights
go both ways through ``UNet.from_diffusers`` / ``model.to_diffusers()`` (``ddpm_fast.unet_diffusers``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._backends import op_backend
from ._fileio import CheckpointError, atomic_directory, read_manifest, read_verified
from .ops import attention_block, group_norm_silu
from .ops._common import value_checks_enabled

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_FORMAT = "ddpm_fast.UNet"
TIME_CONDITIONINGS = ("add", "scale_shift")


# ---------------------------------------------------------------- configuration
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Everything that fixes the U-Net's architecture (and so its weights' shapes).

    Attributes:
        sample_size: training image side (square); it places ``attention_resolutions`` on levels.
            Inputs may have any H, W divisible by 2 ** (levels - 1).
        in_channels: image channels in.
        out_channels: image channels out (None = in_channels); the network outputs 2 * out_channels
            with learned_variance.
        base_channels: channels of level 0; level i has base_channels * channel_mult[i].
        channel_mult: one multiplier per level (resolution halves from one level to the next).
        num_res_blocks: ResBlocks per level on the way down (num_res_blocks + 1 on the way up).
        attention_resolutions: image sides (e.g. 16 for 16x16 at sample_size 32) whose levels have
            self-attention after every ResBlock.
        mid_attention: self-attention between the two middle ResBlocks (diffusers' add_attention).
        num_heads: attention heads (used when head_channels is None).
        head_channels: channels per head, the heads then being C // head_channels (diffusers'
            attention_head_dim); None = num_heads heads.
        dropout: dropout before each ResBlock's second convolution.
        num_groups: GroupNorm groups everywhere; norm_eps: their epsilon.
        time_conditioning: "add" (DDPM: the projected time embedding is added before the second
            GroupNorm) or "scale_shift" (improved-diffusion: n (1 + scale) + shift after it).
        time_embed_dim: width of the time-embedding MLP; None = 4 * base_channels.
        num_classes: class-conditional with this many classes (plus a null label for classifier-free
            guidance, index num_classes); None = unconditional.
        learned_variance: output 2 * out_channels (the second half: the variance).
        flip_sin_to_cos, freq_shift: the sinusoidal embedding as diffusers' Timesteps (DDPM: False, 1).
        downsample_padding: 0 = pad (0, 1, 0, 1) then a stride-2 3x3 conv (DDPM's TF "SAME"), 1 = a
            symmetric padding of 1.
        cond_channels: super-resolution (cascades): channels of a low-resolution conditioning image,
            upsampled bilinearly to the sample's size and concatenated after x's channels before conv_in
            (improved-diffusion's SuperResModel); 0 = no conditioning image (the default).
        cond_noise_embedding: conditioning augmentation (Ho et al. 2021, cascaded diffusion): the model
            also takes the level s at which the conditioning image was noised (a timestep of the
            schedule), embedded as t is (sinusoids + its own MLP) and added to the time embedding.
            Needs cond_channels > 0.

    ``to_dict`` leaves out cond_channels and cond_noise_embedding at their defaults, so that the
    config of a model without conditioning is written as it was before they existed.
    """

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    mid_attention: bool = True
    num_heads: int = 1
    head_channels: int | None = None
    dropout: float = 0.0
    num_groups: int = 32
    norm_eps: float = 1e-6
    time_conditioning: str = "add"
    time_embed_dim: int | None = None
    num_classes: int | None = None
    learned_variance: bool = False
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    downsample_padding: int = 0
    cond_channels: int = 0
    cond_noise_embedding: bool = False

    def __post_init__(self) -> None:
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        for name in ("channel_mult", "attention_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
                raise TypeError(f"UNetConfig.{name} must be a sequence of ints, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        positive = ("sample_size", "in_channels", "out_channels", "base_channels", "num_groups", "num_heads")
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"UNetConfig.{name} must be a positive int, got {value!r}")
        if not _is_int(self.num_res_blocks) or self.num_res_blocks < 1:
            raise ValueError(f"UNetConfig.num_res_blocks must be an int >= 1, got {self.num_res_blocks!r}")
        for name in ("head_channels", "time_embed_dim", "num_classes"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(f"UNetConfig.{name} must be a positive int or None, got {value!r}")
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ValueError(f"UNetConfig.channel_mult must be non-empty positive ints, got {self.channel_mult}")
        for name in ("mid_attention", "learned_variance", "flip_sin_to_cos", "cond_noise_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"UNetConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.time_conditioning not in TIME_CONDITIONINGS:
            raise ValueError(
                f"UNetConfig.time_conditioning must be one of {TIME_CONDITIONINGS}, got {self.time_conditioning!r}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"UNetConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"UNetConfig.norm_eps must be a number > 0, got {self.norm_eps!r}")
        if isinstance(self.freq_shift, bool) or not isinstance(self.freq_shift, (int, float)):
            raise TypeError(f"UNetConfig.freq_shift must be a number, got {self.freq_shift!r}")
        if self.downsample_padding not in (0, 1) or isinstance(self.downsample_padding, bool):
            raise ValueError(f"UNetConfig.downsample_padding must be 0 or 1, got {self.downsample_padding!r}")
        if not _is_int(self.cond_channels) or self.cond_channels < 0:
            raise ValueError(f"UNetConfig.cond_channels must be an int >= 0, got {self.cond_channels!r}")
        if self.cond_noise_embedding and not self.cond_channels:
            raise ValueError(
                "UNetConfig.cond_noise_embedding (conditioning augmentation) needs a conditioning image: "
                "set cond_channels > 0"
            )
        if self.base_channels // 2 - self.freq_shift == 0:
            raise ValueError(
                "UNetConfig.freq_shift must differ from base_channels // 2 (it divides by their difference)"
            )
        self._check_shapes()

    # -------------------------------------------------- derived facts
    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def time_channels(self) -> int:
        return self.time_embed_dim if self.time_embed_dim is not None else 4 * self.base_channels

    @property
    def model_out_channels(self) -> int:
        """Channels of the network's output: 2 * out_channels with learned variance."""
        return 2 * self.out_channels if self.learned_variance else self.out_channels

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The image side at each level for a sample_size input."""
        return tuple(self.sample_size >> i for i in range(self.num_levels))

    def attention_at(self, level: int) -> bool:
        return self.resolutions[level] in self.attention_resolutions

    def heads(self, channels: int) -> int:
        return channels // self.head_channels if self.head_channels is not None else self.num_heads

    def block_channels(self) -> dict[str, list[tuple[int, int]]]:
        """(in, out) channels of every ResBlock: {"down": ..., "mid": ..., "up": ...} in execution order.

        Up-block inputs are the concatenation [h, skip] (e.g. 384 and 512 in the CIFAR-10 model)."""
        chans = self.level_channels
        skips = [self.base_channels]  # conv_in's output is the first skip
        down, ch = [], self.base_channels
        for level, out in enumerate(chans):
            for _ in range(self.num_res_blocks):
                down.append((ch, out))
                ch = out
                skips.append(ch)
            if level < self.num_levels - 1:
                skips.append(ch)  # the downsampled tensor
        mid = [(ch, ch), (ch, ch)]
        up = []
        for out in reversed(chans):
            for _ in range(self.num_res_blocks + 1):
                up.append((ch + skips.pop(), out))
                ch = out
        return {"down": down, "mid": mid, "up": up}

    def _check_shapes(self) -> None:
        factor = 2 ** (self.num_levels - 1)
        if self.sample_size % factor:
            raise ValueError(
                f"UNetConfig.sample_size={self.sample_size} must be divisible by 2 ** (levels - 1) = {factor} "
                f"({self.num_levels} levels from channel_mult)"
            )
        unknown = sorted(set(self.attention_resolutions) - set(self.resolutions))
        if unknown:
            raise ValueError(
                f"UNetConfig.attention_resolutions {unknown} never occur: with sample_size={self.sample_size} and "
                f"{self.num_levels} levels the resolutions are {list(self.resolutions)}"
            )
        g = self.num_groups
        widths = [("conv_in output", self.base_channels)]
        for part, blocks in self.block_channels().items():
            for i, (cin, cout) in enumerate(blocks):
                widths += [(f"{part} ResBlock {i} input", cin), (f"{part} ResBlock {i} output", cout)]
        for where, c in widths:
            if c % g:
                raise ValueError(f"GroupNorm over {c} channels ({where}) is not divisible by num_groups={g}")
        attn_channels = [c for lvl, c in enumerate(self.level_channels) if self.attention_at(lvl)]
        if self.mid_attention:
            attn_channels.append(self.level_channels[-1])
        for c in attn_channels:
            if self.head_channels is not None and c % self.head_channels:
                raise ValueError(f"attention over {c} channels is not divisible by head_channels={self.head_channels}")
            if self.head_channels is None and c % self.num_heads:
                raise ValueError(f"attention over {c} channels is not divisible by num_heads={self.num_heads}")

    # -------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples as lists); fields added later are left out at their defaults."""
        return {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
            if not (f.name in _OMITTED_AT_DEFAULT and v == f.default)
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """The inverse of to_dict; unknown keys are an error (a config of another model)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"UNetConfig.from_dict takes a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> UNetConfig:
        return UNetConfig.from_dict({**self.to_dict(), **changes})


# Fields added after configs were first written: left out of to_dict at their defaults (same files as before).
_OMITTED_AT_DEFAULT = frozenset({"cond_channels", "cond_noise_embedding"})

_CIFAR10 = dict(
    sample_size=32,
    base_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16,),
    dropout=0.1,
)
# Ho et al.'s 256x256 models (google/ddpm-celebahq-256, -church-256, -bedroom-256: dropout 0).
_256 = dict(
    sample_size=256,
    base_channels=128,
    channel_mult=(1, 1, 2, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(16,),
    dropout=0.0,
)
# Small enough to train on 2 CPU cores in minutes; attention at the middle level (sample_size // 2
# unless attention_resolutions is overridden).
_TINY = dict(sample_size=32, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, num_groups=8)
# Latent diffusion (Rombach et al. 2022) in a 4-channel autoencoder latent (SD's f = 8 VAE: 256 px -> 32x32,
# 512 px -> 64x64), after LDM's configs: attention at the latent's 1/2, 1/4 (and 1/8) sides, 32-channel heads.
_LATENT32 = dict(
    sample_size=32,
    in_channels=4,
    base_channels=128,
    channel_mult=(1, 2, 2, 4),
    num_res_blocks=2,
    attention_resolutions=(16, 8),
    head_channels=32,
    dropout=0.0,
)
_LATENT64 = dict(_LATENT32, sample_size=64, channel_mult=(1, 2, 3, 4), attention_resolutions=(32, 16, 8))
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": _CIFAR10,
    "celebahq256": _256,
    "lsun256": _256,
    "tiny": _TINY,
    "latent32": _LATENT32,
    "latent64": _LATENT64,
}


def preset_config(name: str, **overrides: Any) -> UNetConfig:
    """The UNetConfig of a preset ("cifar10", "celebahq256", "lsun256", "tiny", "latent32", "latent64") with
    overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}; presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown UNetConfig keys {unknown}; valid keys: {sorted(fields)}")
    kwargs = {**PRESETS[name], **overrides}
    if name == "tiny" and "attention_resolutions" not in overrides:
        kwargs["attention_resolutions"] = (kwargs["sample_size"] // 2,)
    return UNetConfig(**kwargs)


# ---------------------------------------------------------------- building blocks
def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) fp32 sinusoids, computed as diffusers' get_timestep_embedding."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """GroupNorm+SiLU -> conv -> (+ time embedding) GroupNorm+SiLU -> dropout -> conv, plus the
    (1x1-projected when the width changes) input: diffusers' ResnetBlock2D."""

    def __init__(self, cin: int, cout: int, config: UNetConfig):
        super().__init__()
        g, eps = config.num_groups, config.norm_eps
        self.scale_shift = config.time_conditioning == "scale_shift"
        self.norm1 = nn.GroupNorm(g, cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_proj = nn.Linear(config.time_channels, 2 * cout if self.scale_shift else cout)
        self.norm2 = nn.GroupNorm(g, cout, eps)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, backend: str | None) -> torch.Tensor:
        """x: (N, cin, H, W); emb: (N, time_channels), SiLU already applied (shared by every block)."""
        n1, n2 = self.norm1, self.norm2
        h = self.conv1(group_norm_silu(x, n1.num_groups, n1.weight, n1.bias, n1.eps, backend=backend))
        t = self.time_proj(emb)
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = group_norm_silu(
                h, n2.num_groups, n2.weight, n2.bias, n2.eps, scale_nc=scale, shift_nc=shift, backend=backend
            )
        else:
            h = group_norm_silu(h, n2.num_groups, n2.weight, n2.bias, n2.eps, bias_nc=t, backend=backend)
        h = self.conv2(self.dropout(h))
        # the skip follows a convolution, so no op can fold it: add in place into conv2's fresh output
        return h.add_(x if self.skip is None else self.skip(x))


class Attention(nn.Module):
    """Self-attention over the H*W pixels with its GroupNorm and residual (one attention_block call)."""

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        self.num_heads = config.heads(channels)
        self.norm = nn.GroupNorm(config.num_groups, channels, config.norm_eps)
        self.qkv = nn.Linear(channels, 3 * channels)  # rows [q; k; v]
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, backend: str | None) -> torch.Tensor:
        return attention_block(
            x,
            self.norm.weight,
            self.norm.bias,
            self.qkv.weight,
            self.qkv.bias,
            self.proj.weight,
            self.proj.bias,
            num_groups=self.norm.num_groups,
            eps=self.norm.eps,
            num_heads=self.num_heads,
            backend=op_backend("attention", backend),
        )


class Level(nn.Module):
    """One resolution of the down or up path: ResBlocks (each followed by attention if any) and the
    resampling convolution (None at the last level of each path)."""

    def __init__(self, blocks: list[tuple[int, int]], attention: bool, resample: nn.Module | None, config: UNetConfig):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(cin, cout, config) for cin, cout in blocks)
        self.attn = nn.ModuleList(Attention(cout, config) for _, cout in blocks) if attention else None
        self.resample = resample


class Middle(nn.Module):
    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        self.res = nn.ModuleList([ResBlock(channels, channels, config), ResBlock(channels, channels, config)])
        self.attn = Attention(channels, config) if config.mid_attention else None


class TimeEmbedding(nn.Module):
    """Sinusoids -> Linear -> SiLU -> Linear (diffusers' Timesteps + TimestepEmbedding)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.base_channels, config.time_channels)
        self.linear_2 = nn.Linear(config.time_channels, config.time_channels)


# ---------------------------------------------------------------- the model
class UNet(nn.Module):
    """The DDPM U-Net. ``model(x, t, class_labels=None)`` -> (N, model_out_channels, H, W);
    a super-resolution model (``config.cond_channels > 0``) also takes ``low_res=`` (and ``aug_level=``).

    Attributes: ``config`` (UNetConfig), ``in_channels``, ``sample_size``, ``null_class_label``
    (num_classes for a class-conditional model, whose label embedding has num_classes + 1 rows, the
    last one the null label of classifier-free guidance; None otherwise), ``backend`` (the ops'
    backend: None = fastest here, or "reference", "cpp", "triton").
    """

    def __init__(self, config: UNetConfig, *, backend: str | None = None):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet takes a UNetConfig, got {type(config).__name__} (use UNetConfig.from_dict)")
        self.config = config
        self.backend = backend
        base, chans = config.base_channels, config.level_channels
        blocks = config.block_channels()
        k = config.num_res_blocks

        self.conv_in = nn.Conv2d(config.in_channels + config.cond_channels, base, 3, padding=1)
        self.time_embed = TimeEmbedding(config)
        # conditioning augmentation: the low-res image's noise level s, embedded as t is, added to its embedding
        self.cond_noise_embed = TimeEmbedding(config) if config.cond_noise_embedding else None
        self.class_embed = nn.Embedding(config.num_classes + 1, config.time_channels) if config.num_classes else None
        pad = config.downsample_padding
        self.down = nn.ModuleList(
            Level(
                blocks["down"][i * k : (i + 1) * k],
                config.attention_at(i),
                nn.Conv2d(c, c, 3, stride=2, padding=pad) if i < config.num_levels - 1 else None,
                config,
            )
            for i, c in enumerate(chans)
        )
        self.mid = Middle(chans[-1], config)
        self.up = nn.ModuleList(
            Level(
                blocks["up"][j * (k + 1) : (j + 1) * (k + 1)],
                config.attention_at(level),
                nn.Conv2d(c, c, 3, padding=1) if level > 0 else None,
                config,
            )
            for j, (level, c) in enumerate(reversed(list(enumerate(chans))))
        )
        self.norm_out = nn.GroupNorm(config.num_groups, base, config.norm_eps)
        self.conv_out = nn.Conv2d(base, config.model_out_channels, 3, padding=1)
        self.to(memory_format=torch.channels_last)

    # -------------------------------------------------- attributes
    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def sample_size(self) -> int:
        return self.config.sample_size

    @property
    def null_class_label(self) -> int | None:
        return self.config.num_classes

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @classmethod
    def from_preset(cls, name: str, *, backend: str | None = None, **overrides: Any) -> UNet:
        """A freshly initialised preset model: "cifar10" (35,746,307 parameters, diffusers'
        google/ddpm-cifar10-32), "celebahq256", "lsun256", "tiny"; overrides replace config fields."""
        return cls(preset_config(name, **overrides), backend=backend)

    # -------------------------------------------------- forward
    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor | int | float, class_labels: torch.Tensor | None):
        cfg = self.config
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape (N, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        factor = 2 ** (cfg.num_levels - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x's height and width {tuple(x.shape[2:])} must be divisible by {factor}")
        n = x.shape[0]
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            t = torch.full((n,), t, device=x.device)
        elif not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"t must be an int, a float or a real tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != x.device:
            raise ValueError(f"t is on {t.device} but x is on {x.device}")
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"t must be a scalar or have shape ({n},), got {tuple(t.shape)}")
        if class_labels is None:
            if cfg.num_classes is not None:  # no label = the null label (classifier-free guidance's unconditional)
                class_labels = torch.full((n,), cfg.num_classes, dtype=torch.int64, device=x.device)
            return t, class_labels
        if cfg.num_classes is None:
            raise ValueError("class_labels given to an unconditional U-Net (its config has num_classes=None)")
        if (
            not isinstance(class_labels, torch.Tensor)
            or class_labels.dtype.is_floating_point
            or class_labels.dtype == torch.bool
        ):
            raise TypeError(
                "class_labels must be an integer tensor, got "
                f"{getattr(class_labels, 'dtype', type(class_labels).__name__)}"
            )
        if class_labels.shape != (n,) or class_labels.device != x.device:
            raise ValueError(
                f"class_labels must have shape ({n},) on {x.device}, "
                f"got {tuple(class_labels.shape)} on {class_labels.device}"
            )
        if value_checks_enabled() and bool(((class_labels < 0) | (class_labels > cfg.num_classes)).any()):
            raise ValueError(f"class_labels must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = the null label)")
        return t, class_labels

    def _check_conditioning(
        self, x: torch.Tensor, low_res: torch.Tensor | None, aug_level: torch.Tensor | int | None
    ) -> torch.Tensor | None:
        """Checks low_res and aug_level against the config; returns aug_level as an (N,) tensor (or None)."""
        cfg = self.config
        n, (height, width) = x.shape[0], tuple(x.shape[2:])
        if not cfg.cond_channels:
            if low_res is not None or aug_level is not None:
                raise ValueError(
                    "low_res / aug_level given to a U-Net without a conditioning image (its config has "
                    "cond_channels=0): only super-resolution models (cond_channels > 0) take them"
                )
            return None
        if low_res is None:
            raise ValueError(
                f"this U-Net is a super-resolution model (cond_channels={cfg.cond_channels}): pass the conditioning "
                "image as low_res=(N, C, h, w)"
            )
        if not isinstance(low_res, torch.Tensor) or not low_res.dtype.is_floating_point:
            raise TypeError(
                f"low_res must be a floating-point tensor, got {getattr(low_res, 'dtype', type(low_res).__name__)}"
            )
        if low_res.dim() != 4 or low_res.shape[0] != n or low_res.shape[1] != cfg.cond_channels:
            raise ValueError(
                f"low_res must have shape ({n}, {cfg.cond_channels}, h, w) for x of shape {tuple(x.shape)}, "
                f"got {tuple(low_res.shape)}"
            )
        h, w = low_res.shape[2:]
        if not (0 < h <= height and 0 < w <= width and height % h == 0 and width % w == 0):
            raise ValueError(
                f"low_res's size {h}x{w} must divide the sample's {height}x{width} "
                "(it is upsampled by an integer factor)"
            )
        if low_res.device != x.device:
            raise ValueError(f"low_res is on {low_res.device} but x is on {x.device}")
        if not cfg.cond_noise_embedding:
            if aug_level is not None:
                raise ValueError(
                    "aug_level given, but this U-Net was not built for conditioning augmentation "
                    "(its config has cond_noise_embedding=False)"
                )
            return None
        if aug_level is None:
            raise ValueError(
                "this U-Net takes the conditioning image's noise level (cond_noise_embedding=True): pass aug_level= "
                "(the timestep s at which low_res was noised; 0 = the least noise)"
            )
        if isinstance(aug_level, int) and not isinstance(aug_level, bool):
            aug_level = torch.full((n,), aug_level, dtype=torch.int64, device=x.device)
        if not isinstance(aug_level, torch.Tensor) or aug_level.dtype == torch.bool or aug_level.dtype.is_complex:
            raise TypeError(
                "aug_level must be an int or a real tensor, got "
                f"{getattr(aug_level, 'dtype', type(aug_level).__name__)}"
            )
        if aug_level.dim() == 0:
            aug_level = aug_level.expand(n)
        if aug_level.shape != (n,) or aug_level.device != x.device:
            raise ValueError(
                f"aug_level must be a scalar or have shape ({n},) on {x.device}, "
                f"got {tuple(aug_level.shape)} on {aug_level.device}"
            )
        if value_checks_enabled() and bool((aug_level < 0).any()):
            raise ValueError("aug_level must be >= 0 (a timestep of the schedule)")
        return aug_level

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int | float,
        class_labels: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
        aug_level: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Predict from a noisy batch.

        Args:
            x: (N, in_channels, H, W) float, H and W divisible by 2 ** (levels - 1); any layout.
            t: timesteps, int64 (N,) (float allowed), a scalar tensor or a Python number.
            class_labels: int64 (N,) in [0, num_classes] (num_classes = null label) for a
                class-conditional model; None there means the null label.
            low_res: super-resolution models only (cond_channels > 0), required there: the
                conditioning image (N, cond_channels, h, w) float with H / h and W / w integers; it is
                upsampled bilinearly (align_corners=False, improved-diffusion's SuperResModel) to
                (H, W) and concatenated after x's channels.
            aug_level: models with cond_noise_embedding only, required there: the level s (a
                timestep, int64 (N,), a scalar tensor or a Python int) at which low_res was noised.

        Returns:
            (N, model_out_channels, H, W) in x's dtype (the autocast dtype under autocast),
            channels_last.
        """
        t, class_labels = self._check_inputs(x, t, class_labels)
        aug_level = self._check_conditioning(x, low_res, aug_level)
        cfg, backend = self.config, op_backend("group_norm_silu", self.backend)
        emb = timestep_embedding(t, cfg.base_channels, cfg.flip_sin_to_cos, cfg.freq_shift).to(self.dtype)
        emb = self.time_embed.linear_2(F.silu(self.time_embed.linear_1(emb)))
        if self.cond_noise_embed is not None:
            s = timestep_embedding(aug_level, cfg.base_channels, cfg.flip_sin_to_cos, cfg.freq_shift).to(self.dtype)
            emb = emb + self.cond_noise_embed.linear_2(F.silu(self.cond_noise_embed.linear_1(s))).to(emb.dtype)
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels).to(emb.dtype)
        emb = F.silu(emb)  # every ResBlock projects SiLU(emb): once here, not once per block

        if low_res is not None:
            if tuple(low_res.shape[2:]) != tuple(x.shape[2:]):
                low_res = F.interpolate(low_res, size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)
            x = torch.cat([x, low_res.to(x.dtype)], dim=1)
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))
        skips = [h]
        for level in self.down:
            for i, block in enumerate(level.res):
                h = block(h, emb, backend)
                if level.attn is not None:
                    h = level.attn[i](h, backend)
                skips.append(h)
            if level.resample is not None:
                if cfg.downsample_padding == 0:
                    h = F.pad(h, (0, 1, 0, 1))
                h = level.resample(h)
                skips.append(h)
        h = self.mid.res[0](h, emb, backend)
        if self.mid.attn is not None:
            h = self.mid.attn(h, backend)
        h = self.mid.res[1](h, emb, backend)
        for level in self.up:
            for i, block in enumerate(level.res):
                h = block(torch.cat([h, skips.pop()], dim=1), emb, backend)
                if level.attn is not None:
                    h = level.attn[i](h, backend)
            if level.resample is not None:
                h = level.resample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        n = self.norm_out
        return self.conv_out(group_norm_silu(h, n.num_groups, n.weight, n.bias, n.eps, backend=backend))

    # -------------------------------------------------- checkpoints
    def save(self, path_dir: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (config JSON also in its metadata) into
        ``path_dir`` atomically: a temporary sibling directory is written, fsynced and renamed into
        place (an existing directory is swapped out and removed only after that). ``manifest.json``
        beside them holds their sha256 and size, for ``load`` to check."""
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
    def load(
        cls, path: str | os.PathLike, *, map_location: str | torch.device = "cpu", backend: str | None = None
    ) -> UNet:
        """A model saved by ``save``: its directory, or the .safetensors file (config from its metadata).

        The files read are checked against the directory's ``manifest.json`` when there is one (models
        saved before manifests existed load unchecked); a damaged file raises ``CheckpointError``.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        file = path / WEIGHTS_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no U-Net checkpoint at {path} (expected a directory holding {WEIGHTS_NAME} or a .safetensors file)"
            )
        manifest = read_manifest(file.parent)

        def read_weights(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            return load_file(str(p), device=str(map_location)), meta

        weights, meta = read_verified(file, manifest, read_weights)
        if "config" in meta:
            try:
                config_dict = json.loads(meta["config"])
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{file} is damaged: the config in its metadata is not JSON: {e}", file) from e
        elif (file.parent / CONFIG_NAME).is_file():
            config_dict = read_verified(file.parent / CONFIG_NAME, manifest, lambda p: json.loads(p.read_text()))
        else:
            raise ValueError(f"{file} has no config in its metadata and there is no {CONFIG_NAME} beside it")
        model = cls(UNetConfig.from_dict(config_dict), backend=backend)
        model.load_weights(weights)
        return model.to(map_location)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """load_state_dict with an error that names missing, unexpected and mis-shaped tensors."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shapes = [
            f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
            for k, v in own.items()
            if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                "the weights do not fit this U-Net's config (were they saved from another config?): "
                f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}, "
                f"shape mismatches {shapes[:8]}{' ...' if len(shapes) > 8 else ''}"
            )
        self.load_state_dict(state_dict)

    # -------------------------------------------------- diffusers
    @classmethod
    def from_diffusers(
        cls, model_or_path: Any, *, learned_variance: bool | None = None, backend: str | None = None
    ) -> UNet:
        """A UNet with the weights of a diffusers UNet2DModel: the object, or a directory holding its
        config.json and diffusion_pytorch_model.safetensors (or a pipeline folder with unet/).
        learned_variance None: True when out_channels == 2 * in_channels."""
        from .unet_diffusers import from_diffusers

        return from_diffusers(cls, model_or_path, learned_variance=learned_variance, backend=backend)

    def to_diffusers(self) -> Any:
        """A diffusers UNet2DModel with this model's architecture and (identical) weights."""
        from .unet_diffusers import to_diffusers

        return to_diffusers(self)
