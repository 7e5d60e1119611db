"""Command line: `ddpm-fast check | train | sample | bench [--aot | --headline] | demo | eval | fid-stats`
(or `python -m ddpm_fast`).

`train` and `sample` also read their options from a TOML file (`--config run.toml`, keys named
as the flags, with dashes or underscores, at the top level or in a [train] / [sample] table);
flags given on the command line override the file."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _error(message: object, code: int = 2) -> int:
    """Print ``error: message`` to stderr; return the exit status (2: bad input)."""
    print(f"error: {message}", file=sys.stderr)
    return code


def _options(args: argparse.Namespace, *drop: str) -> dict:
    """The command's options: the parsed flags less argparse's own entries and ``drop``."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "command", *drop)}


def _resolve_device(name: str) -> torch.device | str:
    """'auto' -> CUDA when available, else the CPU; any other name as given."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _with_defaults(options: dict, defaults: dict, command: str) -> dict:
    """``defaults`` overridden by ``options``; refuses an option ``defaults`` does not name."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {command} option(s): {', '.join(unknown)}")
    return {**defaults, **options}


def _write(make: Callable[[], Path]) -> int:
    """Run a command that writes a file and say where, or print its error (exit status 2)."""
    try:
        path = make()
    except (ValueError, FileNotFoundError, TypeError) as e:
        return _error(e)
    print(f"wrote {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .check import machine_summary, run_checks

    print(machine_summary())
    print("ddpm_fast backends:")
    ok = run_checks(tolerance=args.tolerance)
    print("all backends match the reference" if ok else "MISMATCH against the reference")
    return 0 if ok else 1


HEADLINE_OPTIONS = ("out", "device", "sizes", "only", "budget_s", "threads", "compile")


def _headline(args: argparse.Namespace) -> int:
    from .headline import run_headline

    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    try:
        _, _, code = run_headline(
            device=args.device or "auto",
            sizes=args.sizes or "auto",
            out=args.out,
            only=only,
            budget_s=args.budget_s,
            threads=args.threads,
            compile=args.compile,
            argv=args.argv,
        )
    except ValueError as e:
        return _error(e)
    return code


def _bench(args: argparse.Namespace) -> int:
    given = [f"--{name.replace('_', '-')}" for name in HEADLINE_OPTIONS if getattr(args, name) is not None]
    if args.headline:
        if args.aot or args.pytest_args:
            return _error("--headline takes no --aot and no pytest arguments")
        return _headline(args)
    if given:
        return _error(f"{', '.join(given)}: only with --headline")
    if args.aot:
        from . import _aot

        results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
        _aot.main(["--out", str(results)] if results.is_dir() else [])
        return 0
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not root.is_dir():
        print(f"benchmarks/ not found next to the package ({root}): run from a source checkout", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "pytest", str(root), "--benchmark-only", *args.pytest_args])


def _train(args: argparse.Namespace) -> int:
    from .train import NonFiniteLossError, TrainConfig, train

    options = _merge_config(args, "train")
    try:
        for prefix in ("sample", "eval"):  # --eval-scheduler-option KEY=VALUE flags over the config's table
            flags = options.pop(f"{prefix}_scheduler_option", None)
            if flags:
                table = options.get(f"{prefix}_scheduler_options")
                options[f"{prefix}_scheduler_options"] = scheduler_options(flags, table, f"--{prefix}-scheduler-option")
        config = TrainConfig.from_dict(options)
        result = train(config)
    except NonFiniteLossError as e:
        return _error(e, code=1)
    except (ValueError, FileNotFoundError) as e:
        return _error(e)
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {result.step} steps; last checkpoint: {result.last_checkpoint}")
    return 0


SAMPLE_DEFAULTS = {
    "out": "samples.png",
    "num_images": 64,
    "steps": None,
    "scheduler": "ddim",
    "eta": 0.0,
    "guidance_scale": None,
    "class_labels": "cycle",
    "seed": 0,
    "chunk_size": None,
    "nrow": None,
    "scale": 1,
    "noise": "kernel",
    "device": "auto",
    "raw_weights": False,
    "autoencoder": None,
    "classifier": None,
    "classifier_scale": 1.0,
    "dtype": "auto",
    "scheduler_option": (),  # --scheduler-option KEY=VALUE, repeated
    "scheduler_options": None,  # a TOML table of the same
}

