"""Mapping between diffusers' UNet2DModel and ddpm_fast.UNet: configs and weights, both ways.

Covered: positional (sinusoidal) time embeddings, DownBlock2D/AttnDownBlock2D and
UpBlock2D/AttnUpBlock2D with attention at the same levels on both paths, UNetMidBlock2D (with or
without attention), conv resampling, SiLU, "default" or "scale_shift" time conditioning, class
embeddings through num_class_embeds. Anything else raises a ValueError naming the option.

Weights: the names map one to one, except that diffusers' to_q/to_k/to_v are concatenated into our
one (3C, C) qkv parameter when loading (and split when exporting). diffusers' class embedding rows
count every label: ours count num_classes real classes plus the null label, so
num_class_embeds = num_classes + 1 and the tensors are identical both ways.

Loading needs no diffusers installation (config.json + safetensors are read directly); exporting
to a UNet2DModel object does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .unet import UNetConfig

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
# UNet2DModel's own defaults, for keys a config.json leaves out.
_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
# Config entries that only describe the file, not the model.
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "num_train_timesteps"}


def _unsupported(option: str, value: Any, why: str) -> ValueError:
    return ValueError(f"diffusers UNet2DModel option {option}={value!r} is not supported by ddpm_fast.UNet: {why}")


def _block_kind(name: str, plain: str, attn: str, option: str) -> bool:
    name = name[7:] if name.startswith("UNetRes") else name
    if name not in (plain, attn):
        raise _unsupported(option, name, f"only {plain} and {attn} are")
    return name == attn


def config_from_diffusers(dconfig: Mapping[str, Any], *, learned_variance: bool | None = None) -> UNetConfig:
    """The UNetConfig equal to a UNet2DModel config (a dict, a FrozenDict or config.json's content)."""
    unknown = sorted(set(dconfig) - set(_DEFAULTS) - _IGNORED)
    if unknown:
        raise ValueError(f"unknown diffusers UNet2DModel config keys {unknown}")
    if dconfig.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"expected a UNet2DModel config, got _class_name={dconfig['_class_name']!r}")
    c = {**_DEFAULTS, **{k: v for k, v in dconfig.items() if k in _DEFAULTS}}
    for option, want in (
        ("center_input_sample", False),
        ("time_embedding_type", "positional"),
        ("mid_block_type", "UNetMidBlock2D"),
        ("downsample_type", "conv"),
        ("upsample_type", "conv"),
        ("class_embed_type", None),
    ):
        if c[option] != want:
            raise _unsupported(option, c[option], f"only {want!r} is")
    if c["mid_block_scale_factor"] != 1:
        raise _unsupported("mid_block_scale_factor", c["mid_block_scale_factor"], "only 1 is")
    if c["act_fn"] not in ("silu", "swish"):
        raise _unsupported("act_fn", c["act_fn"], "only silu (swish) is")
    if c["norm_num_groups"] is None:
        raise _unsupported("norm_num_groups", None, "give the group count")
    shift = c["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        raise _unsupported("resnet_time_scale_shift", shift, "only 'default' and 'scale_shift' are")
    attn_groups = c["attn_norm_num_groups"]
    if c["add_attention"] and attn_groups is None and shift != "default":
        raise _unsupported(
            "attn_norm_num_groups",
            None,
            "with resnet_time_scale_shift='scale_shift' diffusers' middle attention then has no GroupNorm, "
            "which ddpm_fast's attention block always has; set attn_norm_num_groups=norm_num_groups",
        )
    if attn_groups is not None and attn_groups != c["norm_num_groups"]:
        raise _unsupported("attn_norm_num_groups", attn_groups, f"it must equal norm_num_groups={c['norm_num_groups']}")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    chans = list(c["block_out_channels"])
    if not (len(down) == len(up) == len(chans)):
        raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")
    down_attn = [_block_kind(b, "DownBlock2D", "AttnDownBlock2D", "down_block_types") for b in down]
    up_attn = [_block_kind(b, "UpBlock2D", "AttnUpBlock2D", "up_block_types") for b in up]
    if down_attn != up_attn[::-1]:
        raise _unsupported("up_block_types", up, f"attention must sit at the same levels as in down_block_types {down}")
    base = chans[0]
    if any(ch % base for ch in chans):
        raise _unsupported("block_out_channels", chans, f"each must be a multiple of the first ({base})")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise _unsupported("sample_size", size, "only square samples are")
        size = size[0]
    if size is None:
        raise _unsupported("sample_size", None, "give the training resolution")
    lv = c["out_channels"] == 2 * c["in_channels"] if learned_variance is None else learned_variance
    if lv and c["out_channels"] % 2:
        raise ValueError(f"learned_variance needs an even out_channels, got {c['out_channels']}")
    head_dim = c["attention_head_dim"]
    if isinstance(head_dim, (list, tuple)):
        raise _unsupported("attention_head_dim", head_dim, "one value for every block is")
    num_classes = c["num_class_embeds"]
    if num_classes is not None and num_classes < 2:
        raise _unsupported("num_class_embeds", num_classes, "the last row is the null label: at least 2 are needed")
    return UNetConfig(
        sample_size=int(size),
        in_channels=c["in_channels"],
        out_channels=c["out_channels"] // 2 if lv else c["out_channels"],
        base_channels=base,
        channel_mult=tuple(ch // base for ch in chans),
        num_res_blocks=c["layers_per_block"],
        attention_resolutions=tuple(int(size) >> i for i, a in enumerate(down_attn) if a),
        mid_attention=bool(c["add_attention"]),
        num_heads=1,
        head_channels=head_dim,
        dropout=float(c["dropout"]),
        num_groups=c["norm_num_groups"],
        norm_eps=float(c["norm_eps"]),
        time_conditioning="add" if shift == "default" else "scale_shift",
        time_embed_dim=c["time_embedding_dim"],
        num_classes=None if num_classes is None else num_classes - 1,
        learned_variance=bool(lv),
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
        freq_shift=c["freq_shift"],
        downsample_padding=c["downsample_padding"],
    )


def config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """UNet2DModel keyword arguments for a UNetConfig (config_from_diffusers's inverse)."""
    if config.cond_channels:
        raise ValueError(
            f"a super-resolution U-Net (cond_channels={config.cond_channels}"
            f"{', cond_noise_embedding' if config.cond_noise_embedding else ''}) has no diffusers UNet2DModel "
            "equivalent: UNet2DModel takes no low-resolution conditioning image (nor its noise level)"
        )
    if config.head_channels is None and config.num_heads != 1:
        # diffusers sets heads = channels // attention_head_dim per block: a fixed count maps only if
        # every attention has the same width.
        widths = {c for i, c in enumerate(config.level_channels) if config.attention_at(i)}
        if config.mid_attention:
            widths.add(config.level_channels[-1])
        if len(widths) > 1:
            raise ValueError(
                f"num_heads={config.num_heads} over attention widths {sorted(widths)} has no diffusers "
                "equivalent (attention_head_dim fixes the head width): use head_channels"
            )
        head_dim = widths.pop() // config.num_heads if widths else None
    else:
        head_dim = config.head_channels
    attn = [config.attention_at(i) for i in range(config.num_levels)]
    return {
        "sample_size": config.sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.model_out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": config.time_embed_dim,
        "freq_shift": config.freq_shift,
        "flip_sin_to_cos": config.flip_sin_to_cos,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "block_out_channels": config.level_channels,
        "layers_per_block": config.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": config.downsample_padding,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": config.dropout,
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": config.num_groups,
        "attn_norm_num_groups": config.num_groups if config.time_conditioning == "scale_shift" else None,
        "norm_eps": config.norm_eps,
        "resnet_time_scale_shift": "default" if config.time_conditioning == "add" else "scale_shift",
        "add_attention": config.mid_attention,
        "class_embed_type": None,
        "num_class_embeds": None if config.num_classes is None else config.num_classes + 1,
    }


# ---------------------------------------------------------------- weight names
_RES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "time_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
}
_QKV = ("to_q", "to_k", "to_v")


def _module_pairs(config: UNetConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """([(our module, diffusers module)] for every plain module, [(our attention, diffusers attention)])."""
    pairs = [
        ("conv_in", "conv_in"),
        ("time_embed.linear_1", "time_embedding.linear_1"),
        ("time_embed.linear_2", "time_embedding.linear_2"),
        ("class_embed", "class_embedding"),
        ("norm_out", "conv_norm_out"),
        ("conv_out", "conv_out"),
    ]
    attns = []
    blocks = config.block_channels()
    k = config.num_res_blocks

    def res(ours: str, theirs: str, cin: int, cout: int) -> None:
        for o, t in _RES.items():
            if o != "skip" or cin != cout:
                pairs.append((f"{ours}.{o}", f"{theirs}.{t}"))

    for i in range(config.num_levels):
        for j in range(k):
            res(f"down.{i}.res.{j}", f"down_blocks.{i}.resnets.{j}", *blocks["down"][i * k + j])
            if config.attention_at(i):
                attns.append((f"down.{i}.attn.{j}", f"down_blocks.{i}.attentions.{j}"))
        if i < config.num_levels - 1:
            pairs.append((f"down.{i}.resample", f"down_blocks.{i}.downsamplers.0.conv"))
    for j in range(2):
        res(f"mid.res.{j}", f"mid_block.resnets.{j}", *blocks["mid"][j])
    if config.mid_attention:
        attns.append(("mid.attn", "mid_block.attentions.0"))
    for i in range(config.num_levels):
        level = config.num_levels - 1 - i
        for j in range(k + 1):
            res(f"up.{i}.res.{j}", f"up_blocks.{i}.resnets.{j}", *blocks["up"][i * (k + 1) + j])
            if config.attention_at(level):
                attns.append((f"up.{i}.attn.{j}", f"up_blocks.{i}.attentions.{j}"))
        if level > 0:
            pairs.append((f"up.{i}.resample", f"up_blocks.{i}.upsamplers.0.conv"))
    return pairs, attns


def state_from_diffusers(config: UNetConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from a UNet2DModel state dict (tensors shared, qkv concatenated)."""
    pairs, attns = _module_pairs(config)
    out, used = {}, set()

    def take(theirs: str) -> torch.Tensor:
        if theirs not in state:
            raise ValueError(f"the diffusers weights lack {theirs!r} (do they belong to this config?)")
        used.add(theirs)
        return state[theirs]

    for ours, theirs in pairs:
        if ours == "class_embed" and config.num_classes is None:
            continue
        params = ("weight",) if ours in ("class_embed",) else ("weight", "bias")
        for p in params:
            out[f"{ours}.{p}"] = take(f"{theirs}.{p}")
    for ours, theirs in attns:
        out[f"{ours}.norm.weight"] = take(f"{theirs}.group_norm.weight")
        out[f"{ours}.norm.bias"] = take(f"{theirs}.group_norm.bias")
        for p in ("weight", "bias"):
            out[f"{ours}.qkv.{p}"] = torch.cat([take(f"{theirs}.{q}.{p}") for q in _QKV])
            out[f"{ours}.proj.{p}"] = take(f"{theirs}.to_out.0.{p}")
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"diffusers weights that ddpm_fast.UNet has no place for: {left[:8]}")
    return out


def state_to_diffusers(config: UNetConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A UNet2DModel state dict from ours (qkv split into to_q/to_k/to_v)."""
    pairs, attns = _module_pairs(config)
    out = {}
    for ours, theirs in pairs:
        for p in ("weight", "bias"):
            if f"{ours}.{p}" in state:
                out[f"{theirs}.{p}"] = state[f"{ours}.{p}"]
    for ours, theirs in attns:
        out[f"{theirs}.group_norm.weight"] = state[f"{ours}.norm.weight"]
        out[f"{theirs}.group_norm.bias"] = state[f"{ours}.norm.bias"]
        for p in ("weight", "bias"):
            for q, part in zip(_QKV, state[f"{ours}.qkv.{p}"].chunk(3), strict=True):
                out[f"{theirs}.{q}.{p}"] = part
            out[f"{theirs}.to_out.0.{p}"] = state[f"{ours}.proj.{p}"]
    return out


# ---------------------------------------------------------------- entry points
def _read_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    if path.is_file():
        weights, folder = path, path.parent
    else:
        folder = path / "unet" if not (path / "config.json").is_file() and (path / "unet").is_dir() else path
        weights = folder / DIFFUSERS_WEIGHTS
    if not (folder / "config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusers UNet2DModel folder: expected config.json and {DIFFUSERS_WEIGHTS} "
            "(or a pipeline folder with unet/); there are no hub downloads"
        )
    return json.loads((folder / "config.json").read_text()), load_file(str(weights))


def from_diffusers(cls: type, model_or_path: Any, *, learned_variance: bool | None, backend: str | None):
    """See UNet.from_diffusers."""
    if isinstance(model_or_path, (str, os.PathLike)):
        dconfig, state = _read_dir(Path(model_or_path))
    elif hasattr(model_or_path, "config") and hasattr(model_or_path, "state_dict"):
        dconfig, state = dict(model_or_path.config), model_or_path.state_dict()
    else:
        raise TypeError(f"expected a diffusers UNet2DModel or a path, got {type(model_or_path).__name__}")
    config = config_from_diffusers(dconfig, learned_variance=learned_variance)
    ours = state_from_diffusers(config, state)
    device = next(iter(state.values())).device if state else torch.device("cpu")
    with torch.device("meta"):
        model = cls(config, backend=backend)
    model = model.to_empty(device=device)
    model.load_weights(ours)
    return model


def to_diffusers(model: Any) -> Any:
    """See UNet.to_diffusers."""
    try:
        from diffusers import UNet2DModel
    except ImportError as err:
        raise ImportError("UNet.to_diffusers needs diffusers (`pip install diffusers`)") from err
    theirs = UNet2DModel(**config_to_diffusers(model.config))
    state = {
        k: v.detach().clone().contiguous() for k, v in state_to_diffusers(model.config, model.state_dict()).items()
    }
    theirs.load_state_dict(state, strict=True)
    return theirs.to(device=model.device, dtype=model.dtype)
