"""``ddpm_fast.evaluate()`` / ``ddpm-fast eval``: FID, Inception Score and classifier FID of a checkpoint's
samples (and optionally its bits/dim on the data), sharded over processes and resumable.

The image set is a pure function of (seed, index): image i starts from noise drawn by its own
generator seeded from (seed, i), which also draws its sampling noise, and a class-conditional
model gets the label i mod C. Batches are the consecutive index ranges [kB, (k + 1)B); process r of
W takes batches r, r + W, ... Each process samples its batches, quantises them to 8 bits (as saved
images would be), extracts features on the fly and accumulates float64 sums (count, sum, sum of
outer products; class-probability sums for the Inception Score), which are all-reduced at the end.

Each process flushes its finished index ranges and sums to ``<out>/shards/`` (``eval_shards``); a
rerun of the same command loads them and samples only what is missing, and gets the same result as
an uninterrupted run. ``<out>/result.json`` holds every setting and the figures, ``<out>/samples.npz``
the samples' statistics in pytorch-fid's format.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import eval_shards as shards
from .eval_shards import FeatureAccumulator, ShardFile, TermAccumulator
from .fid_stats import load_stats, save_stats
from .metrics import frechet_distance

METRICS = ("fid", "is", "classifier_fid")
WEIGHTS = ("ema", "raw")
CACHE_ENV = "DDPM_FAST_CACHE_DIR"
# Test hook: the process kills itself (SIGKILL) right after its first shard flush.
KILL_AFTER_FLUSH_ENV = "DDPM_FAST_EVAL_TEST_KILL_AFTER_FLUSH"


def image_seed(seed: int, index: int, stream: str = "sample") -> int:
    """The 63-bit seed of image (or batch) ``index``'s generator: a function of (seed, index) alone."""
    digest = hashlib.blake2b(f"ddpm_fast.eval/{stream}/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] rounded to the 256 levels of an 8-bit file (clamped first), still in [-1, 1]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def default_cache_dir() -> Path:
    """Where the digits/shapes classifier's weights are kept: ``$DDPM_FAST_CACHE_DIR`` or ~/.cache/ddpm_fast."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ddpm_fast")


# ---------------------------------------------------------------- feature networks
@dataclass
class FeatureNetwork:
    """``net(images in [-1, 1]) -> (features (B, feature_dim), logits (B, num_logits))``; ``identity``
    names the network and its weights (it goes into the shard header)."""

    metric: str
    feature_dim: int
    num_logits: int
    identity: dict[str, Any]
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(images)


def _state_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def feature_network(
    metric: str,
    *,
    dataset: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    inception_weights: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    classifier_cache: str | os.PathLike | None = None,
) -> FeatureNetwork:
    """The network of a metric: Inception (``"fid"``, ``"is"``; pytorch-fid's weights file, see
    ``ddpm_fast.inception``) or the built-in dataset's classifier (``"classifier_fid"``: digits or
    shapes at ``image_size``, trained once and cached in ``classifier_cache``)."""
    device = torch.device(device)
    if metric in ("fid", "is"):
        from .inception import FEATURE_DIM, NUM_LOGITS, load_inception

        net, digest = load_inception(inception_weights, device=device)
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        return FeatureNetwork(metric, FEATURE_DIM, NUM_LOGITS, {"network": "inception", "sha256": digest}, net)
    if metric != "classifier_fid":
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    from .metrics import train_classifier

    if dataset not in ("digits", "shapes"):
        raise ValueError(
            f"classifier_fid needs a built-in dataset with a classifier (digits or shapes), got {dataset!r}: "
            "use --metric fid with Inception weights"
        )
    cache = Path(classifier_cache) if classifier_cache is not None else default_cache_dir()
    classifier = train_classifier(dataset, image_size, 0, channels=channels, cache_dir=cache).to(device).eval()

    def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = classifier.features(images.to(device))
        return feats, classifier.head(feats)

    identity = {
        "network": "classifier",
        "dataset": dataset,
        "image_size": image_size,
        "config": classifier.config,
        "sha256": _state_sha256(classifier),
    }
    return FeatureNetwork(metric, classifier.config["feature_dim"], classifier.num_classes, identity, forward)


# ---------------------------------------------------------------- sampling
@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    scheduler_config: Any,
    indices: Sequence[int] | torch.Tensor,
    *,
    scheduler: str = "dpmsolver++",
    steps: int = 20,
    seed: int = 0,
    device: torch.device | str | None = None,
    guidance_scale: float | None = None,
    eta: float = 0.0,
    scheduler_options: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """The evaluation images with these indices, ``(len(indices), C, H, W)`` float32 in [-1, 1],
    quantised to 8 bits. Image i depends on (seed, i) only: its generator (on ``device``) is seeded
    from them; a class-conditional model (``model.null_class_label`` = its number of classes) gets
    label i mod C."""
    idx = [int(i) for i in indices]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generators = [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in idx]
    num_classes = getattr(model, "null_class_label", None)
    labels = torch.tensor(idx, device=device) % num_classes if num_classes else None
    from .sampler import sample

    extra = {"eta": eta} if eta else {}
    images = sample(
        model,
        batch_size=len(idx),
        num_inference_steps=steps,
        scheduler=scheduler,
        scheduler_config=scheduler_config,
        scheduler_options=scheduler_options,
        class_labels=labels,
        guidance_scale=guidance_scale,
        generator=generators,
        noise="torch",  # each image's draws from its own generator (a list of one included)
        chunk_size=len(idx),
        output_type="tensor",
        progress=False,
        device=device,
        **extra,
    )
    return quantize_8bit(images.float())


def _save_pngs(images: torch.Tensor, indices: Sequence[int], directory: Path) -> None:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    arrays = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, a in zip(indices, arrays, strict=True):
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(directory / f"{int(i):06d}.png")


# ---------------------------------------------------------------- the loop
class _Resumable:
    """A task's units of work, resumable: on construction the sums its shard file holds are loaded into
    ``state`` (those units are skipped); the file is flushed every ``flush_every_s`` seconds and after
    the last unit."""

    def __init__(self, shard: ShardFile | None, state: dict, flush_every_s: float) -> None:
        self.shard, self.state, self.flush_every_s = shard, state, flush_every_s
        self.done: list[list[int]] = shard.load(state) if shard is not None else []
        self.last_flush = time.monotonic()
        self.pending = False

    def run(self, units: list[tuple[int, int]], work: Callable[[int, int], None], show_bar: bool, desc: str) -> int:
        """``work(lo, hi)`` for each of ``units`` not done yet; returns the number of items run now."""
        todo = [(lo, hi) for lo, hi in units if not shards.covered(self.done, lo, hi)]
        total = sum(hi - lo for lo, hi in units)
        bar = _bar(show_bar, total, total - sum(hi - lo for lo, hi in todo), desc)
        try:
            for k, (lo, hi) in enumerate(todo):
                work(lo, hi)
                self.finished(lo, hi, last=k == len(todo) - 1)
                bar.update(hi - lo)
        finally:
            bar.close()
        return sum(hi - lo for lo, hi in todo)

    def finished(self, lo: int, hi: int, last: bool) -> None:
        self.done.append([lo, hi])
        self.pending = True
        if self.shard is not None and (last or time.monotonic() - self.last_flush >= self.flush_every_s):
            self.flush()

    def flush(self) -> None:
        if self.shard is None or not self.pending:
            return
        self.shard.save(self.done, self.state)
        self.last_flush, self.pending = time.monotonic(), False
        if os.environ.get(KILL_AFTER_FLUSH_ENV) == "1":
            os.kill(os.getpid(), signal.SIGKILL)


def _bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True, disable=not enabled)


def sample_statistics(
    model: torch.nn.Module,
    scheduler_config: Any,
    net: FeatureNetwork,
    *,
    num_samples: int,
    scheduler: str = "dpmsolver++",
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 256,
    guidance_scale: float | None = None,
    eta: float = 0.0,
    scheduler_options: Mapping[str, Any] | None = None,
    is_splits: int = 10,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    shard: ShardFile | None = None,
    flush_every_s: float = 60.0,
    save_dir: Path | None = None,
    progress: bool = False,
) -> FeatureAccumulator:
    """Sample this process's share of images ``[0, num_samples)`` and accumulate their features
    (continuing from ``shard`` when given); the sums are all-reduced over the process group when
    there is one. Returns the accumulator of all the images."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    acc = FeatureAccumulator(net.feature_dim, net.num_logits, num_samples, is_splits=is_splits, device=device)
    resumable = _Resumable(shard, acc.state, flush_every_s)

    def work(lo: int, hi: int) -> None:
        idx = list(range(lo, hi))
        images = sample_images(
            model,
            scheduler_config,
            idx,
            scheduler=scheduler,
            steps=steps,
            seed=seed,
            device=device,
            guidance_scale=guidance_scale,
            eta=eta,
            scheduler_options=scheduler_options,
        )
        if save_dir is not None:
            _save_pngs(images, idx, save_dir)
        feats, logits = net(images)
        acc.add(feats, logits if net.num_logits else None, torch.arange(lo, hi))

    mine = shards.my_units(num_samples, batch_size, rank, world_size)
    sampled_now = resumable.run(mine, work, progress and rank == 0, "eval")
    sampled = {"n": torch.tensor(sampled_now, dtype=torch.int64, device=device)}
    shards.all_reduce_state(sampled, device)
    shards.all_reduce_state(acc.state, device)
    acc.sampled_now = int(sampled["n"])  # images sampled by this run (the rest came from shard files)
    if acc.count != num_samples:
        raise RuntimeError(f"accumulated {acc.count} images, expected {num_samples} (shard files out of step?)")
    return acc


