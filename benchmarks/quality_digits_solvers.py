"""Sample quality of the fast solvers on the demo's digits model (issue 17's quality figure).

Not a pytest benchmark: a script. It trains the model of ``ddpm-fast demo`` once with the demo's
default settings (``DEMO_DEFAULTS``: tiny U-Net, class-conditional, 16x16 digits, 2000 steps or
420 s, whichever comes first), or loads it with ``--checkpoint``, then draws the demo's number of
images (200, labels ``arange(n) % 10``, no guidance, the demo's seed for every sampler) with each
sampler and scores them with the demo's classifier FID (``ddpm_fast.metrics.classifier_fid``
against the held-out digits). DDIM-50 is the reference the solvers are compared with.

    python benchmarks/quality_digits_solvers.py                      # train, then sample
    python benchmarks/quality_digits_solvers.py --checkpoint RUN_DIR  # reuse a trained run

Writes ``benchmarks/results/cpu-<date>-digits-solvers.json`` (``--json`` to change it): per
sampler its name, steps, model calls (forward passes counted with a hook), FID, class accuracy and
wall seconds; the machine, torch version, git commit and the training settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import torch
from quality_common import RESULTS, digits_metric, git_state, run_training, sample_digits, write_json

import ddpm_fast
from ddpm_fast import checkpoint as ckpt
from ddpm_fast.data import make_dataset
from ddpm_fast.demo import DEMO_DEFAULTS, IMAGE_SIZE, demo_train_config
from ddpm_fast.headline.measure import cpu_model
from ddpm_fast.metrics import class_accuracy, classifier_fid

DEFAULT_JSON = RESULTS / "cpu-2026-12-04-digits-solvers.json"
# (scheduler, steps): the reference first, then the solvers of issue 17, then the others.
SAMPLERS = [
    ("ddim", 50),
    ("ddim", DEMO_DEFAULTS["sample_steps"]),  # the demo's own setting, for context
    ("dpmsolver++", 10),
    ("dpmsolver++", 20),
    ("unipc", 10),
    ("unipc", 20),
    ("euler", 20),
    ("euler_ancestral", 20),
    ("heun", 20),
    # fairness rows: DDIM without its x0 clip (the solvers do not clip), and the SDE solver
    ("ddim", 50, {"clip_sample": False}),
    ("dpmsolver++", 20, {"algorithm_type": "sde-dpmsolver++"}),
]
REFERENCE = ("ddim", 50)
COMPARED = [("dpmsolver++", 10), ("dpmsolver++", 20), ("unipc", 10), ("unipc", 20)]


def with_options(config, name: str, options: dict):
    """The checkpoint's config with a row's options: DDPM/DDIM fields replaced, or for a solver a
    diffusers-style dict of the schedule, the prediction type and the options."""
    if not options:
        return config
    if name in ("ddpm", "ddim"):
        return dataclasses.replace(config, **options)
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    return {**{k: v for k, v in config.to_dict().items() if k in keep}, **options}


def train_model(out: str) -> tuple[Path, float]:
    """``run_demo``'s training run with its default options."""
    result, _, seconds = run_training(demo_train_config(out, class_conditional=DEMO_DEFAULTS["conditional"]))
    return result.last_checkpoint, seconds


def count_calls(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]

    def hook(module, args, kwargs):
        calls[0] += 1

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a trained run (run, checkpoints or step directory); default: train one")
    parser.add_argument("--out", default="/tmp/ddpm_quality_digits", help="run directory when training")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    args = parser.parse_args()
    seed, n = DEMO_DEFAULTS["seed"], DEMO_DEFAULTS["num_images"]
    t_all = time.perf_counter()
    commit, dirty = git_state()

    classifier, test_x, _ = digits_metric(IMAGE_SIZE, seed)
    train_x, train_y = make_dataset("digits", image_size=IMAGE_SIZE, split="train").tensors()
    pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:n]
    fid_real = classifier_fid(classifier, train_x[pick], test_x)
    print(f"digits classifier: {classifier.heldout_accuracy:.1%} held-out accuracy; real-digit FID {fid_real:.3f}")

    train_seconds = None
    if args.checkpoint is None:
        path, train_seconds = train_model(args.out)
        print(f"trained in {train_seconds:.0f} s -> {path}")
    else:
        path = Path(args.checkpoint)
    loaded = ckpt.load_checkpoint(path, training_state=False, weights=False)
    model, scheduler_config = ckpt.load_for_sampling(loaded.path)
    conditional = bool(loaded.train_config.get("class_conditional"))
    labels = torch.arange(n) % 10 if conditional else None

    rows = []
    calls, handle = count_calls(model)
    try:
        for name, steps, *extra in SAMPLERS:
            options = extra[0] if extra else {}
            config = with_options(scheduler_config, name, options)
            calls[0] = 0
            start = time.perf_counter()
            images = sample_digits(model, n, steps, config, labels, seed, scheduler=name)
            wall = time.perf_counter() - start
            row = {
                "name": name,
                "steps": steps,
                "options": options,
                "model_calls": calls[0],
                "fid": classifier_fid(classifier, images, test_x),
                "class_accuracy": class_accuracy(classifier, images, labels) if labels is not None else None,
                "wall_seconds": wall,
            }
            rows.append(row)
            print(f"  {name:<16} {steps:>3} steps  {row['model_calls']:>3} calls  FID {row['fid']:8.3f}  {wall:6.2f} s")
    finally:
        handle.remove()

    by_key = {(r["name"], r["steps"]): r for r in rows if not r["options"]}  # the fairness rows stay apart
    ref = by_key[REFERENCE]["fid"]
    comparison = {
        f"{name}-{steps}": {"fid": by_key[(name, steps)]["fid"], "at_most_ddim50": by_key[(name, steps)]["fid"] <= ref}
        for name, steps in COMPARED
    }
    for key, c in comparison.items():
        verdict = "<=" if c["at_most_ddim50"] else ">"
        print(f"{key}: FID {c['fid']:.3f} {verdict} DDIM-50 {ref:.3f}")

    report = {
        "what": "classifier FID (demo metric, ddpm_fast.metrics.classifier_fid) of samplers on the demo's digits model",
        "samplers": rows,
        "reference": {"name": REFERENCE[0], "steps": REFERENCE[1], "fid": ref},
        "compared_with_reference": comparison,
        "fid_real_digits": fid_real,
        "classifier_heldout_accuracy": classifier.heldout_accuracy,
        "sampling": {
            "num_images": n,
            "seed": seed,
            "class_labels": "arange(n) % 10" if conditional else None,
            "guidance_scale": None,
            "fid_against": f"{len(test_x)} held-out digits (test split)",
            "dtype": "autocast default of sample()",
        },
        "training": {
            "checkpoint": str(loaded.path),
            "trained_here": args.checkpoint is None,
            "train_seconds": train_seconds,
            "steps_done": loaded.step,
            "config": loaded.train_config,
            "scheduler_config": loaded.scheduler_config,
        },
        "machine": {
            "cpu": cpu_model(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "ddpm_fast": getattr(ddpm_fast, "__version__", None),
        "git_commit": commit,
        "ddpm_fast_uncommitted_changes": dirty.splitlines() if dirty else [],
        "total_seconds": time.perf_counter() - t_all,
    }
    print(f"wrote {write_json(args.json, report)}")


if __name__ == "__main__":
    main()
