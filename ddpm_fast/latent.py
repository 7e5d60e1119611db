"""Latent diffusion (Rombach et al. 2022): train and sample in an autoencoder's latent space.

``Autoencoder`` adapts ``encode`` / ``decode`` callables, or a diffusers ``AutoencoderKL`` /
``VQModel`` (``load_autoencoder(folder)``: a ``save_pretrained`` folder on disk, never the hub), and
applies its scaling as diffusers' latent-diffusion pipelines do::

    latents = (encode(x).latent_dist.mode() - shift_factor) * scaling_factor     # or .sample(), VQ: .latents
    images  = decode(latents / scaling_factor + shift_factor).sample

(``shift_factor`` only where the config sets one). Decoding runs in chunks of ``chunk_size``
images, under bf16 autocast on CUDA; the images come back as float32 (N, C, H, W), C = 1 or 3.

The latent cache (``encode_dataset`` / ``load_latent_cache``; the trainer's
``--latent-autoencoder``): a dataset encoded once into a directory of shards::

    <cache>/cache.json                 what was encoded: the autoencoder's identity (sha256 of its
                                       config + weight files), the dataset's identity, the settings
    <cache>/shard_00000.safetensors    latents (n, C, h, w) float32, labels (n,) int64
                                       (+ latents_flipped with hflip: the mirrored images' latents)
    <cache>/shard_00000.json           the shard's sha256 and size, written after it

Each file is written to a temporary name, fsynced and renamed, so a killed encode leaves whole
shards: a rerun encodes only the shards without a receipt (or whose file is missing). Loading
checks every shard against its receipt; a damaged shard is an error that names it (it is not
re-encoded silently: delete it and rerun to re-encode just that shard). A cache directory whose
``cache.json`` describes another autoencoder, dataset or settings is refused, never extended.
The trainer keeps its caches under ``<latent_cache>/<key>/``, ``key`` a hash of that description,
so another autoencoder or dataset gets a fresh directory and caches are never mixed.

Latents are deterministic: the posterior mean (``posterior="mode"``, default) or a draw with one
generator per image seeded from (seed, index, flip) (``posterior="sample"``); encoding runs in fp32.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ._fileio import CheckpointError, fsync_path, sha256_of
from .data import ImageDataset

AUTOENCODER_CLASSES = ("AutoencoderKL", "VQModel")
POSTERIORS = ("mode", "sample")
CACHE_FORMAT = 1
CACHE_HEADER = "cache.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")


class LatentCacheError(ValueError):
    """A latent cache that cannot be used: encoded from something else, incomplete or damaged."""


# ---------------------------------------------------------------- the autoencoder
def autoencoder_identity(path: str | os.PathLike) -> str:
    """sha256 over a diffusers autoencoder folder's ``config.json`` and weight files (name + content
    hash of each, sorted): equal for copies of the folder, different when any weight changes."""
    folder = Path(path)
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and (p.name == "config.json" or p.name.endswith(_WEIGHT_SUFFIXES))
    )
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}\0{sha256_of(p)}\n".encode())
    return digest.hexdigest()


class Autoencoder:
    """An autoencoder for latent diffusion: ``encode(images) -> latents``, ``decode(latents) -> images``.

    Args:
        encode: ``encode(x)`` of (N, C, H, W) images in [-1, 1]: returns latents, a diffusers
            ``AutoencoderKLOutput`` (``.latent_dist``), a distribution with ``mean``/``std``/``mode()``
            or a ``VQEncoderOutput`` (``.latents``). None: decode only.
        decode: ``decode(z)`` of unscaled latents: returns (N, C, H, W) images (or an object with
            ``.sample``).
        scaling_factor, shift_factor: latents = (z - shift) * scale; decode(latents / scale + shift).
        identity: a string naming these exact weights (the latent cache refuses to work without one).
        path: where it was loaded from (recorded in checkpoints).
        module: the ``nn.Module`` behind the callables (its device is where encoding/decoding runs).
        chunk_size: images per encode/decode call.
        autocast: decode under bf16 autocast on CUDA.
    """

    def __init__(
        self,
        encode: Callable[[torch.Tensor], Any] | None = None,
        decode: Callable[[torch.Tensor], Any] | None = None,
        *,
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
        identity: str | None = None,
        path: str | os.PathLike | None = None,
        module: torch.nn.Module | None = None,
        chunk_size: int = 16,
        autocast: bool = True,
    ) -> None:
        if encode is None and decode is None:
            raise ValueError("an Autoencoder needs encode= or decode= (or both)")
        for name, fn in (("encode", encode), ("decode", decode)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        scale = float(scaling_factor)
        if not (math.isfinite(scale) and scale != 0):
            raise ValueError(f"scaling_factor must be a finite non-zero number, got {scaling_factor!r}")
        self._encode, self._decode = encode, decode
        self.scaling_factor = scale
        self.shift_factor = None if shift_factor is None else float(shift_factor)
        self.identity = identity
        self.path = None if path is None else str(path)
        self.module = module
        self.chunk_size = chunk_size
        self.autocast = autocast

    @classmethod
    def from_diffusers(cls, vae: torch.nn.Module, **kwargs: Any) -> Autoencoder:
        """Wrap a diffusers ``AutoencoderKL`` / ``VQModel`` (its config's scaling and shift factors)."""
        name = type(vae).__name__
        if name not in AUTOENCODER_CLASSES and not (hasattr(vae, "encode") and hasattr(vae, "decode")):
            raise TypeError(f"expected a diffusers AutoencoderKL or VQModel, got {name}")
        config = getattr(vae, "config", {})
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        kwargs.setdefault("scaling_factor", get("scaling_factor", 1.0) or 1.0)
        kwargs.setdefault("shift_factor", get("shift_factor", None))
        return cls(vae.encode, vae.decode, module=vae, **kwargs)

    @property
    def device(self) -> torch.device | None:
        if self.module is None:
            return None
        param = next(self.module.parameters(), None)
        return None if param is None else param.device

    def to(self, device: torch.device | str) -> Autoencoder:
        if self.module is not None:
            self.module.to(device)
        return self

    def record(self) -> dict[str, Any]:
        """What a checkpoint and a latent cache store about it."""
        return {
            "class": type(self.module).__name__ if self.module is not None else "callables",
            "path": self.path,
            "identity": self.identity,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }

    # -------------------------------------------------------- encode
    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, *, posterior: str = "mode", noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1] -> (N, c, h, w) float32 scaled latents, on the images' device.

        ``posterior``: "mode" (the posterior mean) or "sample" (mean + std * ``noise``, ``noise``
        shaped like the latents; VQ and plain-tensor encoders have no posterior to sample). Runs
        in fp32, ``chunk_size`` images per call.
        """
        if self._encode is None:
            raise ValueError("this Autoencoder has no encoder (decode only)")
        if posterior not in POSTERIORS:
            raise ValueError(f"unknown posterior {posterior!r}; valid: {', '.join(POSTERIORS)}")
        _check_batch(images, "images")
        device = self.device or images.device
        out = []
        for lo in range(0, images.shape[0], self.chunk_size):
            x = images[lo : lo + self.chunk_size].to(device, torch.float32)
            z = _latents_of(self._encode(x), posterior, None if noise is None else noise[lo : lo + self.chunk_size])
            if self.shift_factor is not None:
                z = z - self.shift_factor
            out.append((z * self.scaling_factor).float().to(images.device))
        return torch.cat(out)

    # -------------------------------------------------------- decode
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, c, h, w) scaled latents -> (N, C, H, W) float32 images (C = 1 or 3, [-1, 1] for a
        diffusers VAE), on the latents' device; ``chunk_size`` latents per call, bf16 autocast on CUDA."""
        if self._decode is None:
            raise ValueError("this Autoencoder has no decoder (encode only)")
        _check_batch(latents, "latents")
        device = self.device or latents.device
        out = []
        for lo in range(0, latents.shape[0], self.chunk_size):
            z = latents[lo : lo + self.chunk_size].to(device, torch.float32) / self.scaling_factor
            if self.shift_factor is not None:
                z = z + self.shift_factor
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast and device.type == "cuda"):
                images = self._decode(z)
            images = getattr(images, "sample", images)
            _check_images(images, z)
            out.append(images.float().to(latents.device))
        return torch.cat(out)

    __call__ = decode


