"""What ``ddpm-fast eval`` accumulates and how a process keeps it on disk between runs.

Accumulators hold float64 sums that add across images, processes and runs:

- ``FeatureAccumulator``: count, sum of features (D,) and sum of outer products (D, D) (mean and
  covariance follow), and for the Inception Score, per split of the index range, the sum of the
  class probabilities p(y|x) (S, K), the sum of sum_y p log p (S,) and the count (S,);
- ``TermAccumulator``: count and the sum over images of each bits/dim term (K + 2,).

``ShardFile``: one per process and task under ``<out>/shards/``. After each flush it holds the
settings header, the finished index ranges and the sums of those images. A flush rewrites the
file whole (a temporary file beside it, fsynced, renamed, the directory fsynced), so a killed run
leaves the previous flush intact. A checksum over header, ranges and sums is stored with them; a
file that fails it, cannot be read, or was written with other settings is refused, naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._fileio import fsync_path

SHARD_FORMAT = "ddpm_fast.eval_shard"
SHARD_VERSION = 1


class ShardError(ValueError):
    """A shard file that cannot be continued: damaged, unreadable, or from other settings."""

    def __init__(self, message: str, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = Path(path)


# ---------------------------------------------------------------- accumulators
class FeatureAccumulator:
    """Float64 sums of features ``(B, D)`` (and class logits ``(B, K)`` for the Inception Score,
    with ``is_splits`` contiguous splits of ``[0, num_samples)`` by index, the original code's
    ``[k N // S, (k + 1) N // S)``) on ``device``."""

    def __init__(
        self, feature_dim: int, num_logits: int, num_samples: int, *, is_splits: int = 10, device: torch.device
    ) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.num_samples, self.num_logits = num_samples, num_logits
        self.state: dict[str, torch.Tensor] = {
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "sum": torch.zeros(feature_dim, **f64),
            "outer": torch.zeros(feature_dim, feature_dim, **f64),
        }
        if num_logits:
            self.splits = max(1, min(is_splits, num_samples))
            self.state["p_sum"] = torch.zeros(self.splits, num_logits, **f64)
            self.state["plogp_sum"] = torch.zeros(self.splits, **f64)
            self.state["split_count"] = torch.zeros(self.splits, dtype=torch.int64, device=device)

    @property
    def count(self) -> int:
        return int(self.state["count"])

    def add(self, feats: torch.Tensor, logits: torch.Tensor | None, indices: torch.Tensor) -> None:
        """Add a batch: ``feats`` (B, D), ``logits`` (B, K) or None, ``indices`` (B,) int64 (the images')."""
        s = self.state
        f = feats.detach().to(s["sum"].device, torch.float64)
        if not torch.isfinite(f).all():
            raise ValueError("the features hold NaN or Inf (the model produced non-finite images?)")
        s["count"] += f.shape[0]
        s["sum"] += f.sum(0)
        s["outer"] += f.T @ f
        if self.num_logits:
            if logits is None:
                raise ValueError("this accumulator keeps Inception Score sums: pass the logits")
            logp = F.log_softmax(logits.detach().to(s["sum"].device, torch.float64), dim=1)
            p = logp.exp()
            # split k = [floor(kN / S), floor((k + 1)N / S)), as Salimans et al.'s code slices
            split = ((indices.to(s["sum"].device, torch.int64) + 1) * self.splits - 1) // self.num_samples
            s["p_sum"].index_add_(0, split, p)
            s["plogp_sum"].index_add_(0, split, (p * logp).sum(1))
            s["split_count"].index_add_(0, split, torch.ones_like(split))

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (D,) and unbiased covariance (D, D) (``np.cov``'s N - 1), float64 on the CPU."""
        n = self.count
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {n}")
        total, outer = self.state["sum"].cpu(), self.state["outer"].cpu()
        mu = total / n
        cov = (outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu, (cov + cov.T) / 2

    def inception_score(self) -> tuple[float, float]:
        """(mean, std) over the splits of exp(E_x KL(p(y|x) || p(y))) (Salimans et al.; std as np.std)."""
        s = {k: v.cpu() for k, v in self.state.items()}
        n = s["split_count"].to(torch.float64)
        keep = n > 0
        p_y = s["p_sum"][keep] / n[keep, None]
        entropy_y = torch.where(p_y > 0, p_y * p_y.clamp_min(1e-300).log(), torch.zeros_like(p_y)).sum(1)
        scores = torch.exp(s["plogp_sum"][keep] / n[keep] - entropy_y)
        return float(scores.mean()), float(scores.std(unbiased=False)) if len(scores) > 1 else 0.0


class TermAccumulator:
    """Float64 sums over images of per-image rows ``(B, K)`` (the bits/dim terms)."""

    def __init__(self, num_terms: int, *, device: torch.device) -> None:
        self.state = {
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "terms": torch.zeros(num_terms, dtype=torch.float64, device=device),
        }

    @property
    def count(self) -> int:
        return int(self.state["count"])

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(self.state["terms"].device, torch.float64)
        self.state["count"] += rows.shape[0]
        self.state["terms"] += rows.sum(0)

    def means(self) -> torch.Tensor:
        return self.state["terms"].cpu() / max(self.count, 1)


def all_reduce_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Sum every tensor of ``state`` over the processes (in place; NCCL needs them on the GPU)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for key, value in state.items():
        moved = value.to(device) if device.type == "cuda" else value.cpu()
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        state[key] = moved.to(value.device)


# ---------------------------------------------------------------- index ranges
def merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    """Sorted, merged ``[lo, hi)`` ranges."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def covered(ranges: list[list[int]], lo: int, hi: int) -> bool:
    """Whether ``[lo, hi)`` lies inside one of the merged ``ranges``."""
    return any(a <= lo and hi <= b for a, b in ranges)


def units(total: int, batch: int) -> list[tuple[int, int]]:
    """The work units ``[lo, hi)`` of ``[0, total)``: consecutive batches of ``batch`` indices."""
    return [(lo, min(lo + batch, total)) for lo in range(0, total, batch)]


def my_units(total: int, batch: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """The units of process ``rank``: every ``world_size``-th batch, from batch ``rank``."""
    return units(total, batch)[rank::world_size]


# ---------------------------------------------------------------- shard files
def _digest(header_json: str, done: list[list[int]], state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(header_json.encode())
    h.update(json.dumps(done).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _header_json(header: dict[str, Any]) -> str:
    return json.dumps(header, sort_keys=True, default=str)


class ShardFile:
    """One process's saved progress on one task: ``load`` what a previous run left (or nothing),
    ``save`` after each flush. ``header``: every setting the sums depend on."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = json.loads(_header_json(header))  # JSON-normalised: compares with a loaded one

    def load(self, state: dict[str, torch.Tensor]) -> list[list[int]]:
        """Fill ``state`` (the accumulator's zeros) with the saved sums and return the finished
        ranges; ``[]`` and ``state`` untouched when there is no file. ``ShardError`` when the file is
        damaged or its header differs."""
        if not self.path.exists():
            return []
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or saved.get("format") != SHARD_FORMAT:
                raise ValueError("not an evaluation shard file")
            header_json, done, sums, digest = saved["header"], saved["done"], saved["state"], saved["sha256"]
        except Exception as e:  # zip, pickle, key and type errors of a damaged or foreign file
            raise ShardError(
                f"shard file {self.path} is damaged or not an evaluation shard ({type(e).__name__}: {e}); "
                "delete it to recompute its images, or evaluate into another --out directory",
                self.path,
            ) from e
        if saved.get("version") != SHARD_VERSION:
            raise ShardError(f"shard file {self.path} has format version {saved.get('version')}", self.path)
        if _digest(header_json, done, sums) != digest:
            raise ShardError(
                f"shard file {self.path} is damaged: its checksum does not match its contents; delete it to "
                "recompute its images",
                self.path,
            )
        saved_header = json.loads(header_json)
        diffs = [
            f"{k}: {saved_header.get(k)!r} in the file, {self.header.get(k)!r} now"
            for k in sorted(set(saved_header) | set(self.header))
            if saved_header.get(k) != self.header.get(k)
        ]
        if diffs:
            raise ShardError(
                f"shard file {self.path} was written with other settings, so its partial sums cannot be mixed with "
                "this run's:\n  " + "\n  ".join(diffs) + "\nrerun with the same settings, or use another --out",
                self.path,
            )
        if set(sums) != set(state) or any(sums[k].shape != state[k].shape for k in state):
            raise ShardError(f"shard file {self.path} holds sums of other shapes", self.path)
        for key, value in sums.items():
            state[key].copy_(value)
        return merge_ranges([list(r) for r in done])

    def save(self, done: list[list[int]], state: dict[str, torch.Tensor]) -> None:
        """Write the finished ranges and their sums (atomically: temporary file, fsync, rename)."""
        header_json = _header_json(self.header)
        cpu_state = {k: v.detach().cpu().clone() for k, v in state.items()}
        done = merge_ranges(done)
        payload = {
            "format": SHARD_FORMAT,
            "version": SHARD_VERSION,
            "header": header_json,
            "done": done,
            "state": cpu_state,
            "sha256": _digest(header_json, done, cpu_state),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users
            os.replace(tmp, self.path)
            fsync_path(self.path.parent)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def shard_path(out: Path, task: str, rank: int, world_size: int) -> Path:
    return out / "shards" / f"{task}-rank{rank:03d}-of-{world_size:03d}.pt"


def check_world_size(out: Path, task: str, world_size: int) -> None:
    """Refuse shard files of this task written by a run with another number of processes."""
    directory = out / "shards"
    if not directory.is_dir():
        return
    others = sorted(
        p for p in directory.glob(f"{task}-rank*-of-*.pt") if not p.name.endswith(f"-of-{world_size:03d}.pt")
    )
    if others:
        raise ShardError(
            f"{others[0]} comes from a run with another number of processes: resume with the same number "
            f"(torchrun --nproc_per_node), or evaluate into another --out directory",
            others[0],
        )
