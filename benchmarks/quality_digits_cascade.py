"""A cascade on the demo's digits (issue 20's cascade figure): 8x8 base + 8 -> 16 super-resolution.

Not a pytest benchmark: a script. With the demo's training settings (tiny U-Net, batch 32, lr 1e-3,
100 warm-up steps, EMA 0.999, seed 0) it trains

- the base: class-conditional, on the 8x8 digits (the raw scans);
- the super-resolution stage: ``--task superres --low-res 8`` on the 16x16 digits, unconditional,
  with conditioning augmentation (s ~ U{0..cond_noise_max});
- for comparison, the plain 16x16 demo model (class-conditional) for the base's and the stage's
  training time together;

then samples 200 images (labels arange(200) % 10, seed 0) through ``sample_cascade`` (base DDIM-25,
stage DDIM-10) at a few fixed augmentation levels, and from the plain model (DDIM-25), and reports
the 16x16 classifier FID against the held-out digits and the class accuracy (``ddpm_fast.metrics``),
beside the stage alone on the real held-out 8x8 digits (area-downsampled 16x16 ones) and the real
16x16 digits. Note: the 16x16 digits are bilinear upscales of the 8x8 scans, so the stage learns
an upsampling with little new detail; the figure shows the cascade's plumbing end to end at demo size.

    python benchmarks/quality_digits_cascade.py [--base-seconds 90] [--sr-seconds 150]

Writes ``benchmarks/results/cpu-<date>-digits-cascade.json`` (with the machine's load average).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from quality_common import digits_metric, git_state, results_path, run_training, sample_digits, write_json

from ddpm_fast import sample_cascade
from ddpm_fast.cascade import super_resolve
from ddpm_fast.demo import DEMO_DEFAULTS, demo_train_config
from ddpm_fast.images import save_grid
from ddpm_fast.metrics import class_accuracy, classifier_fid


def train_run(out: str, seconds: float, steps: int, **fields):
    """Trains the demo's run (``fields`` added, no progress bar); (the result, its scheduler config, seconds)."""
    config = demo_train_config(out, steps=steps, time_limit=seconds, progress=False, **fields)
    result, trainer, seconds = run_training(config)
    return result, trainer.scheduler_config, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-seconds", type=float, default=90.0, help="training time of the 8x8 base")
    parser.add_argument("--sr-seconds", type=float, default=150.0, help="training time of the 8 -> 16 stage")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per run at most")
    parser.add_argument("--cond-noise-max", type=int, default=200, help="the stage's augmentation levels 0..this")
    parser.add_argument("--aug-levels", default="0,100", help="fixed augmentation levels sampled")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain 16x16 model")
    parser.add_argument("--out", default="/tmp/ddpm_quality_cascade", help="run directories and grids")
    parser.add_argument("--json", default=results_path("digits-cascade"))
    args = parser.parse_args()
    seed, n = DEMO_DEFAULTS["seed"], DEMO_DEFAULTS["num_images"]
    levels = [int(v) for v in args.aug_levels.split(",")]
    commit, dirty = git_state()
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    out = Path(args.out)
    classifier, test_x, test_y = digits_metric(16, seed)
    labels = torch.arange(n) % 10

    def score(images: torch.Tensor, with_labels: torch.Tensor | None = labels) -> dict:
        images = images.clamp(-1, 1)
        row = {"fid": classifier_fid(classifier, images, test_x)}
        if with_labels is not None:
            row["class_accuracy"] = class_accuracy(classifier, images, with_labels)
        return row

    base, base_sched, base_s = train_run(
        str(out / "base"), args.base_seconds, args.steps, image_size=8, class_conditional=True
    )
    print(f"base 8x8: {base.step} steps in {base_s:.0f} s")
    sr, sr_sched, sr_s = train_run(
        str(out / "sr"),
        args.sr_seconds,
        args.steps,
        image_size=16,
        task="superres",
        low_res=8,
        cond_noise_max=args.cond_noise_max,
    )
    print(f"super-resolution 8 -> 16: {sr.step} steps in {sr_s:.0f} s")
    stages = [base.ema_model.eval(), sr.ema_model.eval()]

    rows = {}
    for level in levels:
        start = time.perf_counter()
        low, high = sample_cascade(
            stages,
            batch_size=n,
            schedulers="ddim",
            steps=[25, 10],
            scheduler_configs=[base_sched, sr_sched],
            class_labels=labels,
            aug_level=level,
            generator=torch.Generator().manual_seed(seed),
            return_all=True,
        )
        rows[f"cascade_aug{level}"] = {"aug_level": level, **score(high), "sample_seconds": time.perf_counter() - start}
        save_grid(high[:100].clamp(-1, 1), out / f"cascade_aug{level}.png", nrow=10, scale=4)
        print(f"cascade, aug level {level}: {rows[f'cascade_aug{level}']}")
    save_grid(low[:100].clamp(-1, 1), out / "base_8x8.png", nrow=10, scale=8)
    base_up = torch.nn.functional.interpolate(low.clamp(-1, 1), size=(16, 16), mode="bilinear", align_corners=False)
    rows["base_bilinear_upscale"] = score(base_up)  # the base's 8x8 samples upscaled as the 16x16 data were made

    real_low = torch.nn.functional.interpolate(test_x[:n], size=(8, 8), mode="area")
    real_sr = super_resolve(
        stages[1],
        real_low,
        aug_level=levels[0],
        scheduler="ddim",
        num_inference_steps=10,
        scheduler_config=sr_sched,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )
    rows["stage_on_real_8x8"] = {"aug_level": levels[0], **score(real_sr, test_y[:n])}

    plain_row = None
    if not args.no_plain:
        plain, plain_sched, plain_s = train_run(
            str(out / "plain16"), base_s + sr_s, args.steps, image_size=16, class_conditional=True
        )
        print(f"plain 16x16: {plain.step} steps in {plain_s:.0f} s")
        images = sample_digits(plain.ema_model.eval(), n, 25, plain_sched, labels, seed)
        plain_row = {"steps": plain.step, "train_seconds": plain_s, **score(images)}
        save_grid(images[:100].clamp(-1, 1), out / "plain16.png", nrow=10, scale=4)
    real = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(seed))[:n]
    report = {
        "what": "cascade on the demo's digits: 8x8 class-conditional base + 8 -> 16 super-resolution stage "
        "(conditioning augmentation), 16x16 classifier FID vs the held-out digits and class accuracy, beside the "
        "plain 16x16 demo model trained for the same total time",
        "training": {
            "base": {"image_size": 8, "steps": base.step, "train_seconds": base_s, "last_loss": base.last_loss},
            "superres": {
                "image_size": 16,
                "low_res": 8,
                "cond_noise_max": args.cond_noise_max,
                "steps": sr.step,
                "train_seconds": sr_s,
                "last_loss": sr.last_loss,
            },
            "settings": "demo's: tiny preset, batch 32, lr 1e-3, warm-up 100, EMA 0.999, seed 0, fp32 CPU",
        },
        "sampling": {
            "images": n,
            "labels": "arange(n) % 10",
            "base": "ddim 25",
            "superres": "ddim 10",
            "plain16": "ddim 25",
            "seed": seed,
        },
        "results": rows,
        "plain16": plain_row,
        "real_16x16": score(test_x[real], test_y[real]),
        "classifier_heldout_accuracy": classifier.heldout_accuracy,
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "note": "2-core machine shared with other sessions' jobs: training ran under a time limit, so the load "
            "sets how many steps each model got",
        },
        "git_commit": commit,
        "git_dirty_ddpm_fast": bool(dirty),
        "wall_seconds": time.perf_counter() - t_all,
        "command": f"python benchmarks/quality_digits_cascade.py --base-seconds {args.base_seconds} --sr-seconds "
        f"{args.sr_seconds} --steps {args.steps} --cond-noise-max {args.cond_noise_max} --aug-levels {args.aug_levels}"
        + (" --no-plain" if args.no_plain else ""),
    }
    write_json(args.json, report, indent=1)
    print(json.dumps({k: report[k] for k in ("results", "plain16", "real_16x16")}, indent=1))
    print(f"wrote {args.json} ({report['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
