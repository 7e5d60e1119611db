"""The hybrid loss on the demo's digits (issue 19's quality figure): bits/dim and sample quality.

Not a pytest benchmark: a script. It trains the demo's model (``ddpm-fast demo``: tiny U-Net,
class-conditional, 16x16 digits, batch 32, lr 1e-3, 100 warm-up steps, EMA 0.999, seed 0) twice for
the same number of steps, once with L_simple and fixed_small variance, once with the hybrid loss
(L_simple + 0.001 L_vlb) and learned_range variance, then for each EMA model reports:

- bits/dim of the held-out digits (``ddpm_fast.likelihood.bits_per_dim``, strided estimator, the
  discretized decoder; the digits, 17-level scans upscaled to 16x16, rounded to 8 bits first as
  ``ddpm-fast eval --nll`` does);
- the demo's classifier FID of 200 DDIM-50 samples (labels arange(200) % 10, seed 0) against the
  held-out digits, and their class accuracy.

    python benchmarks/quality_digits_hybrid.py [--steps 300] [--t-stride 20]

Writes ``benchmarks/results/cpu-<date>-digits-hybrid.json``.
"""

from __future__ import annotations

import argparse
import time

import torch
from quality_common import digits_metric, git_state, results_path, run_training, sample_digits, write_json

import ddpm_fast
from ddpm_fast.demo import DEMO_DEFAULTS, IMAGE_SIZE, demo_train_config
from ddpm_fast.evaluation import quantize_8bit
from ddpm_fast.likelihood import bits_per_dim
from ddpm_fast.metrics import class_accuracy, classifier_fid
from ddpm_fast.schedule import Schedule

RUNS = {
    "simple": dict(loss="simple", variance_type="fixed_small"),
    "hybrid": dict(loss="hybrid", variance_type="learned_range"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument(
        "--time-limit", type=float, default=0.0, help="seconds of training per run at most (0: none, the same steps)"
    )
    parser.add_argument("--t-stride", type=int, default=20, help="bits/dim: every s-th KL term (T = 1000)")
    parser.add_argument("--out", default="/tmp/ddpm_quality_hybrid", help="run directories")
    parser.add_argument("--json", default=results_path("digits-hybrid"))
    args = parser.parse_args()
    seed, n = DEMO_DEFAULTS["seed"], DEMO_DEFAULTS["num_images"]
    commit, dirty = git_state()
    t_all = time.perf_counter()
    torch.manual_seed(seed)
    classifier, test_x, test_y = digits_metric(IMAGE_SIZE, seed)
    # bits/dim are of 8-bit data: the held-out digits on the 256-level grid, as `eval --nll` scores them
    test_x = quantize_8bit(test_x)
    labels = torch.arange(n) % 10
    rows = {}
    for name, options in RUNS.items():
        config = demo_train_config(
            f"{args.out}/{name}",
            class_conditional=DEMO_DEFAULTS["conditional"],
            steps=args.steps,
            time_limit=args.time_limit,
            progress=False,
            **options,
        )
        result, trainer, train_seconds = run_training(config)
        model = result.ema_model.eval()
        schedule = Schedule.from_config(trainer.scheduler_config)
        start = time.perf_counter()
        bpd = bits_per_dim(
            model,
            (test_x, test_y),
            schedule,
            prediction_type=trainer.config.prediction_type,
            variance_type=trainer.config.variance_type,
            t_stride=args.t_stride,
            batch_size=128,
            class_conditional=True,
            seed=seed,
        )
        bpd_seconds = time.perf_counter() - start
        images = sample_digits(model, n, 50, trainer.scheduler_config, labels, seed)
        fid = classifier_fid(classifier, images, test_x)
        acc = class_accuracy(classifier, images, labels)
        rows[name] = {
            **options,
            "steps": result.step,
            "train_seconds": train_seconds,
            "last_loss": result.last_loss,
            "bpd": bpd["bpd"],
            "bpd_breakdown": {k: bpd[k] for k in ("prior", "kl", "decoder")},
            "bpd_terms": bpd["terms"],
            "bpd_seconds": bpd_seconds,
            "fid_ddim50": fid,
            "class_accuracy_ddim50": acc,
        }
        print(
            f"{name:>7}: {result.step} steps in {train_seconds:.0f} s; bits/dim {bpd['bpd']:.3f} "
            f"(prior {bpd['prior']:.4f}, KL {bpd['kl']:.3f}, decoder {bpd['decoder']:.3f}); "
            f"DDIM-50 classifier FID {fid:.3f}, accuracy {acc:.1%}"
        )
    report = {
        "what": "hybrid loss (learned_range) vs L_simple (fixed_small) on the demo's digits model: bits/dim of the "
        "held-out digits and classifier FID of DDIM-50 samples",
        "runs": rows,
        "bpd": {
            "data": f"{len(test_x)} held-out digits (split='test'), 1x16x16, scored as 8-bit data in [-1, 1]",
            "estimator": f"prior + sum over t = 1, 1 + s, ... of min(s, T - t) L_t + decoder, s = {args.t_stride}, "
            "one draw of x_t per t and image, clip_denoised",
        },
        "fid": {"images": n, "labels": "arange(n) % 10", "sampler": "ddim", "steps": 50, "seed": seed},
        "classifier_heldout_accuracy": classifier.heldout_accuracy,
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "ddpm_fast": ddpm_fast.__name__},
        "git_commit": commit,
        "git_dirty_ddpm_fast": bool(dirty),
        "wall_seconds": time.perf_counter() - t_all,
        "command": "python benchmarks/quality_digits_hybrid.py "
        + f"--steps {args.steps} --time-limit {args.time_limit} --t-stride {args.t_stride}",
    }
    write_json(args.json, report, indent=1)
    print(f"wrote {args.json} ({report['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
