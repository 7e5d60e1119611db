"""The headline run: sizes, the shared context, the plan, the JSON."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..unet import UNet
from . import kernels, measure, models
from .report import SECTIONS, Report, fmt_time, write_json

SCHEMA = "ddpm_fast.headline/1"
# Set by the issue that asked for this command (issue 21): checked when the full sizes ran.
TARGETS = {
    "ddpm_seconds": 8.0,  # 256 images x 1000 DDPM steps (the DDPM paper: 17 s on a TPU v3-8)
    "ddpm_vs_diffusers": 3.0,  # x DDPMPipeline in half precision
    "train_images_per_s": 6000.0,  # batch 128 on one GPU (the paper's TPU v3-8: 2,688)
    "train_vs_diffusers": 2.0,  # x the diffusers loop, compiled
    "fwd_bwd_peak_pct": 35.0,  # U-Net forward+backward, % of the dense bf16 peak
}


@dataclass(frozen=True)
class Sizes:
    """What one headline run measures. ``full`` is the GPU run; ``small`` the CPU smoke run."""

    name: str
    preset: str  # U-Net preset of rows 1-3
    image_size: int
    num_images: int  # row 1: images per sampling run; row 3: forward batch
    ddpm_steps: int
    ddim_steps: int
    diffusers_dtypes: tuple[str, ...]  # the pipelines' U-Net dtypes
    diffusers_ddpm_fp32_steps: int  # DDPM steps timed for diffusers' fp32 pipeline (time scaled to ddpm_steps)
    model_dtype: str  # ours: "bf16" (autocast) or "fp32"; training's mixed precision too
    train_batch: int  # rows 2 and 3 (forward+backward)
    train_steps: int  # training steps per timed run
    repeats: int  # timed runs per measurement (the median is reported); 1 for >= 500-step sampling runs
    compile: bool  # torch.compile ours, diffusers' compiled loop, the kernels' compiled references
    unet_inner: int  # back-to-back calls per timed run in row 3
    group_norm_shapes: tuple[tuple[str, tuple[int, int, int, int]], ...]
    attention_head_dims: tuple[int, ...]
    attention_tokens: tuple[int, ...]
    attention_rows: int  # batch x tokens of each attention case (one head)
    kernel_dtype: str  # group_norm_silu and attention
    elementwise_shapes: tuple[tuple[int, int, int, int], ...]
    elementwise_dtype: str
    kernel_inner: int  # back-to-back calls per timed run at >= 2^24 elements (and attention)
    kernel_repeats: int  # timed runs per kernel measurement
    # torch CPU threads unless --threads says otherwise (None: torch's default). One for the small
    # run: two OpenMP threads on cores shared with other processes were seen 10-20x slower.
    cpu_threads: int | None = None


FULL = Sizes(
    name="full",
    preset="cifar10",
    image_size=32,
    num_images=256,
    ddpm_steps=1000,
    ddim_steps=50,
    diffusers_dtypes=("fp16", "fp32"),
    diffusers_ddpm_fp32_steps=200,
    model_dtype="bf16",
    train_batch=128,
    train_steps=10,
    repeats=3,
    compile=True,
    unet_inner=5,
    group_norm_shapes=(
        ("cifar10 b128", (128, 128, 32, 32)),
        ("cifar10 b128", (128, 256, 16, 16)),
        ("256px b8", (8, 128, 256, 256)),
        ("256px b8", (8, 256, 64, 64)),
    ),
    attention_head_dims=(64, 128, 256, 512),
    attention_tokens=(256, 1024),
    attention_rows=16384,
    kernel_dtype="bf16",
    elementwise_shapes=((256, 3, 32, 32), (64, 3, 512, 512)),
    elementwise_dtype="fp32",
    kernel_inner=10,
    kernel_repeats=10,
)
SMALL = Sizes(
    name="small",
    preset="tiny",
    image_size=16,
    num_images=8,
    ddpm_steps=8,
    ddim_steps=4,
    diffusers_dtypes=("fp32",),
    diffusers_ddpm_fp32_steps=8,
    model_dtype="fp32",
    train_batch=8,
    train_steps=2,
    repeats=3,
    compile=False,
    unet_inner=1,
    group_norm_shapes=(("tiny b8", (8, 32, 16, 16)), ("tiny b8", (8, 64, 8, 8))),
    attention_head_dims=(64, 128, 256, 512),
    attention_tokens=(64, 256),
    attention_rows=256,
    kernel_dtype="fp32",
    elementwise_shapes=((256, 3, 32, 32), (8, 3, 128, 128)),
    elementwise_dtype="fp32",
    kernel_inner=3,
    kernel_repeats=7,
    cpu_threads=1,
)
SIZES = {"full": FULL, "small": SMALL}


class Budget:
    """Wall-clock budget of the run: an item expected to take longer than what is left is skipped
    (and the run says so). None = no limit."""

    def __init__(self, limit_s: float | None) -> None:
        self.limit_s = limit_s
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, seconds: float) -> bool:
        return self.limit_s is None or self.elapsed() + seconds <= self.limit_s

    def why(self, seconds: float) -> str:
        left = (self.limit_s or 0) - self.elapsed()
        return (
            f"time budget: ~{seconds:.0f} s expected (from this run's timings), "
            f"{max(left, 0):.0f} s of {self.limit_s:.0f} s left"
        )


@dataclass
class Context:
    """What the sections share: device, sizes, report, budget, peaks, FLOP counts, one U-Net."""

    device: torch.device
    sizes: Sizes
    report: Report
    budget: Budget
    diffusers: ModuleType | None
    diffusers_missing: str
    peak_flops: float | None
    peak_label: str
    copy_gbps: float
    flops_forward: int = 0
    flops_forward_backward: int = 0
    trainer: Any = None
    train_dir: str | None = None
    train_compile_s: float | None = None
    _model: UNet | None = field(default=None, repr=False)

    @property
    def compile_off(self) -> str:
        return f"torch.compile is off in the '{self.sizes.name}' sizes (--compile turns it on)"

    def unet(self) -> UNet:
        """The one U-Net of rows 1-3 (seed 0), built on first use."""
        if self._model is None:
            torch.manual_seed(0)
            self._model = UNet.from_preset(self.sizes.preset, sample_size=self.sizes.image_size).to(self.device)
        return self._model

    def compiled_graphs(self) -> int:
        """How many graphs dynamo has compiled so far in this process (to show compile reuse)."""
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# The plan, in the order it runs: ours first (the rows that matter most), the U-Net rows next to
# the compiled models they reuse, then the comparisons, then the kernels. The table prints by section.
PLAN: list[tuple[str, str, Callable[[Context], None]]] = [
    ("sample", "ddpm_fast sample()", models.sample_ours),
    ("unet", "U-Net forward", models.unet_forward),
    ("train", "ddpm_fast Trainer", models.train_ours),
    ("unet", "U-Net forward+backward", models.unet_forward_backward),
    ("sample", "diffusers pipelines", models.sample_diffusers),
    ("train", "diffusers training loop", models.train_diffusers),
    ("kernels", "group_norm_silu", kernels.group_norm_rows),
    ("kernels", "attention", kernels.attention_rows),
    ("kernels", "q_sample / posterior_step", kernels.elementwise_rows),
]


def source_root() -> Path:
    """The checkout this package runs from (holding benchmarks/), else the working directory."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks").is_dir() else Path.cwd()