def _check_batch(x: Any, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.dtype.is_floating_point:
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point (N, C, H, W) tensor, got {got}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")


def _check_images(images: Any, z: torch.Tensor) -> None:
    """The decoder's output must be an image batch: (N, 1 or 3, H, W) floating point, N = the latents'."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"the decoder returned {type(images).__name__}, not an (N, C, H, W) image tensor")
    if images.dim() != 4 or images.shape[0] != z.shape[0] or images.shape[1] not in (1, 3):
        raise ValueError(
            f"the decoder returned shape {tuple(images.shape)} for latents {tuple(z.shape)}: expected an image "
            f"batch ({z.shape[0]}, 1 or 3, H, W)"
        )
    if not images.dtype.is_floating_point:
        raise ValueError(f"the decoder returned {images.dtype} images; expected floating point")


def _latents_of(out: Any, posterior: str, noise: torch.Tensor | None) -> torch.Tensor:
    """Unscaled latents from an encoder's output (see ``Autoencoder``)."""
    dist = getattr(out, "latent_dist", None)
    if dist is None and hasattr(out, "mode") and hasattr(out, "std"):
        dist = out
    if dist is not None:
        if posterior == "mode":
            return dist.mode()
        if noise is None:
            raise ValueError("posterior='sample' needs noise shaped like the latents")
        return dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)
    z = getattr(out, "latents", out)
    if isinstance(z, tuple):
        z = z[0]
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"the encoder returned {type(out).__name__}: expected latents or a posterior")
    if posterior == "sample":
        raise ValueError(
            "posterior='sample' needs an encoder with a posterior (AutoencoderKL); this one returns latents"
        )
    return z


