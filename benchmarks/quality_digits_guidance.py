"""Classifier guidance on the digits (issue 20's figure): class accuracy and classifier FID of samples
from an UNCONDITIONAL diffusion model guided by a noise-aware classifier, per guidance scale.

Not a pytest benchmark: a script. On the CPU it
1. trains the demo's tiny U-Net on the 16x16 digits, unconditional (``class_conditional=False``;
   otherwise the demo's settings), for ``--diffusion-seconds`` (or loads ``--diffusion``);
2. trains the tiny noise-aware classifier (``ddpm-fast train --task classifier``, same schedule) on
   noised digits for ``--classifier-seconds`` (or loads ``--classifier``), and measures its accuracy on
   the held-out digits noised to a few timesteps;
3. samples 200 images (labels ``arange(200) % 10``, seed 0, DDIM 50 steps) at each classifier scale
   (0 = unguided) and scores them with ``ddpm_fast.metrics``' digits classifier (an independent one,
   trained on clean digits): class accuracy against the requested labels (chance: 10%) and the
   classifier FID against the held-out digits.

    python benchmarks/quality_digits_guidance.py                 # train both, then sample
    python benchmarks/quality_digits_guidance.py --diffusion RUN --classifier RUN

Writes ``benchmarks/results/cpu-<date>-digits-guidance.json`` (``--json``): per scale its accuracy,
FID and seconds; the training runs, the classifier's noised accuracy, the machine (CPU, load
averages at start and end), torch version and git commit.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

import torch
from quality_common import digits_metric, git_state, results_path, run_training, sample_digits, write_json

import ddpm_fast
from ddpm_fast import checkpoint as ckpt
from ddpm_fast.classifier import Classifier
from ddpm_fast.demo import IMAGE_SIZE, demo_train_config
from ddpm_fast.headline.measure import cpu_model
from ddpm_fast.metrics import class_accuracy, classifier_fid
from ddpm_fast.schedule import Schedule
from ddpm_fast.train import Trainer
from ddpm_fast.train_classifier import ClassifierTrainer, noised_accuracy

SCALES = (0.0, 1.0, 3.0, 10.0)
NUM_IMAGES, STEPS, SEED = 200, 50, 0


def train(trainer_cls, out: str, seconds: float, **fields) -> dict:
    """Trains the demo's run (``fields`` added, no progress bar) for ``seconds``; what the report says of it."""
    config = demo_train_config(out, time_limit=seconds, progress=False, **fields)
    result, _, seconds = run_training(config, trainer_cls)
    return {
        "steps": result.step,
        "seconds": round(seconds, 1),
        "last_loss": result.last_loss,
        "run": str(config.out),
        "config": {k: v for k, v in config.to_dict().items() if k not in ("out", "progress", "resume")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffusion", help="a trained unconditional run; default: train one")
    parser.add_argument("--classifier", help="a trained classifier run; default: train one")
    parser.add_argument("--diffusion-seconds", type=float, default=300.0)
    parser.add_argument("--classifier-seconds", type=float, default=140.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 cores are shared)")
    parser.add_argument("--out", default="/tmp/ddpm_digits_guidance", help="where the runs go when training")
    parser.add_argument("--num-images", type=int, default=NUM_IMAGES, help="(smaller: a smoke test)")
    parser.add_argument("--steps", type=int, default=STEPS, help="DDIM steps (fewer: a smoke test)")
    parser.add_argument("--json", default=results_path("digits-guidance"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # on a shared 2-core machine 2 threads per process oversubscribe it
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    commit, dirty = git_state()

    metric, test_x, test_y = digits_metric(IMAGE_SIZE, SEED)
    print(f"digits metric classifier: {metric.heldout_accuracy:.1%} held-out accuracy", flush=True)

    runs = {}
    if args.diffusion is None:
        args.diffusion = f"{args.out}/diffusion"
        runs["diffusion"] = train(Trainer, args.diffusion, args.diffusion_seconds, class_conditional=False)
        print(f"diffusion: {runs['diffusion']}", flush=True)
    if args.classifier is None:
        args.classifier = f"{args.out}/classifier"
        runs["classifier"] = train(
            ClassifierTrainer, args.classifier, args.classifier_seconds, task="classifier", batch_size=64, steps=20000
        )
        print(f"classifier: {runs['classifier']}", flush=True)

    model, scheduler_config = ckpt.load_for_sampling(args.diffusion)
    clf = Classifier.load(args.classifier)
    schedule = Schedule.from_config(scheduler_config)
    noised = noised_accuracy(clf, test_x, test_y, schedule, [0, 100, 250, 500, 750, 900], seed=SEED)
    print(f"noise-aware classifier accuracy on held-out digits by t: {noised}", flush=True)

    n, steps = args.num_images, args.steps
    labels = torch.arange(n) % 10
    rows = []
    for scale in SCALES:
        start = time.perf_counter()
        images = sample_digits(
            model, n, steps, scheduler_config, labels, SEED, classifier=clf, classifier_scale=scale, dtype=torch.float32
        )
        seconds = time.perf_counter() - start
        row = {
            "classifier_scale": scale,
            "class_accuracy": class_accuracy(metric, images, labels),
            "classifier_fid": classifier_fid(metric, images, test_x),
            "seconds": round(seconds, 1),
        }
        rows.append(row)
        print(row, flush=True)
        from ddpm_fast.images import save_grid

        save_grid(images[:100], Path(args.out) / f"samples_scale{scale:g}.png", nrow=10, scale=4)

    pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(SEED))[:n]
    result = {
        "what": "classifier guidance (Dhariwal & Nichol 2021) of the unconditional tiny digits U-Net by a noise-aware "
        f"tiny classifier: {n} images, labels arange(n) % 10, seed {SEED}, DDIM {steps} steps (clip_sample), "
        "fp32; accuracy and FID by ddpm_fast.metrics' digits classifier (trained on clean digits) against the "
        "held-out digits. Chance accuracy: 10%.",
        "date": datetime.date.today().isoformat(),
        "device": "cpu",
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "machine_note": "2 cores shared with two other engineers' builds, tests and benchmarks while this ran "
        "(load averages above); one torch thread",
        "torch": torch.__version__,
        "ddpm_fast": ddpm_fast.__version__,
        "git_commit": os.environ.get("DDPM_FAST_COMMIT", commit),
        "git_dirty_ddpm_fast": bool(dirty),
        "metric_classifier_heldout_accuracy": metric.heldout_accuracy,
        f"real_heldout_fid_{n}": classifier_fid(metric, test_x[pick], test_x),
        "training": runs,
        "diffusion_run": args.diffusion,
        "classifier_run": args.classifier,
        "noise_aware_classifier_heldout_accuracy_by_t": noised,
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - t_all, 1),
    }
    write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
