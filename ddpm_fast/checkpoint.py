"""Training checkpoints: one directory per step, written atomically, the last K kept.

Layout of ``<run>/checkpoints/step_XXXXXXXX/``:

- ``model.safetensors``, ``ema.safetensors``: the weights and the EMA weights (fp32);
- ``config.json``: the U-Net config; ``scheduler_config.json``: diffusers' scheduler config;
  ``train_config.json``: the trainer's config;
- ``training_state.pt``: step, optimizer, grad scaler, EMA counter, RNG states (torch CPU and
  CUDA) and the data loader's position (``torch.load(weights_only=True)`` reads it);
- ``latent.json`` (latent diffusion only): the autoencoder the model was trained with (path,
  identity = sha256 of its config and weights, scaling and shift factors, latent shape, cache);
- ``manifest.json``: the sha256 and size of each file above, written last.

``<run>/checkpoints/latest`` names the newest complete checkpoint. A save writes a hidden
temporary directory, fsyncs every file and the directory, renames it into place, then replaces
``latest`` (write + fsync + ``os.replace``): a crash at any point leaves the previous checkpoint
and pointer intact.

Loading checks every file it reads against the manifest, so a file damaged after the save (a bad
disk, a copy cut short) raises a ``CheckpointError`` naming it. Resuming a run (``load_for_resume``
on a run or checkpoints directory) then warns and falls back to the newest intact older checkpoint;
a step directory named explicitly is loaded or refused, never replaced by another. Checkpoints
written before manifests existed still load: their files are only checked by parsing them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ._fileio import (
    OLD_PREFIX,
    TMP_PREFIX,
    CheckpointError,
    atomic_directory,
    fsync_path,
    read_manifest,
    read_verified,
)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
FILES = (
    "model.safetensors",
    "ema.safetensors",
    "config.json",
    "scheduler_config.json",
    "train_config.json",
    "training_state.pt",
)
LATENT_FILE = "latent.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(step_dir: Path) -> int:
    return int(_STEP_DIR.match(step_dir.name).group(1))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage: give it its own contiguous CPU copy
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def write_files(
    directory: Path,
    *,
    model_state: Mapping[str, torch.Tensor],
    ema_state: Mapping[str, torch.Tensor],
    model_config: dict,
    scheduler_config: dict,
    train_config: dict,
    training_state: dict,
    latent: dict | None = None,
) -> None:
    """Write the checkpoint's files into ``directory`` (which exists); ``latent``: latent.json."""
    save_file(_contiguous(model_state), str(directory / "model.safetensors"), metadata={"format": "pt"})
    save_file(_contiguous(ema_state), str(directory / "ema.safetensors"), metadata={"format": "pt"})
    _write_json(directory / "config.json", model_config)
    _write_json(directory / "scheduler_config.json", {"_class_name": "DDPMScheduler", **scheduler_config})
    _write_json(directory / "train_config.json", train_config)
    torch.save(training_state, directory / "training_state.pt")
    if latent is not None:
        _write_json(directory / LATENT_FILE, latent)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    keep_last: int | None = None,
    **contents: Any,
) -> Path:
    """Atomically write checkpoint ``step`` under ``run_dir/checkpoints`` and point ``latest`` at it.

    ``contents`` are ``write_files``' keyword arguments. ``keep_last`` (K >= 1) removes all but the
    K newest step directories afterwards. Returns the step directory.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    with atomic_directory(final) as tmp:  # re-saving a step (e.g. after a resume) replaces it
        write_files(tmp, **contents)
    pointer_tmp = root / f".{LATEST}.{uuid.uuid4().hex[:8]}"
    with open(pointer_tmp, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, root / LATEST)
    fsync_path(root)
    _clean(root, keep_last)
    return final


def _clean(root: Path, keep_last: int | None) -> None:
    """Remove leftovers of interrupted saves and, with keep_last, the older step directories."""
    for prefix in (TMP_PREFIX, OLD_PREFIX):
        for leftover in root.glob(f"{prefix}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    if keep_last is None:
        return
    latest = (root / LATEST).read_text().strip()
    for old in list_checkpoints(root)[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The complete step directories under a checkpoints directory, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=_step_of)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (its ``latest``), a checkpoints directory, or a step directory -> the step directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    for root in (path / CHECKPOINTS, path):
        pointer = root / LATEST
        if pointer.is_file():
            step = root / pointer.read_text(errors="replace").strip()
            if not (step / "ema.safetensors").is_file():
                raise FileNotFoundError(f"{pointer} names {step.name}, which is missing or incomplete")
            return step
    if (path / "ema.safetensors").is_file():
        return path
    raise FileNotFoundError(
        f"no checkpoint at {str(path)!r}: expected a run directory (with checkpoints/latest), a checkpoints "
        "directory or a step_XXXXXXXX directory holding ema.safetensors"
    )


@dataclass
class Checkpoint:
    """A loaded checkpoint (tensors on the CPU)."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor]
    model_config: dict
    scheduler_config: dict
    train_config: dict
    training_state: dict | None
    latent: dict | None = None