def fid_and_is(acc: FeatureAccumulator, ref: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, float]:
    """FID against ``ref`` = (mu, sigma) when given, and the Inception Score when the logits were kept."""
    out: dict[str, float] = {}
    if ref is not None:
        mu, sigma = acc.mean_cov()
        out["fid"] = frechet_distance(mu, sigma, *ref)
    if acc.num_logits:
        out["inception_score"], out["inception_score_std"] = acc.inception_score()
    return out


# ---------------------------------------------------------------- bits/dim on the data
def _nll_terms(
    model: torch.nn.Module,
    scheduler_config: Any,
    data: Any,
    *,
    num_images: int,
    batch_size: int,
    t_stride: int,
    seed: int,
    device: torch.device,
    rank: int,
    world_size: int,
    shard: ShardFile | None,
    flush_every_s: float,
    progress: bool,
) -> tuple[TermAccumulator, list[str]]:
    """Sum over the first ``num_images`` images of ``data`` of ``likelihood.bpd_terms``' rows, sharded
    and resumable as the sampling is; batch k's draws come from a generator seeded from (seed, k)."""
    try:
        from .likelihood import bpd_column_names, bpd_terms
    except ImportError as e:
        raise ValueError(f"--nll (bits/dim) is not available in this build: {e}") from e
    from .schedule import Schedule

    schedule = Schedule.from_config(scheduler_config, device=device)
    names = bpd_column_names(schedule.num_train_timesteps, t_stride)
    acc = TermAccumulator(len(names), device=device)
    resumable = _Resumable(shard, acc.state, flush_every_s)
    conditional = getattr(model, "null_class_label", None) is not None

    def work(lo: int, hi: int) -> None:
        items = [data[i] for i in range(lo, hi)]
        x0 = quantize_8bit(torch.stack([x for x, _ in items]).to(device))
        labels = torch.stack([y for _, y in items]).to(device) if conditional else None
        generator = torch.Generator(device=device).manual_seed(image_seed(seed, lo // batch_size, "nll"))
        rows = bpd_terms(
            model,
            x0,
            schedule,
            t_stride=t_stride,
            prediction_type=scheduler_config.prediction_type,
            variance_type=scheduler_config.variance_type,
            class_labels=labels,
            generator=generator,
        )
        acc.add(rows)

    mine = shards.my_units(num_images, batch_size, rank, world_size)
    resumable.run(mine, work, progress and rank == 0, "bits/dim")
    shards.all_reduce_state(acc.state, device)
    return acc, names


def _nll_summary(acc: TermAccumulator, names: list[str], t_stride: int) -> dict[str, Any]:
    mean = acc.means()
    return {
        "bpd": float(mean.sum()),
        "prior": float(mean[0]),
        "kl": float(mean[1:-1].sum()),
        "decoder": float(mean[-1]),
        "num_images": acc.count,
        "t_stride": t_stride,
        "timesteps_evaluated": len(names) - 2,
    }


# ---------------------------------------------------------------- checkpoints
def checkpoint_identity(path: str | os.PathLike, weights: str) -> tuple[Path, dict[str, Any]]:
    """(the resolved directory, {sha256 of the weights used and of the configs}) of a run, step or
    diffusers pipeline directory: the shard header's "which model"."""
    from ._fileio import read_manifest, sha256_of
    from .checkpoint import resolve_checkpoint

    pipeline = Path(path)
    if (pipeline / "unet" / "config.json").is_file() and (pipeline / "scheduler" / "scheduler_config.json").is_file():
        files = sorted(p for d in ("unet", "scheduler") for p in (pipeline / d).iterdir() if p.is_file())
        return pipeline, {f"{p.parent.name}/{p.name}": sha256_of(p) for p in files}
    step_dir = resolve_checkpoint(path)
    manifest = read_manifest(step_dir) or {}
    names = ("ema.safetensors" if weights == "ema" else "model.safetensors", "config.json", "scheduler_config.json")
    ident = {}
    for name in names:
        if not (step_dir / name).is_file():
            raise FileNotFoundError(f"checkpoint {step_dir} is incomplete: missing {name}")
        ident[name] = manifest[name]["sha256"] if name in manifest else sha256_of(step_dir / name)
    return step_dir, ident


def _train_config(step_dir: Path) -> dict[str, Any]:
    path = step_dir / "train_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {}


# ---------------------------------------------------------------- the command
def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _open_shard(out: Path, task: str, rank: int, world_size: int, header: dict[str, Any]) -> ShardFile:
    """Process ``rank``'s shard file of ``task`` under ``out``, after refusing another world size's files."""
    shards.check_world_size(out, task, world_size)
    return ShardFile(shards.shard_path(out, task, rank, world_size), header)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def evaluate(
    checkpoint: str | os.PathLike,
    *,
    num_samples: int = 50_000,
    scheduler: str = "dpmsolver++",
    steps: int = 20,
    metric: str = "fid",
    ref_stats: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    batch_size: int = 256,
    out: str | os.PathLike | None = None,
    weights: str = "ema",
    seed: int = 0,
    save_images: bool = False,
    guidance_scale: float | None = None,
    eta: float = 0.0,
    scheduler_options: Mapping[str, Any] | None = None,
    is_splits: int = 10,
    dataset: str | None = None,
    nll: bool = False,
    nll_t_stride: int = 1,
    nll_num_images: int | None = None,
    nll_batch_size: int | None = None,
    device: str = "auto",
    flush_every_s: float = 60.0,
    classifier_cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint's samples: FID, Inception Score or classifier FID (and bits/dim with ``nll``).

    Args:
        checkpoint: a run directory (follows ``checkpoints/latest``), a step directory or a diffusers
            pipeline folder.
        num_samples: images to sample (>= 2).
        scheduler, steps, eta, guidance_scale, scheduler_options: the sampler (``ddpm_fast.sample``'s
            names); options given join the settings (and the default ``out``'s name).
        metric: "fid" (Inception pool3 FID against ``ref_stats``, plus the Inception Score), "is" (the
            Inception Score alone) or "classifier_fid" (the built-in dataset's classifier: FID against
            ``ref_stats`` or, by default, the held-out split's statistics; plus the classifier's IS).
        ref_stats: pytorch-fid npz statistics (``ddpm-fast fid-stats``).
        inception_weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``; default
            ``$DDPM_FAST_INCEPTION_WEIGHTS``.
        batch_size: images per sampling batch (one work unit; part of the settings a resume needs).
        out: the evaluation directory (shards, result.json, samples.npz, images/); default
            ``<run>/eval/<settings>``.
        weights: "ema" or "raw".
        seed: image i's noise comes from (seed, i).
        save_images: also write every image as ``<out>/images/NNNNNN.png``.
        is_splits: the Inception Score's splits (by index).
        dataset: the built-in dataset of the classifier FID and of ``nll`` (default: the run's).
        nll: also the bits/dim of the dataset's held-out split (``likelihood.bpd_terms``), with
            ``nll_t_stride``, the first ``nll_num_images`` images, ``nll_batch_size`` per batch.
        device: "auto" (CUDA when available; under torchrun the local rank's GPU), "cpu", "cuda".
        flush_every_s: seconds between shard flushes (each process; also after its last batch).
        classifier_cache: where the dataset classifier is cached (default ``$DDPM_FAST_CACHE_DIR``
            or ~/.cache/ddpm_fast).
        progress: a progress bar (images/s, ETA) on rank 0.

    Under ``torchrun`` (WORLD_SIZE > 1) every process takes its share and the sums are all-reduced
    (NCCL on GPUs, gloo on CPUs). Returns the result dict (also written to ``<out>/result.json``).
    """
    from .checkpoint import load_for_sampling
    from .schedule import normalize_choice
    from .solvers.registry import SCHEDULER_NAMES, resolve
    from .train import _Distributed

    start = time.perf_counter()
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    scheduler = normalize_choice("scheduler", scheduler, SCHEDULER_NAMES)
    if scheduler_options:
        resolve(scheduler, None, options=scheduler_options)  # names and values, before any work
        scheduler_options = dict(sorted(scheduler_options.items()))
    _check_int("num_samples", num_samples, 1 if metric == "is" else 2)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("is_splits", is_splits)):
        _check_int(name, value, 1)
    _check_int("seed", seed, 0)
    if not (flush_every_s >= 0):
        raise ValueError(f"flush_every_s must be >= 0, got {flush_every_s}")
    if metric == "fid" and ref_stats is None:
        raise ValueError(
            "metric 'fid' needs reference statistics: --ref-stats stats.npz (make them with ddpm-fast fid-stats "
            "--dataset ... --out stats.npz, or pytorch-fid --save-stats); --metric is gives the Inception Score alone"
        )
    step_dir, identity = checkpoint_identity(checkpoint, weights)
    train_config = _train_config(step_dir)
    dataset = dataset or train_config.get("dataset")
    ref_path = Path(ref_stats) if ref_stats is not None else None
    if ref_path is not None and not ref_path.is_file():
        load_stats(ref_path)  # the clear "not found" error, before anything is loaded

    dist_ = _Distributed(device)
    try:
        device_ = dist_.device
        model, scheduler_config = load_for_sampling(step_dir, device=device_, ema=weights == "ema")
        image_shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
        # rank 0 trains (or loads) the classifier first, the others then read its cache
        if not dist_.is_main:
            dist_.barrier()
        net = feature_network(
            metric,
            dataset=dataset,
            image_size=image_shape[1],
            channels=image_shape[0],
            inception_weights=inception_weights,
            device=device_,
            classifier_cache=classifier_cache,
        )
        if dist_.is_main:
            dist_.barrier()
        ref, ref_source = None, None
        if ref_path is not None:
            ref, ref_source = load_stats(ref_path, dim=net.feature_dim), str(ref_path)
        elif metric == "classifier_fid":
            from .fid_stats import dataset_statistics

            mu, sigma, info = dataset_statistics(
                dataset, image_size=image_shape[1], metric=metric, device=device_, classifier_cache=classifier_cache
            )
            ref, ref_source = (mu, sigma), f"{dataset} {info['split']} split ({info['num_images']} images)"

        settings = {
            "checkpoint": str(step_dir),
            "weights": weights,
            "num_samples": num_samples,
            "scheduler": scheduler,
            "steps": steps,
            "eta": eta,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "batch_size": batch_size,
            "metric": metric,
            "ref_stats": ref_source,
            "is_splits": is_splits,
            "world_size": dist_.world_size,
            "device": device_.type,
            "save_images": save_images,
        }
        if scheduler_options:  # only when given: the settings of runs without them stay as they were
            settings["scheduler_options"] = scheduler_options
        if out is None:
            tag = f"{metric}-{weights}-{scheduler}-{steps}-n{num_samples}-seed{seed}"
            if scheduler_options:
                digest = hashlib.sha256(json.dumps(scheduler_options, sort_keys=True).encode()).hexdigest()
                tag += f"-opts{digest[:8]}"
            root = step_dir if not (step_dir.parent.name == "checkpoints") else step_dir.parent.parent
            out = root / "eval" / tag
        out = Path(out)
        if dist_.is_main:
            out.mkdir(parents=True, exist_ok=True)
        dist_.barrier()
        # what the sums depend on (not where they are written, nor the progress or flush settings)
        header = {
            "task": "sample",
            "model": identity,
            "network": net.identity,
            "image_shape": list(image_shape),
            "quantize": "8bit",
            **{k: settings[k] for k in settings if k not in ("checkpoint", "ref_stats", "save_images")},
        }
        shard = _open_shard(out, "sample", dist_.rank, dist_.world_size, header)
        t0 = time.perf_counter()
        acc = sample_statistics(
            model,
            scheduler_config,
            net,
            num_samples=num_samples,
            scheduler=scheduler,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            guidance_scale=guidance_scale,
            eta=eta,
            scheduler_options=scheduler_options,
            is_splits=is_splits,
            device=device_,
            rank=dist_.rank,
            world_size=dist_.world_size,
            shard=shard,
            flush_every_s=flush_every_s,
            save_dir=out / "images" if save_images else None,
            progress=progress,
        )
        sample_seconds = time.perf_counter() - t0

        nll_result = None
        if nll:
            nll_result = _evaluate_nll(
                model,
                scheduler_config,
                dataset,
                image_shape,
                identity,
                dist_,
                out,
                seed=seed,
                t_stride=nll_t_stride,
                num_images=nll_num_images,
                batch_size=nll_batch_size or batch_size,
                flush_every_s=flush_every_s,
                progress=progress,
                weights=weights,
            )

        result = None
        if dist_.is_main:
            figures = fid_and_is(acc, ref)
            mu, sigma = acc.mean_cov()
            save_stats(out / "samples.npz", mu, sigma, num_images=acc.count)
            result = _result(figures, settings, acc, nll_result, net.metric, sample_seconds, start, out)
            _atomic_write_text(out / "result.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
            print(result_line(result))
        if dist_.world_size > 1:
            import torch.distributed as dist

            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        return result
    finally:
        dist_.close()


def _evaluate_nll(
    model,
    scheduler_config,
    dataset,
    image_shape,
    identity,
    dist_,
    out,
    *,
    seed,
    t_stride,
    num_images,
    batch_size,
    flush_every_s,
    progress,
    weights,
) -> dict[str, Any]:
    from .data import make_dataset

    if dataset is None:
        raise ValueError("--nll needs the dataset (the run's train_config.json names none): pass --dataset")
    _check_int("nll_t_stride", t_stride, 1)
    split = "test" if dataset in ("digits", "shapes") else "train"
    data = make_dataset(dataset, image_size=image_shape[1], split=split)
    n = len(data) if num_images is None else min(_check_int("nll_num_images", num_images, 1), len(data))
    header = {
        "task": "nll",
        "model": identity,
        "weights": weights,
        "dataset": dataset,
        "split": split,
        "num_images": n,
        "t_stride": t_stride,
        "batch_size": batch_size,
        "seed": seed,
        "world_size": dist_.world_size,
        "device": dist_.device.type,
    }
    shard = _open_shard(out, "nll", dist_.rank, dist_.world_size, header)
    acc, names = _nll_terms(
        model,
        scheduler_config,
        data,
        num_images=n,
        batch_size=batch_size,
        t_stride=t_stride,
        seed=seed,
        device=dist_.device,
        rank=dist_.rank,
        world_size=dist_.world_size,
        shard=shard,
        flush_every_s=flush_every_s,
        progress=progress,
    )
    return {**_nll_summary(acc, names, t_stride), "dataset": dataset, "split": split}


def _result(figures, settings, acc, nll_result, metric, sample_seconds, start, out) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if metric == "classifier_fid":
        if "fid" in figures:
            result["classifier_fid"] = figures["fid"]
        result["classifier_is"] = figures["inception_score"]
        result["classifier_is_std"] = figures["inception_score_std"]
    else:
        result.update(figures)
    if nll_result is not None:
        result["nll"] = nll_result
    result.update(
        {
            "num_images": acc.count,
            "sampled_now": acc.sampled_now,
            "sample_seconds": sample_seconds,
            "images_per_s": acc.sampled_now / sample_seconds if acc.sampled_now else None,
            "seconds": time.perf_counter() - start,
            "out": str(out),
            "settings": settings,
        }
    )
    return result


def result_line(result: dict[str, Any]) -> str:
    """One line: the figures, what was sampled, how long it took."""
    parts = []
    for key, label in (("fid", "FID"), ("classifier_fid", "classifier FID")):
        if key in result:
            parts.append(f"{label} {result[key]:.4f}")
    for key, label in (("inception_score", "IS"), ("classifier_is", "classifier IS")):
        if key in result:
            parts.append(f"{label} {result[key]:.3f} +- {result[key + '_std']:.3f}")
    if "nll" in result:
        parts.append(f"{result['nll']['bpd']:.4f} bits/dim ({result['nll']['num_images']} images)")
    s = result["settings"]
    parts.append(
        f"{result['num_images']} samples, {s['scheduler']}-{s['steps']}, {s['weights']} weights, seed {s['seed']}"
    )
    parts.append(f"{result['seconds']:.1f} s")
    return " | ".join(parts)


# ---------------------------------------------------------------- during training
class TrainingEval:
    """The trainer's ``--eval-every`` hook: FID of the EMA weights on ``eval_samples`` images with the
    fast sampler (``eval_scheduler``, ``eval_steps``), the same image set (seed 0) at every step.

    ``eval_metric="auto"``: Inception FID when ``eval_inception_weights`` is given (against
    ``eval_ref_stats``), else the built-in dataset's classifier FID against its held-out split. The
    network and the reference statistics are built on first use (the classifier is cached in the
    run directory); under DDP every rank samples its share and the sums are all-reduced."""

    def __init__(self, config: Any, run_dir: Path, device: torch.device, image_shape: tuple[int, ...], dist_: Any):
        self.config, self.device, self.dist = config, device, dist_
        self.metric = training_eval_metric(config)
        if not dist_.is_main:
            dist_.barrier()
        self.net = feature_network(
            self.metric,
            dataset=config.dataset,
            image_size=image_shape[1],
            channels=image_shape[0],
            inception_weights=config.eval_inception_weights,
            device=device,
            classifier_cache=run_dir / "eval_cache",
        )
        if dist_.is_main:
            dist_.barrier()
        if config.eval_ref_stats is not None:
            self.ref = load_stats(config.eval_ref_stats, dim=self.net.feature_dim)
        else:
            from .fid_stats import dataset_statistics

            mu, sigma, _ = dataset_statistics(
                config.dataset,
                image_size=image_shape[1],
                metric=self.metric,
                device=device,
                classifier_cache=run_dir / "eval_cache",
            )
            self.ref = (mu, sigma)

    def __call__(self, model: torch.nn.Module, scheduler_config: Any, step: int) -> dict[str, Any]:
        config = self.config
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            acc = sample_statistics(
                model,
                scheduler_config,
                self.net,
                num_samples=config.eval_samples,
                scheduler=config.eval_scheduler,
                steps=config.eval_steps,
                scheduler_options=getattr(config, "eval_scheduler_options", None),
                seed=0,
                batch_size=min(256, config.eval_samples),
                device=self.device,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
            )
        finally:
            model.train(was_training)
        figures = fid_and_is(acc, self.ref)
        name = "classifier_fid" if self.metric == "classifier_fid" else "fid"
        record = {
            "step": step,
            name: figures["fid"],
            "eval_samples": acc.count,
            "eval_scheduler": f"{config.eval_scheduler}-{config.eval_steps}",
            "eval_seconds": time.perf_counter() - t0,
        }
        options = getattr(config, "eval_scheduler_options", None)
        if options:  # only when given: the records of runs without them stay as they were
            record["eval_scheduler_options"] = dict(options)
        return record


def training_eval_metric(config: Any) -> str:
    """The metric of the trainer's ``--eval-every`` (``config.eval_metric``, "auto" resolved), or a
    ValueError saying what is missing."""
    metric = config.eval_metric
    if metric == "auto":
        metric = "fid" if config.eval_inception_weights is not None else "classifier_fid"
    if metric == "classifier_fid" and config.dataset not in ("digits", "shapes"):
        raise ValueError(
            f"--eval-every on dataset {config.dataset!r}: the classifier FID exists for digits and shapes only; give "
            "--eval-inception-weights and --eval-ref-stats for the Inception FID"
        )
    if metric == "fid" and config.eval_ref_stats is None:
        raise ValueError("--eval-metric fid needs --eval-ref-stats (ddpm-fast fid-stats makes them)")
    return metric