# --dtype: the model's autocast dtype in sample(); "auto" is sample()'s own choice (bf16 on CUDA
# and on CPUs with bf16 units, else fp32)
DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _model_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


def _option_value(text: str):
    """A --scheduler-option value as TOML reads it (3, 0.5, true, inf, [1, 2]), 'none' as None, else
    the text itself (a bare word such as trailing)."""
    import tomllib

    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def scheduler_options(pairs, table, flag: str = "--scheduler-option") -> dict | None:
    """The sampler options of --scheduler-option KEY=VALUE flags over a TOML ``scheduler_options`` table."""
    if table is not None and not isinstance(table, dict):
        name = flag.removeprefix("--").replace("-", "_") + "s"  # the TOML table's name
        raise ValueError(f"{name} must be a table of option = value, got {table!r}")
    options = dict(table or {})
    for pair in [pairs] if isinstance(pairs, str) else pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} takes KEY=VALUE (e.g. solver_order=3), got {pair!r}")
        options[key.strip().replace("-", "_")] = _option_value(value)
    return options or None


def stage_scheduler_options(pairs, stages: int) -> list[dict | None] | None:
    """sample-cascade's --scheduler-option [STAGE:]KEY=VALUE flags, one dict per stage: the options
    without a stage (every stage's) under those given for the stage (e.g. 1:solver_order=3)."""
    shared: list[str] = []
    own: dict[int, list[str]] = {}
    for pair in [pairs] if isinstance(pairs, str) else pairs:
        key, _, rest = str(pair).partition("=")
        stage, sep, name = key.partition(":")
        if not (sep and stage.strip().isdigit()):
            shared.append(pair)
            continue
        if int(stage) >= stages:
            raise ValueError(
                f"--scheduler-option {pair!r} is for stage {int(stage)}, but the cascade has {stages} stages "
                f"(0 to {stages - 1})"
            )
        own.setdefault(int(stage), []).append(f"{name}={rest}" if "=" in str(pair) else name)
    if not shared and not own:
        return None
    return [scheduler_options([*shared, *own.get(i, [])], None) for i in range(stages)]