def read_json(path: Path, manifest: dict[str, dict] | None = None) -> dict:
    """A JSON file, checked against ``manifest`` when given (damage raises ``CheckpointError``)."""
    return read_verified(path, manifest, lambda p: json.loads(p.read_text()))


def _read_safetensors(path: Path, manifest: dict[str, dict] | None) -> dict[str, torch.Tensor]:
    return read_verified(path, manifest, lambda p: load_file(str(p)))


def _read_training_state(path: Path, manifest: dict[str, dict] | None) -> dict:
    return read_verified(path, manifest, lambda p: torch.load(p, map_location="cpu", weights_only=True))


def load_checkpoint(path: str | os.PathLike, *, training_state: bool = True, weights: bool = True) -> Checkpoint:
    """Load a checkpoint (see ``resolve_checkpoint`` for the paths it takes).

    ``training_state=False`` skips the optimizer/RNG file and ``weights=False`` the non-EMA
    weights (sampling needs only the EMA weights and the configs); only the files read are checked.
    A damaged file raises ``CheckpointError`` naming it.
    """
    step_dir = resolve_checkpoint(path)
    missing = [n for n in FILES if not (step_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {step_dir} is incomplete: missing {', '.join(missing)}")
    manifest = read_manifest(step_dir)
    state = _read_training_state(step_dir / "training_state.pt", manifest) if training_state else None
    scheduler_config = read_json(step_dir / "scheduler_config.json", manifest)
    match = _STEP_DIR.match(step_dir.name)
    step = int(match.group(1)) if match else (state["step"] if state else -1)
    return Checkpoint(
        path=step_dir,
        step=step,
        model_state=_read_safetensors(step_dir / "model.safetensors", manifest) if weights else {},
        ema_state=_read_safetensors(step_dir / "ema.safetensors", manifest),
        model_config=read_json(step_dir / "config.json", manifest),
        scheduler_config={k: v for k, v in scheduler_config.items() if not k.startswith("_")},
        train_config=read_json(step_dir / "train_config.json", manifest),
        training_state=state,
        latent=read_json(step_dir / LATENT_FILE, manifest) if (step_dir / LATENT_FILE).is_file() else None,
    )


def load_latent_record(path: str | os.PathLike) -> dict | None:
    """A checkpoint's ``latent.json`` (checked against its manifest), None for a pixel-space model or
    a diffusers pipeline folder (see ``resolve_checkpoint`` for the paths it takes)."""
    pipeline = Path(path)
    if (pipeline / "unet" / "config.json").is_file() and (pipeline / "scheduler").is_dir():
        return None
    step_dir = resolve_checkpoint(path)
    if not (step_dir / LATENT_FILE).is_file():
        return None
    return read_json(step_dir / LATENT_FILE, read_manifest(step_dir))


def load_for_resume(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint a run resumes from. A run or checkpoints directory: the one ``latest`` names,
    or, when that one is damaged or incomplete, the newest intact older one (with a warning naming
    the damaged files; ``CheckpointError`` naming them all when no checkpoint is intact). A step
    directory: that checkpoint (``load_checkpoint``: damage is an error)."""
    path = Path(path)
    root = next((r for r in (path / CHECKPOINTS, path) if list_checkpoints(r)), None)
    if root is None:
        return load_checkpoint(path)
    problems = []
    for step_dir in _resume_candidates(root):
        try:
            loaded = load_checkpoint(step_dir)
        except (CheckpointError, FileNotFoundError) as e:  # FileNotFoundError: one of its files is missing
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(
                f"resuming from {step_dir}: the newer checkpoints are damaged:\n  " + "\n  ".join(problems),
                stacklevel=2,
            )
        return loaded
    raise CheckpointError(f"no intact checkpoint in {root}:\n  " + "\n  ".join(problems), root)


def _resume_candidates(root: Path) -> list[Path]:
    """The checkpoint ``latest`` names, then the older ones, newest first. Directories newer than
    ``latest`` are left out: a resume from an older step re-trains them and they are stale."""
    steps = list_checkpoints(root)
    pointer = root / LATEST
    latest = root / pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    if latest not in steps:
        warnings.warn(f"{pointer} is missing or names no checkpoint; trying the newest one", stacklevel=3)
        return steps[::-1]
    return [latest] + [p for p in steps[::-1] if _step_of(p) < _step_of(latest)]


def load_for_sampling(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", ema: bool = True
) -> tuple[torch.nn.Module, Any]:
    """(U-Net with the EMA weights, SchedulerConfig) from a run directory (follows ``latest``),
    a checkpoints directory, a step directory, or a diffusers pipeline folder (``unet/`` +
    ``scheduler/``, e.g. from ``export_pipeline``). ``ema=False`` loads the raw weights instead.

    The U-Net is in eval mode on ``device``; the scheduler config carries T, the betas and the
    prediction type the model was trained with.
    """
    from .schedule import SchedulerConfig
    from .unet import UNet, UNetConfig

    pipeline = Path(path)
    if (pipeline / "unet" / "config.json").is_file() and (pipeline / "scheduler" / "scheduler_config.json").is_file():
        model = UNet.from_diffusers(pipeline / "unet")
        scheduler = read_json(pipeline / "scheduler" / "scheduler_config.json")
        config = SchedulerConfig.from_dict({k: v for k, v in scheduler.items() if k in _SCHEDULER_KEYS})
        return model.to(device).eval(), config

    loaded = load_checkpoint(path, training_state=False, weights=not ema)
    try:
        model = UNet(UNetConfig.from_dict(loaded.model_config))
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{loaded.path / 'config.json'} is not a valid ddpm_fast U-Net config: {e}") from e
    state = loaded.ema_state if ema else loaded.model_state
    try:
        model.load_weights(state)
    except ValueError as e:
        raise ValueError(f"{loaded.path}: {e}") from e
    return model.to(device).eval(), SchedulerConfig.from_dict(loaded.scheduler_config)


# SchedulerConfig's fields (diffusers writes more keys, e.g. clip_sample_range's siblings of DDIM).
_SCHEDULER_KEYS = frozenset(
    {
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "variance_type",
        "clip_sample",
        "clip_sample_range",
        "prediction_type",
        "thresholding",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "timestep_spacing",
        "steps_offset",
        "rescale_betas_zero_snr",
        "set_alpha_to_one",
    }
)


def export_pipeline(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, *, ema: bool = True) -> Path:
    """Write a checkpoint as a diffusers ``DDPMPipeline`` folder (``save_pretrained`` layout:
    ``model_index.json``, ``unet/`` with a ``UNet2DModel``, ``scheduler/`` with a ``DDPMScheduler``),
    loadable with ``DDPMPipeline.from_pretrained(out_dir)``. Needs diffusers."""
    try:
        from diffusers import DDPMPipeline, DDPMScheduler
    except ImportError as e:
        raise ImportError("export_pipeline needs diffusers (pip install diffusers)") from e
    if load_latent_record(checkpoint_path) is not None:
        raise ValueError(
            f"{checkpoint_path} is a latent-diffusion checkpoint: a DDPMPipeline folder would lose its autoencoder "
            "(exporting latent pipelines is not done); sample it with ddpm-fast sample"
        )
    model, scheduler_config = load_for_sampling(checkpoint_path, ema=ema)
    scheduler = DDPMScheduler.from_config(scheduler_config.to_dict())
    out = Path(out_dir)
    DDPMPipeline(unet=model.to_diffusers(), scheduler=scheduler).save_pretrained(str(out))
    return out
