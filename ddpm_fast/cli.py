"""Command line: `ddpm-fast check | bench [--aot]` (also `python -m ddpm_fast ...`)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def _check(args: argparse.Namespace) -> int:
    from .check import run_checks

    print("ddpm_fast backends:")
    ok = run_checks(tolerance=args.tolerance)
    print("all backends match the reference" if ok else "MISMATCH against the reference")
    return 0 if ok else 1


def _bench(args: argparse.Namespace) -> int:
    if args.aot:
        from . import _aot

        _aot.main([])
        return 0
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not root.is_dir():
        print(f"benchmarks/ not found next to the package ({root}): run from a source checkout", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "pytest", str(root), "--benchmark-only", *args.pytest_args])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddpm-fast", description="Fast DDPM/DDIM kernels and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="print the backends and compare each with the reference")
    check.add_argument("--tolerance", type=float, default=1e-4, help="max relative error allowed (default 1e-4)")
    check.set_defaults(func=_check)
    bench = sub.add_parser("bench", help="run the benchmark suite (pytest benchmarks/ --benchmark-only)")
    bench.add_argument(
        "--aot", action="store_true", help="instead, compile every Triton kernel for sm_90/sm_80 and report resources"
    )
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra arguments passed to pytest")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