def sample_grid(checkpoint: str, **options) -> Path:
    """Sample from a checkpoint's EMA weights into a PNG grid (the ``sample`` command's work)."""
    import torch

    from .checkpoint import load_for_sampling
    from .images import save_grid
    from .sampler import sample

    o = _with_defaults(options, SAMPLE_DEFAULTS, "sample")
    dtype = _model_dtype(o["dtype"])
    if o["num_images"] < 1:
        raise ValueError(f"num_images must be >= 1, got {o['num_images']}")
    device = _resolve_device(o["device"])
    model, scheduler_config = load_for_sampling(checkpoint, device=device, ema=not o["raw_weights"])
    from .latent import checkpoint_autoencoder  # latent checkpoints: decode with the recorded autoencoder

    decoder = checkpoint_autoencoder(checkpoint, autoencoder=o["autoencoder"], device=device)
    classifier = None
    if o["classifier"] is not None:  # classifier guidance: the labels are the classifier's classes
        from .classifier import Classifier

        classifier = Classifier.load(o["classifier"], map_location=device)
    labels = None
    n_cls = classifier.num_classes if classifier is not None else model.null_class_label
    if n_cls is not None:
        if o["class_labels"] in (None, "cycle"):
            labels = torch.arange(o["num_images"]) % n_cls
        else:
            try:
                values = [int(v) for v in str(o["class_labels"]).split(",")]
            except ValueError as e:
                raise ValueError(
                    f"class_labels must be 'cycle' or comma-separated ints, got {o['class_labels']!r}"
                ) from e
            if any(not 0 <= v < n_cls for v in values):
                raise ValueError(f"class labels must lie in [0, {n_cls - 1}], got {values}")
            labels = torch.tensor(values * -(-o["num_images"] // len(values)))[: o["num_images"]]
        labels = labels.to(device)
    elif o["class_labels"] not in (None, "cycle"):
        raise ValueError("class_labels given, but the checkpoint's model is unconditional (and no --classifier)")
    generator = torch.Generator(device=device).manual_seed(o["seed"])
    images = sample(
        model,
        batch_size=o["num_images"],
        num_inference_steps=o["steps"],
        scheduler=o["scheduler"],
        scheduler_config=scheduler_config,
        scheduler_options=scheduler_options(o["scheduler_option"], o["scheduler_options"]),
        eta=o["eta"],
        guidance_scale=o["guidance_scale"],
        class_labels=labels,
        generator=generator,
        noise=o["noise"],
        chunk_size=o["chunk_size"],
        output_type="tensor",
        progress=True,
        decode=decoder,
        classifier=classifier,
        classifier_scale=o["classifier_scale"] if classifier is not None else None,
        dtype=dtype,
    )
    return save_grid(images, o["out"], nrow=o["nrow"], scale=o["scale"])


def _sample(args: argparse.Namespace) -> int:
    options = _merge_config(args, "sample")
    if "checkpoint" not in options:
        return _error("sample needs --checkpoint (a run directory or a step_XXXXXXXX directory)")
    return _write(lambda: sample_grid(**options))


CASCADE_DEFAULTS = {
    "out": "cascade.png",
    "num_images": 64,
    "schedulers": "ddim",
    "steps": None,
    "aug_level": None,
    "guidance_scale": None,
    "class_labels": "cycle",
    "seed": 0,
    "chunk_size": None,
    "nrow": None,
    "scale": 1,
    "device": "auto",
    "stage_grids": False,
    "scheduler_option": (),  # --scheduler-option [STAGE:]KEY=VALUE, repeated
}


def _stage_list(name: str, text: str | None, convert) -> list | None:
    """'a,b' -> [a, b] (one per stage), 'a' -> a (every stage), None -> None; 'none' entries -> None."""
    if text is None:
        return None
    try:
        values = [None if v.strip().lower() == "none" else convert(v.strip()) for v in str(text).split(",")]
    except ValueError as e:
        raise ValueError(
            f"--{name.replace('_', '-')} takes comma-separated values (one per stage), got {text!r}"
        ) from e
    return values if len(values) > 1 else values[0]


def sample_cascade_grid(checkpoints: list[str], **options) -> Path:
    """Sample through a cascade of checkpoints (base, then super-resolution stages) into a PNG grid
    (the ``sample-cascade`` command's work); ``stage_grids`` also writes each stage's grid as OUT-stageK.png."""
    import torch

    from .cascade import sample_cascade
    from .checkpoint import load_for_sampling
    from .images import save_grid

    o = _with_defaults(options, CASCADE_DEFAULTS, "sample-cascade")
    if not checkpoints:
        raise ValueError("sample-cascade needs --checkpoints BASE SR1 [SR2 ...]")
    if o["num_images"] < 1:
        raise ValueError(f"num_images must be >= 1, got {o['num_images']}")
    device = _resolve_device(o["device"])
    loaded = [load_for_sampling(path, device=device) for path in checkpoints]
    n_cls = next((m.null_class_label for m, _ in loaded if m.null_class_label is not None), None)
    labels = None
    if n_cls is not None:
        if o["class_labels"] in (None, "cycle"):
            labels = torch.arange(o["num_images"]) % n_cls
        else:
            values = _stage_list("class_labels", o["class_labels"], int)
            values = values if isinstance(values, list) else [values]
            if any(v is None or not 0 <= v < n_cls for v in values):
                raise ValueError(f"class labels must lie in [0, {n_cls - 1}], got {o['class_labels']!r}")
            labels = torch.tensor(values * -(-o["num_images"] // len(values)))[: o["num_images"]]
    elif o["class_labels"] not in (None, "cycle"):
        raise ValueError("class_labels given, but no stage of the cascade is class-conditional")
    outputs = sample_cascade(
        [m for m, _ in loaded],
        batch_size=o["num_images"],
        schedulers=_stage_list("schedulers", o["schedulers"], str),
        steps=_stage_list("steps", o["steps"], int),
        scheduler_configs=[c for _, c in loaded],
        scheduler_options=stage_scheduler_options(o["scheduler_option"], len(loaded)),
        class_labels=labels,
        guidance_scale=o["guidance_scale"],
        aug_level=_stage_list("aug_level", o["aug_level"], int),
        generator=torch.Generator(device=device).manual_seed(o["seed"]),
        chunk_size=o["chunk_size"],
        return_all=True,
        device=device,
        progress=True,
    )
    out = Path(o["out"])
    if o["stage_grids"]:
        for k, images in enumerate(outputs[:-1]):
            scale = o["scale"] * (outputs[-1].shape[-1] // images.shape[-1])  # as large as the final grid
            save_grid(images, out.with_name(f"{out.stem}-stage{k}{out.suffix}"), nrow=o["nrow"], scale=scale)
    return save_grid(outputs[-1], out, nrow=o["nrow"], scale=o["scale"])


def _sample_cascade(args: argparse.Namespace) -> int:
    options = _options(args, "checkpoints")
    return _write(lambda: sample_cascade_grid(args.checkpoints, **options))


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(**_options(args))
    return 0 if result.passed else 1


def _eval(args: argparse.Namespace) -> int:
    from .eval_shards import ShardError
    from .evaluation import evaluate
    from .fid_stats import StatsError

    options = _options(args, "weights", "scheduler_option")
    weights = ["ema", "raw"] if args.weights == "both" else [args.weights]
    if args.weights == "both" and options.get("out") is not None:
        return _error("--weights both writes one directory per weights: leave --out unset")
    try:
        options["scheduler_options"] = scheduler_options(args.scheduler_option or (), None)
        for w in weights:
            evaluate(weights=w, **options)
    except (ValueError, FileNotFoundError, ShardError, StatsError) as e:
        return _error(e)
    return 0


def _fid_stats(args: argparse.Namespace) -> int:
    from .fid_stats import dataset_statistics, save_stats

    try:
        mu, sigma, info = dataset_statistics(
            args.dataset,
            data_dir=args.data_dir,
            image_size=args.image_size,
            split=args.split,
            metric=args.metric,
            inception_weights=args.inception_weights,
            batch_size=args.batch_size,
            device=args.device,
            progress=args.progress,
        )
        path = save_stats(args.out, mu, sigma, num_images=info["num_images"])
    except (ValueError, FileNotFoundError) as e:
        return _error(e)
    print(f"wrote {path}: mu {tuple(mu.shape)}, sigma {tuple(sigma.shape)} from {info['num_images']} images")
    return 0


def _merge_config(args: argparse.Namespace, table: str) -> dict:
    """Options from --config (TOML), overridden by the flags actually given."""
    import tomllib

    options: dict = {}
    if args.config is not None:
        try:
            with open(args.config, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SystemExit(f"error: cannot read config file {args.config}: {e}") from e
        data = data.get(table, data)
        # sub-tables are other commands' options, except the table of sampler options
        data = {k.replace("-", "_"): v for k, v in data.items()}
        options.update({k: v for k, v in data.items() if not isinstance(v, dict) or k.endswith("scheduler_options")})
    options.update(_options(args, "config"))
    return options


def _add_progress_flag(parser: argparse.ArgumentParser, help_text: str = "progress bar (default: on)") -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help=help_text)


def _add_inception_weights_flag(parser: argparse.ArgumentParser) -> None:
    from .inception import INCEPTION_ENV, INCEPTION_FILE

    parser.add_argument(
        "--inception-weights", default=None, help=f"pytorch-fid's {INCEPTION_FILE} (default: ${INCEPTION_ENV})"
    )


def _add_train_parser(sub) -> None:
    import dataclasses
    import typing

    from .train import TrainConfig

    train = sub.add_parser(
        "train",
        help="train a DDPM U-Net, or with --task a noise-aware classifier or a super-resolution stage "
        "(torchrun --nproc_per_node=N -m ddpm_fast train ... for DDP)",
        description="Train a DDPM U-Net on a built-in dataset or an image folder. Every option can also be "
        "given in a TOML file (--config); flags override the file. Under torchrun the run is "
        "DistributedDataParallel (NCCL on GPUs, gloo on CPU); rank 0 writes checkpoints and logs.",
        argument_default=argparse.SUPPRESS,
    )
    train.add_argument(
        "--config", default=None, help="TOML file of options (keys as the flags; a [train] table or top level)"
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        hint = hints[f.name]
        if f.name == "resume":
            train.add_argument(flag, nargs="?", const="auto", help=help_text + "; bare --resume = 'auto'")
        elif f.name.endswith("_scheduler_options"):  # a table: one KEY=VALUE flag per option
            train.add_argument(flag.removesuffix("s"), action="append", metavar="KEY=VALUE", help=help_text)
        elif hint is bool:
            train.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif hint in (int, float, str):
            train.add_argument(flag, type=hint, help=help_text)
        else:  # Optional[x]
            inner = next(a for a in typing.get_args(hint) if a is not type(None))
            train.add_argument(flag, type=inner, help=help_text)
    train.set_defaults(func=_train)


def _add_sample_parser(sub) -> None:
    from .solvers.registry import SCHEDULER_NAMES

    sample = sub.add_parser(
        "sample",
        help="sample images from a checkpoint into a PNG grid",
        description="Sample from the EMA weights of a checkpoint (a run directory follows checkpoints/latest) "
        "and write a PNG grid. Options can also come from a TOML file (--config).",
        argument_default=argparse.SUPPRESS,
    )
    sample.add_argument("--config", default=None, help="TOML file of options (a [sample] table or top level)")
    sample.add_argument("--checkpoint", help="run directory, checkpoints directory or step_XXXXXXXX directory")
    sample.add_argument("--out", help="output PNG (default: samples.png)")
    sample.add_argument("--num-images", type=int, help="number of images (default: 64)")
    sample.add_argument(
        "--steps",
        type=int,
        help="sampler timesteps (default: 50 for ddim, euler, euler_ancestral; 20 for dpmsolver++, unipc; 25 for "
        "heun; all T for ddpm and pc)",
    )
    sample.add_argument("--scheduler", choices=SCHEDULER_NAMES, help="sampler (default: ddim)")
    sample.add_argument(
        "--scheduler-option",
        action="append",
        metavar="KEY=VALUE",
        help="a sampler option under diffusers' name, repeatable: e.g. solver_order=3, use_karras_sigmas=true "
        "(dpmsolver++), timestep_spacing=trailing (ddim); in a --config file, a scheduler_options table. The "
        "noise schedule is the checkpoint's and cannot be set here",
    )
    sample.add_argument("--eta", type=float, help="DDIM eta: 0 deterministic, 1 DDPM-like noise (default: 0)")
    sample.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default: none)")
    sample.add_argument(
        "--classifier",
        help="classifier guidance: a noise-aware classifier (a run of `ddpm-fast train --task classifier`, or a "
        "Classifier.save directory); labels as --class-labels, over its classes",
    )
    sample.add_argument("--classifier-scale", type=float, help="classifier guidance scale s (default: 1)")
    sample.add_argument(
        "--class-labels",
        help="class-conditional models: comma-separated labels, or 'cycle' for 0, 1, ... (default: cycle)",
    )
    sample.add_argument("--seed", type=int, help="seed of the sampling noise (default: 0)")
    sample.add_argument("--chunk-size", type=int, help="images per forward pass (default: all)")
    sample.add_argument("--nrow", type=int, help="images per grid row (default: sqrt of the number)")
    sample.add_argument("--scale", type=int, help="repeat each pixel this many times in the PNG (default: 1)")
    sample.add_argument("--noise", choices=("kernel", "torch"), help="in-kernel or torch noise (default: kernel)")
    sample.add_argument("--device", help="cpu, cuda or auto (default: auto)")
    sample.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        help="the model's autocast dtype (default: auto, bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, "
        "else float32; float32 gives the exact fp32 images)",
    )
    sample.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    sample.add_argument(
        "--autoencoder",
        help="latent checkpoints: decode with this local diffusers autoencoder folder (default: the one recorded "
        "in the checkpoint; its weights must be the same)",
    )
    sample.set_defaults(func=_sample)


def _add_sample_cascade_parser(sub) -> None:
    d = CASCADE_DEFAULTS
    sc = sub.add_parser(
        "sample-cascade",
        help="sample through a cascade: a base checkpoint, then super-resolution checkpoints (--task superres)",
        description="Sample from the base checkpoint, then from each super-resolution checkpoint conditioned on the "
        "previous stage's output (EMA weights, each stage with its own scheduler and steps), and write the last "
        "stage's PNG grid. Per-stage options take comma-separated values, one per stage (or one for all).",
    )
    sc.add_argument("--checkpoints", nargs="+", required=True, help="BASE SR1 [SR2 ...]: run or step directories")
    sc.add_argument("--out", default=d["out"], help=f"output PNG (default: {d['out']})")
    sc.add_argument("--num-images", type=int, default=d["num_images"], help=f"images (default: {d['num_images']})")
    sc.add_argument(
        "--schedulers", default=d["schedulers"], help="sampler per stage, e.g. ddim,dpmsolver++ (default: ddim)"
    )
    sc.add_argument("--steps", default=d["steps"], help="steps per stage, e.g. 50,20 (default: each sampler's)")
    sc.add_argument(
        "--scheduler-option",
        action="append",
        default=[],
        metavar="[STAGE:]KEY=VALUE",
        help="a sampler option under diffusers' name, repeatable, as in `ddpm-fast sample`: for every stage, or "
        "with a stage number for that stage only (e.g. 1:solver_order=3; a stage's own value wins)",
    )
    sc.add_argument(
        "--aug-level",
        default=d["aug_level"],
        help="conditioning-augmentation level (a timestep) per super-resolution stage trained with it (default: 0)",
    )
    sc.add_argument("--guidance-scale", type=float, default=d["guidance_scale"], help="classifier-free guidance")
    sc.add_argument("--class-labels", default=d["class_labels"], help="comma-separated labels or 'cycle' (default)")
    sc.add_argument("--seed", type=int, default=d["seed"], help="seed of every stage's noise (default: 0)")
    sc.add_argument("--chunk-size", type=int, default=d["chunk_size"], help="images per forward pass")
    sc.add_argument("--nrow", type=int, default=d["nrow"], help="images per grid row (default: sqrt of the number)")
    sc.add_argument("--scale", type=int, default=d["scale"], help="repeat each pixel this many times (default: 1)")
    sc.add_argument("--device", default=d["device"], help="cpu, cuda or auto (default: auto)")
    sc.add_argument("--stage-grids", action="store_true", help="also write each earlier stage's grid (OUT-stageK.png)")
    sc.set_defaults(func=_sample_cascade)


def _add_demo_parser(sub) -> None:
    from .demo import DEMO_DEFAULTS

    demo = sub.add_parser(
        "demo",
        help="train the tiny U-Net on digits (~minutes on 2 CPU cores) and score its samples",
        description="Train the tiny U-Net on the built-in digits, write a sample grid, and print a classifier "
        "FID (and class accuracy when conditional) of the samples beside those of the untrained model and of "
        "held-out real digits. Exit status 1 when the trained samples miss the threshold.",
    )
    d = DEMO_DEFAULTS
    demo.add_argument("--out", default=d["out"], help=f"run directory (default: {d['out']})")
    demo.add_argument("--steps", type=int, default=d["steps"], help=f"training steps (default: {d['steps']})")
    demo.add_argument(
        "--batch-size", type=int, default=d["batch_size"], help=f"batch size (default: {d['batch_size']})"
    )
    demo.add_argument("--lr", type=float, default=d["lr"], help=f"learning rate (default: {d['lr']})")
    demo.add_argument(
        "--warmup-steps", type=int, default=d["warmup_steps"], help=f"warm-up steps (default: {d['warmup_steps']})"
    )
    demo.add_argument(
        "--time-limit",
        type=float,
        default=d["time_limit"],
        help=f"stop training after this many seconds even before --steps (default: {d['time_limit']})",
    )
    demo.add_argument(
        "--guidance-scale",
        type=float,
        default=d["guidance_scale"],
        help="classifier-free guidance scale of the conditional samples (default: none)",
    )
    demo.add_argument(
        "--conditional",
        action=argparse.BooleanOptionalAction,
        default=d["conditional"],
        help="class-conditional on the digit labels (default: on)",
    )
    demo.add_argument(
        "--num-images", type=int, default=d["num_images"], help=f"samples scored (default: {d['num_images']})"
    )
    demo.add_argument(
        "--sample-steps", type=int, default=d["sample_steps"], help=f"DDIM steps (default: {d['sample_steps']})"
    )
    demo.add_argument(
        "--threshold",
        type=float,
        default=d["threshold"],
        help="pass when the trained samples' classifier FID is below this fraction of the untrained model's "
        f"(default: {d['threshold']})",
    )
    demo.add_argument("--seed", type=int, default=d["seed"], help=f"seed (default: {d['seed']})")
    _add_progress_flag(demo, "show progress bars (default: on)")
    demo.set_defaults(func=_demo)


def _add_eval_parser(sub) -> None:
    from .evaluation import METRICS
    from .solvers.registry import SCHEDULER_NAMES

    ev = sub.add_parser(
        "eval",
        help="FID / Inception Score / classifier FID of a checkpoint's samples (sharded, resumable)",
        description="Sample num-samples images from a checkpoint and score them: Inception FID against "
        "--ref-stats (+ Inception Score), the Inception Score alone, or the digits/shapes classifier FID. Image i "
        "comes from (seed, i) alone, so the result does not depend on --batch-size's split over processes; under "
        "torchrun --nproc_per_node=N the work is shared. Progress is flushed to OUT/shards/: rerun the same command "
        "to continue a killed run. Writes OUT/result.json (every setting) and OUT/samples.npz (pytorch-fid format).",
    )
    ev.add_argument("--checkpoint", required=True, help="run directory, step_XXXXXXXX directory or pipeline folder")
    ev.add_argument("--num-samples", type=int, default=50_000, help="images to sample (default: 50000)")
    ev.add_argument(
        "--scheduler", choices=SCHEDULER_NAMES, default="dpmsolver++", help="sampler (default: dpmsolver++)"
    )
    ev.add_argument(
        "--scheduler-option",
        action="append",
        metavar="KEY=VALUE",
        help="a sampler option under diffusers' name, repeatable (as in `ddpm-fast sample`); given options join "
        "the settings and the default output directory's name",
    )
    ev.add_argument("--steps", type=int, default=20, help="sampler steps (default: 20)")
    ev.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: 0)")
    ev.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: none)")
    ev.add_argument(
        "--metric",
        choices=METRICS,
        default="fid",
        help="fid: Inception FID against --ref-stats, plus the Inception Score; is: the Inception Score alone; "
        "classifier_fid: the built-in dataset's classifier (no file needed; default reference: the held-out "
        "split) (default: fid)",
    )
    ev.add_argument("--ref-stats", default=None, help="reference statistics npz (mu, sigma): ddpm-fast fid-stats")
    _add_inception_weights_flag(ev)
    ev.add_argument("--batch-size", type=int, default=256, help="images per sampling batch (default: 256)")
    ev.add_argument("--out", default=None, help="output directory (default: RUN/eval/<settings>)")
    ev.add_argument(
        "--weights", choices=("ema", "raw", "both"), default="ema", help="EMA or raw weights, or both (default: ema)"
    )
    ev.add_argument("--seed", type=int, default=0, help="image i's noise comes from (seed, i) (default: 0)")
    ev.add_argument("--save-images", action="store_true", help="also write every image as OUT/images/NNNNNN.png")
    ev.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (default: 10)")
    ev.add_argument("--dataset", default=None, help="dataset of the classifier FID and --nll (default: the run's)")
    ev.add_argument("--nll", action="store_true", help="also the bits/dim of the dataset's held-out split")
    ev.add_argument("--nll-t-stride", type=int, default=1, help="--nll: every s-th KL term (default: 1, all)")
    ev.add_argument("--nll-num-images", type=int, default=None, help="--nll: the first N images (default: all)")
    ev.add_argument("--nll-batch-size", type=int, default=None, help="--nll: images per batch (default: --batch-size)")
    ev.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    ev.add_argument(
        "--flush-every-s", type=float, default=60.0, help="seconds between shard flushes per process (default: 60)"
    )
    _add_progress_flag(ev)
    ev.set_defaults(func=_eval)


def _add_fid_stats_parser(sub) -> None:
    fs = sub.add_parser(
        "fid-stats",
        help="reference FID statistics (pytorch-fid's npz: mu, sigma) of a dataset or image folder",
        description="Features of every image of a built-in dataset or an image folder (quantised to 8 bits, as "
        "evaluated samples are), written as pytorch-fid's npz (mu, sigma), which pytorch-fid and clean-fid read.",
    )
    fs.add_argument("--dataset", required=True, help="digits, shapes or folder")
    fs.add_argument("--data-dir", default=None, help="the image folder for --dataset folder")
    fs.add_argument("--image-size", type=int, default=None, help="image side (default: 16 for built-in datasets)")
    fs.add_argument("--split", default=None, help="train, test or all (default: test; a folder: every image)")
    fs.add_argument(
        "--metric",
        choices=("fid", "classifier_fid"),
        default="fid",
        help="Inception pool3 (fid) or the built-in dataset's classifier features (default: fid)",
    )
    _add_inception_weights_flag(fs)
    fs.add_argument("--batch-size", type=int, default=100, help="images per batch (default: 100)")
    fs.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    fs.add_argument("--out", required=True, help="the npz to write")
    _add_progress_flag(fs)
    fs.set_defaults(func=_fid_stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddpm-fast", description="Fast DDPM/DDIM kernels and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="print the backends and compare each with the reference")
    check.add_argument("--tolerance", type=float, default=1e-4, help="max relative error allowed (default 1e-4)")
    check.set_defaults(func=_check)
    bench = sub.add_parser(
        "bench",
        help="run the benchmark suite (pytest benchmarks/ --benchmark-only), or --headline",
        description="Without options: pytest benchmarks/ --benchmark-only (extra arguments go to pytest). "
        "--headline: one command, one table: sample() and training against diffusers, the U-Net's TFLOP/s, "
        "the kernels against eager/compiled torch; full sizes on a GPU (<= 8 min), small ones on the CPU.",
    )
    bench.add_argument(
        "--aot", action="store_true", help="instead, compile every Triton kernel for sm_90/sm_80 and report resources"
    )
    bench.add_argument(
        "--headline",
        action="store_true",
        help="instead, run the headline benchmark and write benchmarks/results/<device>-<date>-headline.json",
    )
    bench.add_argument("--out", default=None, help="--headline: write the JSON here instead")
    bench.add_argument("--device", default=None, help="--headline: auto (default), cpu or cuda")
    bench.add_argument(
        "--sizes", default=None, choices=("auto", "full", "small"), help="--headline: auto = full on CUDA, small on CPU"
    )
    bench.add_argument("--only", default=None, help="--headline: comma-separated sections of sample,train,unet,kernels")
    bench.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="--headline: skip (and list) items that no longer fit this many seconds (default: 420 on CUDA, no limit)",
    )
    bench.add_argument(
        "--threads", type=int, default=None, help="--headline: torch CPU threads (default: 1 at the small sizes)"
    )
    bench.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--headline: torch.compile on or off (default: on for the full sizes, off for the small)",
    )
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra arguments passed to pytest")
    bench.set_defaults(func=_bench)
    _add_train_parser(sub)
    _add_sample_parser(sub)
    _add_sample_cascade_parser(sub)
    _add_demo_parser(sub)
    _add_eval_parser(sub)
    _add_fid_stats_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "bench":  # the headline JSON records the command line
        args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