def default_output(slug: str, date: str) -> Path:
    return source_root() / "benchmarks" / "results" / f"{slug}-{date}-headline.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the headline run measures on cpu or cuda, not {device.type}")
    return device


def _dynamo_patch() -> dict[str, Any]:
    """Room for every compiled case of the run (one graph per kernel shape), and no silent
    fallback to eager when that room runs out."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its older name
    patch: dict[str, Any] = {limit: max(64, getattr(config, limit))}
    if hasattr(config, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    return patch


def _target(what: str, value: float, target: float, unit: str, at_most: bool = False) -> dict[str, Any]:
    met = value <= target if at_most else value >= target
    return {"what": what, "measured": value, "target": target, "unit": unit, "at_most": at_most, "met": met}


def _targets(ctx: Context) -> list[dict[str, Any]]:
    """The issue's GPU targets, checked against this run's rows (full sizes only): each
    comparison only against the diffusers setting the issue names (fp16 pipeline, compiled loop)."""
    if ctx.sizes.name != "full":
        return []

    def find(section: str, impl: str, case: str = "", dtype: str = "") -> Any:
        return next(
            (
                r
                for r in ctx.report.rows
                if r.section == section and r.impl.startswith(impl) and r.case.startswith(case) and dtype in r.dtype
            ),
            None,
        )

    out = []
    ddpm = find("sample", "ddpm_fast", "DDPM")
    if ddpm is not None:
        out.append(_target(ddpm.case, ddpm.seconds, TARGETS["ddpm_seconds"], " s", at_most=True))
        pipeline = find("sample", "diffusers", ddpm.case, "fp16")
        if pipeline is not None:
            ratio = pipeline.seconds / ddpm.seconds
            out.append(_target(f"DDPM sample() vs {pipeline.impl} fp16", ratio, TARGETS["ddpm_vs_diffusers"], "x"))
    train = find("train", "ddpm_fast")
    if train is not None:
        out.append(_target("training img/s", train.rate, TARGETS["train_images_per_s"], " img/s"))
        loop = find("train", "diffusers loop compiled")
        if loop is not None:
            ratio = loop.seconds / train.seconds
            out.append(_target("training vs the diffusers loop compiled", ratio, TARGETS["train_vs_diffusers"], "x"))
    fwd_bwd = find("unet", "ddpm_fast", "forward+backward")
    if fwd_bwd is not None and fwd_bwd.peak_pct is not None:
        out.append(_target("U-Net forward+backward % of peak", fwd_bwd.peak_pct, TARGETS["fwd_bwd_peak_pct"], "%"))
    return out


def run_headline(
    *,
    device: str = "auto",
    sizes: str | Sizes = "auto",
    out: str | Path | None = None,
    only: Sequence[str] | None = None,
    budget_s: float | None = None,
    threads: int | None = None,
    compile: bool | None = None,
    progress: bool = True,
    argv: Sequence[str] | None = None,
) -> tuple[dict[str, Any], Path, int]:
    """Run the headline benchmark, print its table on stdout and write its JSON.

    Args:
        device: "auto" (CUDA when present), "cpu" or "cuda[:N]".
        sizes: "auto" (full on CUDA, small on the CPU), "full", "small" or a ``Sizes``.
        out: the JSON's path; default benchmarks/results/<device>-<date>-headline.json.
        only: sections to run (of "sample", "train", "unet", "kernels"); default all.
        budget_s: skip items once they no longer fit this many seconds (default: 420 on CUDA,
            none on the CPU); each skip is reported.
        threads: torch CPU threads for the run (restored after); default the sizes' cpu_threads.
        compile: override the sizes' torch.compile setting.
        progress: one line per measurement on stderr.

    Returns:
        (the JSON data, its path, exit status: 0, or 1 when an item failed).
    """
    dev = resolve_device(device)
    chosen = sizes if isinstance(sizes, Sizes) else SIZES["full" if dev.type == "cuda" else "small"]
    if isinstance(sizes, str) and sizes != "auto":
        if sizes not in SIZES:
            raise ValueError(f"unknown sizes {sizes!r}; valid: auto, {', '.join(SIZES)}")
        chosen = SIZES[sizes]
    if compile is not None:
        chosen = dataclasses.replace(chosen, compile=compile)
    sections = list(SECTIONS) if not only else list(only)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    if budget_s is None and dev.type == "cuda":
        budget_s = 420.0
    old_threads = torch.get_num_threads()
    threads = threads if threads is not None else chosen.cpu_threads
    if threads is not None:
        torch.set_num_threads(threads)
    started = datetime.datetime.now().astimezone()
    report = Report(progress=progress)
    try:
        on_cuda = dev.type == "cuda"
        with (
            torch.cuda.device(dev) if on_cuda else contextlib.nullcontext(),  # events, streams: dev's
            torch.random.fork_rng(devices=[dev] if on_cuda else []),
            torch._dynamo.config.patch(**_dynamo_patch()),
        ):
            data = _run(dev, chosen, sections, report, Budget(budget_s), started)
    finally:
        torch.set_num_threads(old_threads)
    data["command"] = ["ddpm-fast", *(argv if argv is not None else sys.argv[1:])]
    path = Path(out) if out is not None else default_output(data["device"], data["date"])
    write_json(path, data)
    print(f"wall time {data['wall_s']:.1f} s; wrote {path}")
    return data, path, 1 if report.errors else 0


def _run(
    dev: torch.device, sizes: Sizes, sections: list[str], report: Report, budget: Budget, started: datetime.datetime
) -> dict[str, Any]:
    malloc = measure.steady_malloc(dev)
    diffusers, missing = None, "not needed by the sections run"
    if {"sample", "train"} & set(sections):
        diffusers, missing = measure.optional_import("diffusers")
    peak, peak_source = measure.nominal_peak_flops(dev)
    report.log(f"measuring the copy bandwidth and a matmul on {measure.device_name(dev)}")
    copy_gbps, copy_bytes = measure.copy_bandwidth(dev)
    gemm_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gemm_flops, gemm_what = measure.matmul_flops(dev, gemm_dtype)
    ctx = Context(
        device=dev,
        sizes=sizes,
        report=report,
        budget=budget,
        diffusers=diffusers,
        diffusers_missing=f"diffusers is not installed: {missing}" if diffusers is None else "",
        peak_flops=peak,
        peak_label="bf16" if peak else "",
        copy_gbps=copy_gbps,
    )
    config = ctx.unet().config
    ctx.flops_forward, ctx.flops_forward_backward = models.unet_flops(config)
    try:
        for section, what, fn in PLAN:
            if section not in sections:
                continue
            try:
                fn(ctx)
            except Exception as err:  # noqa: BLE001 (report it, keep the rest of the run)
                report.error(section, what, err)
    finally:
        models.cleanup(ctx)
    report.targets = _targets(ctx)
    commit = measure.git_commit(source_root())
    vers = measure.versions()
    head = [
        f"ddpm_fast headline: {measure.device_name(dev)} ({measure.device_slug(dev)}), sizes '{sizes.name}', "
        f"{started.date().isoformat()}, commit {str(commit['commit'])[:12]}{' (dirty tree)' * bool(commit['dirty'])}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v is not None),
        f"peak: {f'{peak / 1e12:.1f} TFLOP/s ({peak_source})' if peak else peak_source}; measured here: copy_ "
        f"{copy_gbps:,.0f} GB/s, {gemm_what} {gemm_flops / 1e12:.3g} TFLOP/s",
        f"U-Net {sizes.preset} at {sizes.image_size}x{sizes.image_size}: {ctx.flops_forward / 1e9:.2f} GFLOP/image "
        f"forward, {ctx.flops_forward_backward / 1e9:.2f} forward+backward (FlopCounterMode)",
        "time: median per sampling run / training step / call; vs base: the base row's time / this row's; "
        + (
            "of peak: % of the bf16 peak above, or of the copy_ bandwidth"
            if peak
            else "of peak: % of the copy_ bandwidth (on a CPU, tensors that fit in cache can beat it)"
        ),
    ]
    table = report.table()
    summary = report.summary()
    text = "\n".join([*head, "", table, *([""] + [summary] if summary else [])])
    print(text)
    wall = budget.elapsed()
    return {
        "schema": SCHEMA,
        "device": measure.device_slug(dev),
        "device_name": measure.device_name(dev),
        "date": started.date().isoformat(),
        "started": started.isoformat(timespec="seconds"),
        "wall_s": wall,
        "wall": fmt_time(wall),
        "versions": vers,
        "commit": commit,
        "torch_threads": torch.get_num_threads(),
        "malloc": malloc,
        "settings": {
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        },
        "sizes": dataclasses.asdict(sizes),
        "sections": sections,
        "budget_s": budget.limit_s,
        "peaks": {
            "flops": peak,
            "flops_source": peak_source,
            "flops_note": "nominal dense bf16; DESIGN.md notes ~800 TFLOP/s measured usable on an H100"
            if peak
            else None,
            "copy_GB/s": copy_gbps,
            "copy_bytes": copy_bytes,
            "matmul_FLOP/s": gemm_flops,
            "matmul": gemm_what,
        },
        "flops_per_image": {
            "preset": sizes.preset,
            "image_size": sizes.image_size,
            "forward": ctx.flops_forward,
            "forward_backward": ctx.flops_forward_backward,
            "counted_with": "torch.utils.flop_counter.FlopCounterMode, meta device, reference ops",
        },
        "rows": report.rows_json(),
        "skipped": report.skipped,
        "errors": report.errors,
        "targets": report.targets,
        "table": text,
    }
