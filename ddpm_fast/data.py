"""Built-in offline datasets and a resumable, shardable data loader.

Datasets (``make_dataset(name, image_size=...)``), all yielding ``(image, label)`` with ``image`` a
float32 ``(C, H, W)`` tensor in [-1, 1] and ``label`` an int64 scalar tensor:

- ``"digits"``: scikit-learn's 8x8 handwritten digits (1797 images, grey levels 0..16, labels 0-9),
  shipped inside the package (``ddpm_fast/assets/digits.npz``), upscaled to ``image_size`` with
  bilinear interpolation (``align_corners=False``; ``interpolation="nearest"`` keeps hard pixels),
  1 channel. Fixed split: 1437 train / 360 test images (a seed-0 permutation).
- ``"shapes"``: procedural coloured shapes (circle, square, triangle, cross; the label is the shape)
  on a plain background, any size and count, generated with torch from a seed (thousands of
  images in well under a second), stored as uint8 like a PNG would be.
- ``"folder"``: an image folder read with Pillow: one subfolder per class (labels in sorted name
  order) or images directly in the folder (unlabelled: label -1, ``num_classes = None``); resized
  (shorter side to ``image_size``, bicubic) and center-cropped.

Every dataset takes ``hflip=True`` for a random horizontal flip that is a pure function of
``(seed, epoch, index)`` (``set_epoch`` selects the epoch): the same image gets the same flip
whatever the order, the worker or the rank that loads it, so an interrupted run resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

DATASETS = ("digits", "shapes", "folder")
SPLITS = ("train", "test", "all")
SHAPE_CLASSES = ("circle", "square", "triangle", "cross")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")

_MASK64 = (1 << 64) - 1
# Digits split: a fixed permutation, independent of the user's seed, so "test" is always held out.
_DIGITS_TEST = 360


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether image ``index`` is horizontally flipped in ``epoch`` (a fair coin, a pure function)."""
    return bool(_mix64(_mix64(_mix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64)) >> 63)


def _check_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return image_size


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


