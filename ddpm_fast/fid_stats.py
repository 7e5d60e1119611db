"""Reference statistics for FID in pytorch-fid's npz format: ``mu`` (D,) and ``sigma`` (D, D), float64
(pytorch-fid's ``--save-stats`` and clean-fid's files load here; ours load in them).

``ddpm-fast fid-stats`` computes them for a built-in dataset or an image folder with the Inception
network (D = 2048) or, for the built-in datasets, the dataset classifier (D = its feature width).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._fileio import fsync_path


class StatsError(ValueError):
    """A statistics file that cannot be used: unreadable, keys missing, wrong shapes. Names the file."""

    def __init__(self, message: str, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = Path(path)


def save_stats(
    path: str | os.PathLike, mu: torch.Tensor | np.ndarray, sigma: torch.Tensor | np.ndarray, **extra
) -> Path:
    """Write ``mu`` (D,) and ``sigma`` (D, D) as float64 into an npz at ``path`` (atomically: a
    temporary file beside it, fsynced, renamed). ``extra``: more arrays (e.g. ``num_images``)."""
    path = Path(path)
    mu = np.asarray(mu.cpu() if isinstance(mu, torch.Tensor) else mu, dtype=np.float64)
    sigma = np.asarray(sigma.cpu() if isinstance(sigma, torch.Tensor) else sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in extra.items()})
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_stats(path: str | os.PathLike, *, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu (D,), sigma (D, D))`` float64 from a pytorch-fid npz; ``dim``: the feature width the
    caller's network gives (2048 for Inception). Every problem raises ``StatsError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise StatsError(
            f"reference statistics {str(path)!r} not found (make them with: ddpm-fast fid-stats --dataset NAME "
            "--out stats.npz, or pytorch-fid's --save-stats)",
            path,
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            missing = [k for k in ("mu", "sigma") if k not in keys]
            if missing:
                raise StatsError(
                    f"{path} holds no {' or '.join(missing)} (its arrays: {', '.join(sorted(keys)) or 'none'}); "
                    "FID statistics are an npz with mu (D,) and sigma (D, D), as pytorch-fid writes them",
                    path,
                )
            mu, sigma = np.asarray(data["mu"]), np.asarray(data["sigma"])
    except StatsError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise StatsError(f"{path} is not a readable npz file ({type(e).__name__}: {e})", path) from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StatsError(f"{path}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}", path)
    if dim is not None and mu.shape[0] != dim:
        raise StatsError(
            f"{path} holds {mu.shape[0]}-dimensional statistics, but the features here are {dim}-dimensional "
            "(Inception pool3: 2048; the digits classifier: its feature width): statistics of another network?",
            path,
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatsError(f"{path} holds NaN or Inf", path)
    return torch.from_numpy(mu.astype(np.float64)), torch.from_numpy(sigma.astype(np.float64))


def dataset_statistics(
    dataset: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    split: str | None = None,
    metric: str = "fid",
    inception_weights: str | os.PathLike | None = None,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    classifier_cache: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(mu, sigma, info)`` of a dataset's features: Inception pool3 (``metric="fid"``) or the dataset
    classifier's (``"classifier_fid"``, built-in datasets only). Images pass through the same 8-bit
    quantisation as evaluated samples. ``split``: default "test" (held out) for the built-in
    datasets, "train" (every image) for a folder."""
    from .data import make_dataset
    from .eval_shards import FeatureAccumulator
    from .evaluation import feature_network, quantize_8bit

    if dataset == "folder" and data_dir is None:
        raise ValueError("--dataset folder needs --data-dir (a directory of images)")
    split = split or ("train" if dataset == "folder" else "test")
    size = image_size or (16 if dataset != "folder" else None)
    if size is None:
        raise ValueError("a folder dataset needs --image-size (images are resized to it)")
    data = make_dataset(dataset, image_size=size, split=split, root=data_dir if dataset == "folder" else None)
    net = feature_network(
        metric,
        dataset=dataset,
        image_size=size,
        channels=data.channels,
        inception_weights=inception_weights,
        device=device,
        classifier_cache=classifier_cache,
    )
    acc = FeatureAccumulator(net.feature_dim, 0, 1, device=torch.device(device))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(data), desc="fid-stats", unit="img", dynamic_ncols=True)
    for lo in range(0, len(data), batch_size):
        images = torch.stack([data[i][0] for i in range(lo, min(lo + batch_size, len(data)))])
        feats, _ = net(quantize_8bit(images.to(device)))  # FeatureNetwork runs without gradients
        acc.add(feats, None, torch.arange(lo, lo + images.shape[0]))
        if bar is not None:
            bar.update(images.shape[0])
    if bar is not None:
        bar.close()
    if acc.count < 2:
        raise ValueError(f"{dataset} ({split}) has {acc.count} image(s): FID statistics need at least 2")
    mu, sigma = acc.mean_cov()
    info = {"dataset": dataset, "split": split, "image_size": size, "num_images": acc.count, "network": net.identity}
    return mu, sigma, info
