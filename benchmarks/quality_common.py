"""What the digits quality scripts (``quality_digits_*.py``) share: running a training, the
digits metric (``ddpm_fast.metrics``' classifier and the held-out digits), seeded sampling, the
git facts of a report, and writing it. Not a pytest module."""

from __future__ import annotations

import datetime
import json
import subprocess
import time
from pathlib import Path

from ddpm_fast.data import make_dataset
from ddpm_fast.demo import sample_digits  # noqa: F401 (the quality benchmarks' sampler, imported from here)
from ddpm_fast.metrics import train_classifier
from ddpm_fast.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_state() -> tuple[str, str]:
    """(HEAD's commit, ``git status --porcelain`` of ddpm_fast/: the code the script imports)."""
    return git("rev-parse", "HEAD"), git("status", "--porcelain", "--", "ddpm_fast")


def results_path(what: str) -> str:
    """benchmarks/results/cpu-<today>-<what>.json"""
    return str(RESULTS / f"cpu-{datetime.date.today().isoformat()}-{what}.json")


def run_training(config, trainer_cls=Trainer):
    """Trains ``config`` to its end; (the train result, the closed trainer, wall seconds)."""
    trainer = trainer_cls(config)
    start = time.perf_counter()
    try:
        result = trainer.train()
    finally:
        trainer.close()
    return result, trainer, time.perf_counter() - start


def digits_metric(image_size: int, seed: int):
    """(``ddpm_fast.metrics``' digits classifier, the held-out digits x, y) at ``image_size``."""
    classifier = train_classifier("digits", image_size, seed)
    test_x, test_y = make_dataset("digits", image_size=image_size, split="test").tensors()
    return classifier, test_x, test_y


def write_json(path: str | Path, report: dict, indent: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=indent) + "\n")
    return path