class ImageDataset(Dataset):
    """Base class: ``dataset[i] -> (image float32 (C, H, W) in [-1, 1], label int64 scalar)``.

    Attributes: ``channels``, ``image_size``, ``num_classes`` (None when unlabelled),
    ``class_names``, ``hflip``, ``seed`` (of the flips), ``epoch`` (see ``set_epoch``).
    Subclasses implement ``__len__``, ``_image(i)`` and ``_label(i)``.
    """

    channels: int
    image_size: int
    num_classes: int | None
    class_names: tuple[str, ...]

    def __init__(self, *, hflip: bool = False, seed: int = 0) -> None:
        if not isinstance(hflip, bool):
            raise TypeError(f"hflip must be a bool, got {type(hflip).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips ``__getitem__`` applies (the loader calls this)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        raise NotImplementedError

    def _image(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def _label(self, index: int) -> int:
        raise NotImplementedError

    def is_flipped(self, index: int, epoch: int | None = None) -> bool:
        """Whether ``self[index]`` is flipped in ``epoch`` (default: the current epoch)."""
        return self.hflip and flip_decision(self.seed, self.epoch if epoch is None else epoch, index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        image = self._image(index)
        if self.is_flipped(index):
            image = image.flip(-1)
        return image.contiguous(), torch.tensor(self._label(index), dtype=torch.int64)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image unflipped, ``(images float32 (N, C, H, W) in [-1, 1], labels int64 (N,))``."""
        images = torch.stack([self._image(i) for i in range(len(self))]) if len(self) else torch.empty(0)
        return images, torch.tensor([self._label(i) for i in range(len(self))], dtype=torch.int64)


class TensorImageDataset(ImageDataset):
    """Images held in memory: uint8 (0..255) or float32 already in [-1, 1], ``(N, C, H, W)``."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        class_names: tuple[str, ...],
        hflip: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(hflip=hflip, seed=seed)
        if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be (N, C, S, S), got {tuple(images.shape)}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise TypeError(f"images must be uint8 or float32, got {images.dtype}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.channels = images.shape[1]
        self.image_size = images.shape[-1]
        self.class_names = class_names
        self.num_classes = len(class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def _image(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if image.dtype == torch.uint8:
            return image.to(torch.float32) / 127.5 - 1.0
        return image.clone()

    def _label(self, index: int) -> int:
        return int(self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images.to(torch.float32) / 127.5 - 1.0 if self.images.dtype == torch.uint8 else self.images
        return images.clone(), self.labels.clone()


def load_digits_array() -> tuple[np.ndarray, np.ndarray]:
    """The raw digits: ``(images uint8 (1797, 8, 8) in 0..16, labels uint8 (1797,))``.

    Origin: scikit-learn's ``load_digits()``, a copy of the test set of the UCI "Optical
    Recognition of Handwritten Digits" data set (E. Alpaydin, C. Kaynak, 1998;
    https://archive.ics.uci.edu/dataset/80), licensed CC BY 4.0. Shipped in the package so that
    neither the demo nor CI needs scikit-learn or a download.
    """
    with resources.files("ddpm_fast").joinpath("assets/digits.npz").open("rb") as f, np.load(f) as data:
        return data["images"], data["labels"]


def digits_dataset(
    *,
    image_size: int = 16,
    split: str = "train",
    hflip: bool = False,
    seed: int = 0,
    interpolation: str = "bilinear",
) -> TensorImageDataset:
    """scikit-learn's digits, 1 channel, upscaled from 8x8 to ``image_size`` (see the module doc)."""
    image_size = _check_size(image_size)
    split = _check_split(split)
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    images, labels = load_digits_array()
    order = np.random.default_rng(0).permutation(len(images))
    keep = {"test": order[:_DIGITS_TEST], "train": order[_DIGITS_TEST:], "all": np.arange(len(images))}[split]
    x = torch.from_numpy(images[keep]).to(torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    if image_size != 8:
        kwargs = {"align_corners": False} if interpolation == "bilinear" else {}
        x = F.interpolate(x, size=(image_size, image_size), mode=interpolation, **kwargs).clamp_(-1.0, 1.0)
    y = torch.from_numpy(labels[keep].astype(np.int64))
    return TensorImageDataset(x.contiguous(), y, class_names=tuple(str(d) for d in range(10)), hflip=hflip, seed=seed)


def _shape_masks(kind: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, size: int) -> torch.Tensor:
    """Coverage in [0, 1] of each shape over a ``size`` grid: (n, size, size), anti-aliased over one pixel.

    Each shape is a signed distance (negative inside; for the polygons the largest distance to an
    edge line, exact inside and close enough outside for a one-pixel ramp), in units of the
    half-image, turned into coverage by ``clamp(0.5 - d / pixel, 0, 1)``.
    """
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
    dx = coords.view(1, 1, -1) - cx.view(-1, 1, 1)
    dy = coords.view(1, -1, 1) - cy.view(-1, 1, 1)
    r = r.view(-1, 1, 1)
    adx, ady = dx.abs(), dy.abs()
    circle = (dx * dx + dy * dy).sqrt() - r
    square = torch.maximum(adx, ady) - 0.8 * r
    # An upward triangle: apex (0, -r), base corners (+-r, 0.8r) (image y grows downwards).
    triangle = torch.maximum(dy - 0.8 * r, (1.8 * adx - (dy + r)) / math.sqrt(1.8**2 + 1.0))
    arm = 0.3 * r
    cross = torch.minimum(torch.maximum(adx - arm, ady - r), torch.maximum(ady - arm, adx - r))
    k = kind.view(-1, 1, 1)
    dist = torch.where(k == 0, circle, torch.where(k == 1, square, torch.where(k == 2, triangle, cross)))
    return (0.5 - dist * (size / 2.0)).clamp_(0.0, 1.0)


def shapes_dataset(
    *,
    image_size: int = 32,
    num_images: int = 4096,
    channels: int = 3,
    split: str = "train",
    hflip: bool = False,
    seed: int = 0,
) -> TensorImageDataset:
    """Procedural shapes: one shape (label = index in ``SHAPE_CLASSES``) per image, random centre,
    size and colours on a plain background; a pure function of ``(seed, split, num_images,
    image_size, channels)``. ``split="test"`` draws from an independent stream ("all" = "train")."""
    image_size = _check_size(image_size)
    split = _check_split(split)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if image_size < 4:
        raise ValueError(f"shapes need image_size >= 4, got {image_size}")
    stream = int(np.random.SeedSequence([seed & _MASK64, int(split == "test")]).generate_state(1)[0])
    g = torch.Generator().manual_seed(stream)
    n = num_images
    kind = torch.randint(0, len(SHAPE_CLASSES), (n,), generator=g)
    r = 0.35 + 0.3 * torch.rand(n, generator=g)  # half-size, in units of the half-image
    cx = (torch.rand(n, generator=g) * 2 - 1) * (0.95 - r)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (0.95 - r)
    fg = torch.rand(n, channels, generator=g)
    bg = torch.rand(n, channels, generator=g)
    # Keep the shape visible: a background too close to the shape's colour becomes its complement.
    close = (fg - bg).abs().mean(1, keepdim=True) < 0.3
    bg = torch.where(close, 1.0 - fg, bg)
    out = torch.empty(n, channels, image_size, image_size, dtype=torch.uint8)
    chunk = max(1, 2**22 // (image_size * image_size))  # bounds the temporaries' memory
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        cover = _shape_masks(kind[s:e], cx[s:e], cy[s:e], r[s:e], image_size).unsqueeze(1)
        img = bg[s:e, :, None, None] + cover * (fg[s:e, :, None, None] - bg[s:e, :, None, None])
        out[s:e] = (img * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return TensorImageDataset(out, kind, class_names=SHAPE_CLASSES, hflip=hflip, seed=seed)


_MODE_CHANNELS = {"1": 1, "L": 1, "LA": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "P": 3, "PA": 3}
_MODE_CHANNELS.update({m: 3 for m in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")})


class FolderDataset(ImageDataset):
    """Images under ``root`` read with Pillow (see the module doc for the layout and labels).

    ``channels``: 1 (grey) or 3 (RGB) converts every image; None takes the files' own channel
    count and refuses a folder that mixes grey and colour images. Alpha is dropped. Files are
    checked when the dataset is built (an unreadable one is named); decoding happens per item.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int,
        channels: int | None = None,
        hflip: bool = False,
        seed: int = 0,
    ) -> None:
        from PIL import Image, UnidentifiedImageError

        super().__init__(hflip=hflip, seed=seed)
        self.image_size = _check_size(image_size)
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"image folder {str(root)!r} does not exist or is not a directory")
        self.root = root

        def images_in(folder: Path, recursive: bool) -> list[Path]:
            files = folder.rglob("*") if recursive else folder.iterdir()
            return sorted(
                p
                for p in files
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            )

        top = images_in(root, recursive=False)
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        # Subfolders without images (logs, empty directories) are not classes.
        labelled = {d.name: files for d in subdirs if (files := images_in(d, recursive=True))}
        if top and labelled:
            raise ValueError(
                f"{root} holds images both at its top level and in subfolders: put every image in a class "
                "subfolder (labelled) or all of them at the top level (unlabelled)"
            )
        if top:
            self.files = top
            self.file_labels = [-1] * len(top)
            self.class_names = ()
            self.num_classes = None
        else:
            self.class_names = tuple(labelled)
            self.files = [p for files in labelled.values() for p in files]
            self.file_labels = [k for k, files in enumerate(labelled.values()) for _ in files]
            self.num_classes = len(self.class_names) or None
        if not self.files:
            raise ValueError(
                f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} "
                "at the top level and in subfolders)"
            )
        found: dict[int, Path] = {}
        for path in self.files:
            try:
                with Image.open(path) as img:
                    mode = img.mode
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"cannot read image file {path}: {e}") from e
            if mode not in _MODE_CHANNELS:
                raise ValueError(f"image file {path} has an unsupported mode {mode!r}")
            found.setdefault(_MODE_CHANNELS[mode], path)
        if channels is None and len(found) > 1:
            raise ValueError(
                f"{root} mixes channel counts: {found[1]} is greyscale (1 channel) and {found[3]} is colour "
                "(3 channels); pass channels=1 or channels=3 to convert every image"
            )
        self.channels = channels if channels is not None else next(iter(found))

    def __len__(self) -> int:
        return len(self.files)

    def _label(self, index: int) -> int:
        return self.file_labels[index]

    def _image(self, index: int) -> torch.Tensor:
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as img:
                if img.mode.startswith("I;16"):  # 16-bit grey: scale to 8 bits before converting
                    img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257.0).round().astype(np.uint8))
                img = img.convert("L" if self.channels == 1 else "RGB")
                w, h = img.size
                scale = self.image_size / min(w, h)
                nw, nh = max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))
                img = img.resize((nw, nh), Image.Resampling.BICUBIC)
                left, top = (nw - self.image_size) // 2, (nh - self.image_size) // 2
                img = img.crop((left, top, left + self.image_size, top + self.image_size))
                array = np.asarray(img, dtype=np.float32)
        except OSError as e:
            raise ValueError(f"cannot decode image file {path}: {e}") from e
        if array.ndim == 2:
            array = array[None]
        else:
            array = array.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(array)) / 127.5 - 1.0


def make_dataset(
    name: str,
    *,
    image_size: int,
    split: str = "train",
    hflip: bool = False,
    seed: int = 0,
    root: str | Path | None = None,
    channels: int | None = None,
    num_images: int | None = None,
    interpolation: str = "bilinear",
) -> ImageDataset:
    """Build a dataset by name: ``"digits"``, ``"shapes"`` or ``"folder"`` (with ``root``).

    ``split``: "train" (default), "test" (held out: digits' fixed 360 images, an independent
    shapes stream) or "all"; a folder has no held-out split ("train" = "all", "test" refused).
    ``seed`` seeds the flips (and the shapes' content). ``channels``: shapes 1 or 3 (default 3),
    folder 1, 3 or None (the files'); digits are always 1. ``num_images``: shapes only
    (default 4096). ``interpolation``: digits' upscaling, "bilinear" (default) or "nearest".
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {DATASETS}")
    _check_split(split)
    if name != "folder" and root is not None:
        raise ValueError(f"root= is only for the 'folder' dataset, not {name!r}")
    if name != "shapes" and num_images is not None:
        raise ValueError(f"num_images= is only for the 'shapes' dataset, not {name!r}")
    if name == "digits":
        if channels not in (None, 1):
            raise ValueError(f"digits have 1 channel, got channels={channels!r}")
        return digits_dataset(image_size=image_size, split=split, hflip=hflip, seed=seed, interpolation=interpolation)
    if name == "shapes":
        return shapes_dataset(
            image_size=image_size,
            num_images=4096 if num_images is None else num_images,
            channels=3 if channels is None else channels,
            split=split,
            hflip=hflip,
            seed=seed,
        )
    if root is None:
        raise ValueError("the 'folder' dataset needs root= (a directory of images)")
    if split == "test":
        raise ValueError("the 'folder' dataset has no held-out split: use split='train' (every image)")
    return FolderDataset(root, image_size=image_size, channels=channels, hflip=hflip, seed=seed)


class _BatchList(Sampler[list[int]]):
    """Yields precomputed batches of indices (the loader's order for one epoch)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ResumableLoader:
    """Batches ``(images (B, C, H, W) float32, labels (B,) int64)`` in an order that is a pure
    function of ``(seed, epoch)``, sharded across ranks, resumable mid-epoch.

    The order of epoch ``e``: ``torch.randperm(N, generator=torch.Generator().manual_seed(seed + e))``
    (``arange(N)`` when ``shuffle=False``), truncated to a multiple of ``world_size`` so that every
    rank gets the same number of images and the ranks' images are disjoint (at most
    ``world_size - 1`` images skipped per epoch, a different few each epoch); rank ``r`` takes
    ``order[r::world_size]`` and cuts it into batches of ``batch_size`` (per rank), dropping a last
    partial batch when ``drop_last``. Flips (``dataset.hflip``) follow ``(dataset.seed, epoch,
    index)``; the loader sets ``dataset.set_epoch(e)``.

    Resume contract: ``state_dict()`` = ``{"epoch": e, "index": i, ...}`` where ``i`` is the number
    of this rank's images already *yielded* in epoch ``e`` (a batch counts as consumed as soon as it
    is yielded, so save the state after the optimizer step that used it). A loader built with the same
    dataset, ``seed``, ``batch_size``, ``shuffle``, ``drop_last`` and ``world_size`` and given that
    state (``make_loader(..., epoch=e, index=i)`` or ``load_state_dict``) yields exactly the batches
    the uninterrupted loader would have yielded next, whatever ``num_workers``. An ``index`` at the
    end of an epoch rolls over to ``(e + 1, 0)``. The loader never touches torch's global RNG.

    Iterating (``for batch in loader``) runs the rest of the current epoch, then moves to the next;
    ``forever()`` chains epochs; ``len(loader)`` is the number of batches in a full epoch.

    ``batch_size`` is per rank; ``rank``/``world_size`` shard for DDP (``torch.distributed``'s
    rank and world size); ``(epoch, index)`` is the position to start from (a saved
    ``state_dict()``); ``pin_memory`` defaults to on when CUDA is available.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int,
        epoch: int = 0,
        index: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        for key, value, low in (
            ("batch_size", batch_size, 1),
            ("epoch", epoch, 0),
            ("index", index, 0),
            ("num_workers", num_workers, 0),
            ("world_size", world_size, 1),
            ("rank", rank, 0),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{key} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{key} must be >= {low}, got {value}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        # Pinned memory only helps host-to-GPU copies; without CUDA torch would only warn.
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory and torch.cuda.is_available()
        self.rank = rank
        self.world_size = world_size
        n = len(dataset)
        self.per_rank = n // world_size
        if self.per_rank == 0 or (drop_last and self.per_rank < batch_size):
            raise ValueError(
                f"a dataset of {n} images gives {self.per_rank} per rank over {world_size} rank(s): "
                f"not enough for one batch of {batch_size}"
            )
        self.epoch = epoch
        self.index = index
        self._normalise()

    @property
    def samples_per_epoch(self) -> int:
        """Images this rank yields in a full epoch."""
        return (self.per_rank // self.batch_size) * self.batch_size if self.drop_last else self.per_rank

    def __len__(self) -> int:
        if self.drop_last:
            return self.samples_per_epoch // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def _normalise(self) -> None:
        if self.index >= self.samples_per_epoch:
            self.epoch += self.index // self.samples_per_epoch
            self.index %= self.samples_per_epoch

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices for ``epoch``, in order (``samples_per_epoch`` of them)."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(n)
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        return mine[: self.samples_per_epoch].tolist()

    def state_dict(self) -> dict[str, int | bool]:
        """The position (``epoch``, ``index``) plus what must match on resume."""
        self._normalise()
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "dataset_len": len(self.dataset),
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Continue from ``state``; refuses a state from a different order (seed, sizes, sharding)."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "world_size", "dataset_len", "shuffle", "drop_last"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"data-loader state has {key}={state[key]!r} but this loader has {mine[key]!r}: "
                    "resuming would not continue the same order"
                )
        for key in ("epoch", "index"):
            if key not in state or isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f"data-loader state needs an int {key} >= 0, got {state.get(key)!r}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._normalise()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._normalise()
        epoch = self.epoch
        indices = self.epoch_indices(epoch)[self.index :]
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)  # workers receive the dataset when the iterator starts
        loader = DataLoader(
            self.dataset,
            batch_sampler=_BatchList(batches),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # A private generator: DataLoader otherwise draws its worker seed from the global RNG,
            # which would make the trainer's random stream depend on where a run was resumed.
            generator=torch.Generator().manual_seed(self.seed + epoch),
        )
        for batch in loader:
            self.index += batch[0].shape[0]
            yield batch
        if self.epoch == epoch and self.index >= self.samples_per_epoch:
            self.epoch, self.index = epoch + 1, 0

    def forever(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches across epochs without end (the state stays exact between any two batches)."""
        while True:
            yield from self


# The factory's name, kept for callers; the class's own signature and docstring serve both.
make_loader = ResumableLoader
