"""Issue 18's CPU figure: ``ddpm_fast.evaluate`` of 10,000 digits samples + classifier FID on the CPU
(target: <= 3 minutes on 2 cores).

Not a pytest benchmark: a script. The model is the demo's (tiny U-Net, class-conditional, 16x16
digits): ``--checkpoint`` reuses a trained run, else the demo's training config runs for
``--train-steps`` steps (the speed does not depend on how long it trained; the FID does). Then one
``evaluate()`` call, timed end to end: the digits classifier is trained into a fresh cache (its
few seconds are in the figure), the held-out split's statistics, 10,000 samples with DPM-Solver++
(per-image generators), their features, the FID. The load average before and after is recorded:
the machine may be shared.

    python benchmarks/eval_digits_speed.py [--checkpoint RUN] [--steps 10] [--num-samples 10000]

Writes ``benchmarks/results/cpu-<date>-eval.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import ddpm_fast
from ddpm_fast.headline.measure import cpu_model, git_commit

ROOT = Path(__file__).resolve().parents[1]


def train_demo_model(out: Path, steps: int) -> tuple[Path, float, dict]:
    from ddpm_fast.demo import DEMO_DEFAULTS, IMAGE_SIZE
    from ddpm_fast.train import TrainConfig, train

    o = DEMO_DEFAULTS
    config = TrainConfig(
        dataset="digits", image_size=IMAGE_SIZE, preset="tiny", class_conditional=o["conditional"], steps=steps,
        batch_size=o["batch_size"], lr=o["lr"], warmup_steps=o["warmup_steps"], ema_decay=0.999, seed=o["seed"],
        out=str(out), checkpoint_every=0, keep_checkpoints=1, sample_images=0, log_every=50, progress=False,
        device="cpu",
    )  # fmt: skip
    start = time.perf_counter()
    result = train(config)
    return result.last_checkpoint, time.perf_counter() - start, dataclasses.asdict(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a trained demo run; default: train one for --train-steps")
    parser.add_argument("--train-steps", type=int, default=300, help="training steps when no checkpoint is given")
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--scheduler", default="dpmsolver++")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--json", default=None, help="default: benchmarks/results/cpu-<date>-eval.json")
    args = parser.parse_args()

    commit = git_commit(ROOT)
    work = Path(tempfile.mkdtemp(prefix="ddpm_eval_bench_"))
    record: dict = {"git_commit": commit["commit"], "git_dirty_tree": commit["dirty"]}
    if args.checkpoint is None:
        checkpoint, train_s, train_config = train_demo_model(work / "run", args.train_steps)
        record["training"] = {"steps": args.train_steps, "seconds": train_s, "config": train_config}
    else:
        checkpoint = Path(args.checkpoint)
        record["training"] = {"checkpoint": str(checkpoint)}

    os.environ["DDPM_FAST_CACHE_DIR"] = str(work / "cache")  # the classifier's training is in the figure
    load_before = os.getloadavg()
    start = time.perf_counter()
    result = ddpm_fast.evaluate(
        checkpoint, num_samples=args.num_samples, scheduler=args.scheduler, steps=args.steps,
        metric="classifier_fid", batch_size=args.batch_size, out=work / "eval", progress=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    load_after = os.getloadavg()

    record.update(
        {
            "what": f"ddpm_fast.evaluate: {args.num_samples} digits samples (tiny U-Net, 16x16, class-conditional) "
            f"with {args.scheduler}-{args.steps}, classifier features, classifier FID vs the held-out split; "
            "wall time of the one call (classifier training into a fresh cache included)",
            "target_seconds": 180,
            "wall_seconds": wall,
            "within_target": wall <= 180,
            "sample_and_features_seconds": result["sample_seconds"],
            "images_per_s": result["images_per_s"],
            "classifier_fid": result["classifier_fid"],
            "classifier_is": result["classifier_is"],
            "result": result,
            "machine": {
                "cpu": cpu_model(),
                "cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "load_average_1_5_15_before": load_before,
                "load_average_1_5_15_after": load_after,
                "note": "a shared machine: load averages above the core count mean other jobs competed for the CPU",
            },
            "date": datetime.date.today().isoformat(),
        }
    )
    path = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / f"cpu-{record['date']}-eval.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(
        f"{args.num_samples} samples + classifier FID in {wall:.1f} s (target 180 s); "
        f"FID {result['classifier_fid']:.3f}; load {load_before[0]:.1f} -> {load_after[0]:.1f}; wrote {path}"
    )


if __name__ == "__main__":
    main()