def load_autoencoder(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", chunk_size: int = 16
) -> Autoencoder:
    """A diffusers ``AutoencoderKL`` / ``VQModel`` from a ``save_pretrained`` folder on disk (never the
    hub), in eval mode on ``device``, with its identity (``autoencoder_identity``) and path."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"autoencoder folder {str(folder)!r} does not exist (a local diffusers save_pretrained folder; "
            "nothing is downloaded)"
        )
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
        class_name = config.get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(
            f"{folder} is not a diffusers autoencoder folder: cannot read its config.json ({type(e).__name__}: {e})"
        ) from e
    if class_name not in AUTOENCODER_CLASSES:
        raise ValueError(
            f"{folder} is not a diffusers autoencoder folder: config.json's _class_name is {class_name!r}, "
            f"expected one of {', '.join(AUTOENCODER_CLASSES)}"
        )
    if not any(p.name.endswith((".safetensors", ".bin")) for p in folder.iterdir()):
        raise ValueError(f"{folder} holds a {class_name} config.json but no weights (.safetensors or .bin)")
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"loading {class_name} from {folder} needs diffusers (pip install diffusers)") from e
    identity = autoencoder_identity(folder)
    vae = getattr(diffusers, class_name).from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    vae = vae.to(device).eval()
    return Autoencoder.from_diffusers(vae, identity=identity, path=folder.resolve(), chunk_size=chunk_size)


def as_autoencoder(decode: Any) -> Autoencoder:
    """``sample(decode=...)``'s argument as an ``Autoencoder``: one already, a diffusers autoencoder
    module, a folder path (``load_autoencoder``), or a callable ``decode(latents) -> images``
    (used as is: no scaling)."""
    if isinstance(decode, Autoencoder):
        return decode
    if isinstance(decode, (str, os.PathLike)):
        return load_autoencoder(decode)
    if isinstance(decode, torch.nn.Module) and hasattr(decode, "decode"):
        return Autoencoder.from_diffusers(decode)
    if callable(decode):
        return Autoencoder(decode=decode)
    raise TypeError(
        f"decode must be an Autoencoder, a diffusers autoencoder or a callable, got {type(decode).__name__}"
    )


# ---------------------------------------------------------------- the latent cache
def dataset_identity(dataset: ImageDataset, name: str) -> dict[str, Any]:
    """What the encoded data depends on: the name, size, channels, classes and a content hash
    (in-memory images: their bytes; an image folder: its files' relative paths, sizes and
    modification times; other datasets: every image's bytes)."""
    digest = hashlib.sha256()
    files = getattr(dataset, "files", None)
    root = getattr(dataset, "root", None)
    if files is not None and root is not None:
        for path, label in zip(files, dataset.file_labels, strict=True):
            stat = Path(path).stat()
            digest.update(f"{Path(path).relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
        content = "files:" + digest.hexdigest()
    else:
        images, labels = dataset.tensors()
        digest.update(images.to(torch.float32).contiguous().numpy().tobytes())
        digest.update(labels.to(torch.int64).contiguous().numpy().tobytes())
        content = "tensors:" + digest.hexdigest()
    return {
        "name": name,
        "root": None if root is None else str(Path(root).resolve()),
        "num_images": len(dataset),
        "image_size": dataset.image_size,
        "channels": dataset.channels,
        "class_names": list(getattr(dataset, "class_names", ()) or ()),
        "content": content,
    }


def cache_header(
    autoencoder: Autoencoder,
    dataset: ImageDataset,
    dataset_name: str,
    *,
    posterior: str = "mode",
    seed: int = 0,
    hflip: bool = False,
    shard_size: int = 1024,
) -> dict[str, Any]:
    """The description a cache is keyed and checked by (``cache.json``, less the autoencoder's path)."""
    if autoencoder.identity is None:
        raise ValueError(
            "a latent cache needs the autoencoder's identity (load it with load_autoencoder, or pass identity=)"
        )
    if posterior not in POSTERIORS:
        raise ValueError(f"unknown posterior {posterior!r}; valid: {', '.join(POSTERIORS)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    record = autoencoder.record()
    record.pop("path")
    n = len(dataset)
    return {
        "format": CACHE_FORMAT,
        "autoencoder": record,
        "dataset": dataset_identity(dataset, dataset_name),
        "settings": {
            "posterior": posterior,
            "seed": seed if posterior == "sample" else None,
            "hflip": bool(hflip),
            "shard_size": shard_size,
        },
        "num_shards": max(1, -(-n // shard_size)),
    }


def cache_key(header: Mapping[str, Any]) -> str:
    """16 hex digits naming a header's cache directory."""
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:16]


def _shard_names(i: int) -> tuple[str, str]:
    return f"shard_{i:05d}.safetensors", f"shard_{i:05d}.json"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.parent / f".tmp_{path.name}_{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def _header_differences(found: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    diffs = []
    for section in ("format", "autoencoder", "dataset", "settings", "num_shards"):
        a, b = found.get(section), want.get(section)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b)):
                if k != "path" and a.get(k) != b.get(k):
                    diffs.append(f"{section}.{k}: {a.get(k)!r} in the cache, {b.get(k)!r} now")
        elif a != b:
            diffs.append(f"{section}: {a!r} in the cache, {b!r} now")
    return diffs


def _read_header(directory: Path) -> dict[str, Any] | None:
    path = directory / CACHE_HEADER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged: {type(e).__name__}: {e}", path) from e


def write_cache_header(directory: str | os.PathLike, header: Mapping[str, Any], autoencoder_path: str | None) -> None:
    """Create ``directory`` with ``header`` (plus the autoencoder's path, for information), or check
    that the header already there describes the same encoding (``LatentCacheError`` otherwise)."""
    directory = Path(directory)
    found = _read_header(directory)
    if found is not None:
        diffs = _header_differences(found, header)
        if diffs:
            raise LatentCacheError(
                f"the latent cache {directory} was encoded from something else:\n  "
                + "\n  ".join(diffs)
                + "\nit is left as it is: use another cache directory (or delete this one)"
            )
        return
    directory.mkdir(parents=True, exist_ok=True)
    full = {**header, "autoencoder": {**header["autoencoder"], "path": autoencoder_path}}
    _write_json(directory / CACHE_HEADER, full)


def missing_shards(directory: str | os.PathLike, num_shards: int) -> list[int]:
    """Shards without a receipt or without their file (a killed encode's, or deleted ones)."""
    directory = Path(directory)
    out = []
    for i in range(num_shards):
        data, receipt = _shard_names(i)
        if not ((directory / receipt).is_file() and (directory / data).is_file()):
            out.append(i)
    return out


def _image_noise(shape: tuple[int, ...], seed: int, index: int, flipped: bool) -> torch.Tensor:
    digest = hashlib.blake2b(f"{seed}/{index}/{int(flipped)}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randn(shape, generator=g)


def _encode_range(
    autoencoder: Autoencoder, dataset: ImageDataset, start: int, stop: int, posterior: str, seed: int, flipped: bool
) -> torch.Tensor:
    images = torch.stack([dataset._image(i) for i in range(start, stop)])
    if flipped:
        images = images.flip(-1)
    if autoencoder.device is not None:
        images = images.to(autoencoder.device)
    noise = None
    if posterior == "sample":
        shape = autoencoder.encode(images[:1], posterior="mode").shape[1:]
        noise = torch.stack([_image_noise(tuple(shape), seed, i, flipped) for i in range(start, stop)])
    return autoencoder.encode(images, posterior=posterior, noise=noise).cpu().contiguous()


def encode_dataset(
    directory: str | os.PathLike,
    autoencoder: Autoencoder,
    dataset: ImageDataset,
    *,
    dataset_name: str,
    posterior: str = "mode",
    seed: int = 0,
    hflip: bool = False,
    shard_size: int = 1024,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> Path:
    """Encode ``dataset`` into the cache at ``directory`` (created or continued: only the missing
    shards are encoded). With ``world_size`` > 1 rank r encodes shards r, r + W, ...: each rank
    calls this after rank 0 has written the header (``write_cache_header``). A directory that holds
    another encoding's header raises ``LatentCacheError`` and is left untouched. Returns ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    header = cache_header(
        autoencoder, dataset, dataset_name, posterior=posterior, seed=seed, hflip=hflip, shard_size=shard_size
    )
    if rank == 0:
        write_cache_header(directory, header, autoencoder.path)
    else:
        found = _read_header(directory)
        if found is None or _header_differences(found, header):
            raise LatentCacheError(f"rank {rank}: {directory / CACHE_HEADER} is missing or describes another encoding")
    todo = [i for i in missing_shards(directory, header["num_shards"]) if i % world_size == rank]
    from tqdm.auto import tqdm

    n = len(dataset)
    for i in tqdm(todo, disable=not progress, desc="encoding latents", unit="shard"):
        start, stop = i * shard_size, min((i + 1) * shard_size, n)
        tensors = {
            "latents": _encode_range(autoencoder, dataset, start, stop, posterior, seed, False),
            "labels": torch.tensor([dataset._label(j) for j in range(start, stop)], dtype=torch.int64),
        }
        if hflip:
            tensors["latents_flipped"] = _encode_range(autoencoder, dataset, start, stop, posterior, seed, True)
        data, receipt = _shard_names(i)
        _atomic_write(directory / data, lambda p, t=tensors, m={"start": str(start)}: save_file(t, str(p), metadata=m))
        entry = {"sha256": sha256_of(directory / data), "bytes": (directory / data).stat().st_size}
        _write_json(directory / receipt, {**entry, "start": start, "count": stop - start})
    return directory


class LatentDataset(ImageDataset):
    """A loaded latent cache: ``dataset[i] -> (latents float32 (c, h, w), label)``; with hflip, image
    i's flip in the current epoch (``flip_decision(seed, epoch, i)``, as the image datasets decide
    it) selects the latents of the mirrored image."""

    def __init__(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor,
        flipped: torch.Tensor | None,
        header: Mapping[str, Any],
        *,
        hflip: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(hflip=hflip, seed=seed)
        if hflip and flipped is None:
            raise LatentCacheError("hflip needs a latent cache encoded with hflip (the mirrored images' latents)")
        self.latents, self.labels, self.flipped = latents, labels, flipped
        self.header = dict(header)
        self.channels = int(latents.shape[1])
        self.image_size = int(latents.shape[-1])
        self.class_names = tuple(header["dataset"]["class_names"])
        self.num_classes = len(self.class_names) or None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def _image(self, index: int) -> torch.Tensor:
        return self.latents[index].clone()

    def _label(self, index: int) -> int:
        return int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} latents")
        index %= n
        source = self.flipped if self.is_flipped(index) else self.latents
        return source[index].clone(), torch.tensor(self._label(index), dtype=torch.int64)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents.clone(), self.labels.clone()


def load_latent_cache(
    directory: str | os.PathLike,
    *,
    expect: Mapping[str, Any] | None = None,
    hflip: bool = False,
    seed: int = 0,
) -> LatentDataset:
    """The complete cache at ``directory`` as a ``LatentDataset`` (in memory). ``expect``: the header
    it must hold (``cache_header``; ``LatentCacheError`` listing the differences otherwise). A
    missing shard raises ``LatentCacheError``, a damaged one ``CheckpointError``, each naming the file."""
    from safetensors.torch import load_file

    directory = Path(directory)
    header = _read_header(directory)
    if header is None:
        raise LatentCacheError(f"{directory} is not a latent cache (no {CACHE_HEADER})")
    if expect is not None and (diffs := _header_differences(header, expect)):
        raise LatentCacheError(
            f"the latent cache {directory} was encoded from something else:\n  " + "\n  ".join(diffs)
        )
    missing = missing_shards(directory, header["num_shards"])
    if missing:
        raise LatentCacheError(
            f"the latent cache {directory} is incomplete: shard(s) {missing} missing; rerun the encode to finish it"
        )
    parts: dict[str, list[torch.Tensor]] = {"latents": [], "labels": [], "latents_flipped": []}
    for i in range(header["num_shards"]):
        data_name, receipt_name = _shard_names(i)
        data = directory / data_name
        try:
            receipt = json.loads((directory / receipt_name).read_text())
            want_sha, want_bytes = receipt["sha256"], receipt["bytes"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{directory / receipt_name} is damaged: {type(e).__name__}: {e}", data) from e
        size = data.stat().st_size
        if size != want_bytes or sha256_of(data) != want_sha:
            raise CheckpointError(
                f"latent shard {data} is damaged ({'size' if size != want_bytes else 'sha256'} differs from "
                f"{receipt_name}): delete it and rerun to re-encode that shard",
                data,
            )
        try:
            tensors = load_file(str(data))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"latent shard {data} is unreadable: {type(e).__name__}: {e}", data) from e
        for key in parts:
            if key in tensors:
                parts[key].append(tensors[key])
    latents = torch.cat(parts["latents"])
    if latents.shape[0] != header["dataset"]["num_images"]:
        raise LatentCacheError(
            f"the latent cache {directory} holds {latents.shape[0]} latents for "
            f"{header['dataset']['num_images']} images"
        )
    flipped = torch.cat(parts["latents_flipped"]) if parts["latents_flipped"] else None
    return LatentDataset(latents, torch.cat(parts["labels"]), flipped, header, hflip=hflip, seed=seed)


# ---------------------------------------------------------------- trainer and checkpoint glue
def prepare_latent_dataset(config: Any, dataset: ImageDataset, dist: Any) -> tuple[LatentDataset, Autoencoder, dict]:
    """The trainer's ``--latent-autoencoder`` step: load the autoencoder on the run's device, encode
    ``dataset`` into ``<latent_cache or out/latent_cache>/<key>/`` (reused when complete; under DDP
    rank 0 writes the header, then every rank encodes its share of the missing shards, then all
    wait for each other and load the whole cache), and return (latents, autoencoder, the record
    that checkpoints keep in ``latent.json``)."""
    task = getattr(config, "task", "diffusion")
    if task != "diffusion":
        raise ValueError(f"--latent-autoencoder trains the diffusion U-Net; --task {task} is not done on latents")
    auto = load_autoencoder(config.latent_autoencoder, device=dist.device)
    name = config.dataset if config.dataset != "folder" else f"folder:{config.data_dir}"
    options = dict(
        posterior=config.latent_posterior,
        seed=config.seed,
        hflip=config.hflip,
        shard_size=config.latent_shard_size,
    )
    header = cache_header(auto, dataset, name, **options)
    root = Path(config.latent_cache) if config.latent_cache else Path(config.out) / "latent_cache"
    directory = root / cache_key(header)
    if missing_shards(directory, header["num_shards"]) or _read_header(directory) is None:
        if dist.is_main:
            write_cache_header(directory, header, auto.path)
        dist.barrier()
        encode_dataset(
            directory,
            auto,
            dataset,
            dataset_name=name,
            rank=dist.rank,
            world_size=dist.world_size,
            progress=config.progress and dist.is_main,
            **options,
        )
    dist.barrier()
    latents = load_latent_cache(directory, expect=header, hflip=config.hflip, seed=config.seed)
    record = {**auto.record(), "cache": str(directory), "latent_shape": list(latents.latents.shape[1:])}
    return latents, auto, record


def checkpoint_autoencoder(
    path: str | os.PathLike,
    *,
    autoencoder: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    check_identity: bool = True,
) -> Autoencoder | None:
    """The autoencoder a latent checkpoint was trained with (``latent.json``: its path and identity),
    or the one at ``autoencoder`` instead; None for a pixel-space checkpoint without ``autoencoder``.
    The folder's identity must equal the recorded one (its weights were changed, or it is another
    autoencoder: ``LatentCacheError``) unless ``check_identity=False``."""
    from . import checkpoint as ckpt

    record = ckpt.load_latent_record(path)
    if record is None and autoencoder is None:
        return None
    folder = autoencoder if autoencoder is not None else record["path"]
    auto = load_autoencoder(folder, device=device)
    if record is not None and check_identity and auto.identity != record["identity"]:
        raise LatentCacheError(
            f"the autoencoder at {folder} (identity {auto.identity[:16]}...) is not the one the checkpoint was "
            f"trained with (identity {str(record['identity'])[:16]}..., from {record['path']})"
        )
    return auto
