"""`ddpm-fast bench --headline` on the CPU: the small-size run (CI's smoke test), its table and JSON,
the run without diffusers, the `python -m ddpm_fast` entry point, and the report's pieces.

The full CPU run happens once (a module fixture, ~20 s on 2 cores); the tests read its JSON and
the table it printed. Every printed row must be a JSON row measured in that run, every row not
measured must be listed as skipped with a reason, and nothing may fail.
"""

import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_fast import cli
from ddpm_fast.headline import SMALL, measure, report, run

CPU_ARGS = ["bench", "--headline", "--device", "cpu", "--sizes", "small", "--threads", "1"]
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def _run_cli(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(args)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """(exit code, stdout, JSON) of one small-size CPU run."""
    path = tmp_path_factory.mktemp("headline") / "cpu.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPM_FAST_BENCH_MALLOC", "default")  # leave this process's malloc as it is
        code, stdout = _run_cli([*CPU_ARGS, "--out", str(path)])
    return code, stdout, json.loads(path.read_text())


def _cases(data: dict, section: str) -> dict[str, set[str]]:
    cases: dict[str, set[str]] = {}
    for row in data["rows"]:
        if row["section"] == section:
            cases.setdefault(row["case"], set()).add(row["impl"])
    return cases


def test_cpu_run_writes_the_json(cpu_run):
    code, stdout, data = cpu_run
    assert code == 0, stdout
    assert data["errors"] == []
    assert data["schema"] == run.SCHEMA
    assert data["device"] == "cpu" and "cores" in data["device_name"]
    assert len(data["date"]) == 10 and data["date"].count("-") == 2
    assert data["versions"]["torch"] and data["versions"]["python"] and data["versions"]["ddpm_fast"]
    assert ("diffusers" in data["versions"]) and (data["versions"]["diffusers"] is not None) == HAS_DIFFUSERS
    commit = data["commit"]
    assert commit["commit"] and commit["source"]
    assert data["sizes"] == json.loads(json.dumps(dataclasses.asdict(SMALL)))
    assert data["sections"] == ["sample", "train", "unet", "kernels"]
    assert data["torch_threads"] == 1 and data["malloc"] == "default"
    assert data["peaks"]["flops"] is None  # no defensible CPU peak: no % of peak
    assert data["peaks"]["copy_GB/s"] > 0 and data["peaks"]["matmul_FLOP/s"] > 0
    flops = data["flops_per_image"]
    assert 0 < flops["forward"] < flops["forward_backward"]
    assert data["command"][:3] == ["ddpm-fast", "bench", "--headline"]
    assert data["wall_s"] > 0 and data["targets"] == []  # targets are checked at the full sizes only


def test_cpu_run_has_every_row(cpu_run):
    _, _, data = cpu_run
    s = SMALL
    sample = _cases(data, "sample")
    ours = {"ddpm_fast sample() eager"}
    theirs = {"diffusers DDPMPipeline"} if HAS_DIFFUSERS else set()
    assert sample[f"DDPM {s.ddpm_steps} steps x {s.num_images} images"] == ours | theirs
    assert sample[f"DDIM {s.ddim_steps} steps x {s.num_images} images"] == ours | (
        {"diffusers DDIMPipeline"} if HAS_DIFFUSERS else set()
    )
    train = _cases(data, "train")
    theirs = {"diffusers loop eager"} if HAS_DIFFUSERS else set()
    assert train == {f"tiny step, batch {s.train_batch}": {"ddpm_fast Trainer eager"} | theirs}
    assert set(_cases(data, "unet")) == {f"forward, batch {s.num_images}", f"forward+backward, batch {s.train_batch}"}
    kernels = _cases(data, "kernels")
    gn = {c: i for c, i in kernels.items() if c.startswith("GN+SiLU")}
    assert len(gn) == 2 * len(s.group_norm_shapes)
    assert all(impls == {"ddpm_fast group_norm_silu", "eager F.silu(F.group_norm)"} for impls in gn.values())
    attn = {c: i for c, i in kernels.items() if c.startswith("attention")}
    assert len(attn) == len(s.attention_head_dims) * len(s.attention_tokens)
    assert all(impls == {"ddpm_fast attention (default)", "SDPA (torch's choice)"} for impls in attn.values())
    elementwise = {c: i for c, i in kernels.items() if c.startswith(("q_sample", "posterior_step"))}
    assert len(elementwise) == 2 * len(s.elementwise_shapes)
    assert all(impls == {"ddpm_fast (cpp)", "eager reference"} for impls in elementwise.values())


def test_cpu_run_rows_are_measured(cpu_run):
    _, _, data = cpu_run
    for row in data["rows"]:
        assert math.isfinite(row["seconds"]) and row["seconds"] > 0, row
        assert row["rate"] is None or (math.isfinite(row["rate"]) and row["rate"] > 0), row
        timing = row["data"].get("timing")
        assert timing and len(timing["runs_s"]) >= 1 and all(t > 0 for t in timing["runs_s"]), row
        if row["section"] == "kernels" and row["unit"] == "GB/s":
            assert row["peak_of"] == "copy" and row["peak_pct"] > 0
        else:
            assert row["peak_pct"] is None  # no FLOP peak on a CPU
        group = [r for r in data["rows"] if (r["section"], r["case"]) == (row["section"], row["case"])]
        if any(r["baseline"] for r in group) and len(group) > 1:
            assert row["speedup"] > 0


def test_cpu_run_lists_what_it_skipped(cpu_run):
    _, stdout, data = cpu_run
    assert all(s["section"] and s["what"] and s["reason"] for s in data["skipped"])
    whats = {s["what"] for s in data["skipped"]}
    assert "diffusers training loop (compiled)" in whats  # compile is off at the small sizes
    assert "group_norm_silu: torch.compile of F.silu(F.group_norm)" in whats
    assert "q_sample / posterior_step: torch.compile of the reference" in whats
    assert "diffusers pipelines in fp16" in whats
    if importlib.util.find_spec("liger_kernel") is None:
        assert "group_norm_silu: Liger-Kernel GroupNorm" in whats
    for s in data["skipped"]:
        assert f"skipped ({s['section']}) {s['what']}: {s['reason']}" in stdout


def test_cpu_run_prints_one_table_of_its_rows(cpu_run):
    _, stdout, data = cpu_run
    assert data["table"] in stdout
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("case "))
    assert lines[header].split() == ["case", "implementation", "dtype", "time", "rate", "vs", "base", "of", "peak"]
    body = [line for line in lines[header + 2 :] if line and not line.startswith("[")]
    table_rows = body[: len(data["rows"])]
    for line, row in zip(table_rows, data["rows"], strict=True):
        assert line.startswith(row["case"]) and row["impl"] in line and row["dtype"] in line, (line, row)
        assert report.fmt_time(row["seconds"]) in line  # the printed time is the JSON's median
    for heading in report.SECTIONS.values():
        assert f"[{heading}]" in stdout
    assert "wall time" in stdout and "wrote " in stdout


def test_run_without_diffusers(tmp_path, monkeypatch):
    """With diffusers missing, the diffusers rows are listed as skipped and ours still run."""
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    monkeypatch.setenv("DDPM_FAST_BENCH_MALLOC", "default")
    path = tmp_path / "no-diffusers.json"
    code, stdout = _run_cli([*CPU_ARGS, "--only", "sample,train", "--out", str(path)])
    assert code == 0, stdout
    data = json.loads(path.read_text())
    assert data["errors"] == [] and data["versions"]["diffusers"] is None
    assert {r["section"] for r in data["rows"]} == {"sample", "train"}
    assert all(r["impl"].startswith("ddpm_fast") for r in data["rows"])
    missing = [s for s in data["skipped"] if "diffusers is not installed" in s["reason"]]
    assert {s["what"] for s in missing} == {
        f"diffusers DDPM {SMALL.ddpm_steps} steps (fp32)",
        f"diffusers DDIM {SMALL.ddim_steps} steps (fp32)",
        "diffusers training loop (eager)",
        "diffusers training loop (compiled)",
    }
    for s in missing:
        assert f"skipped ({s['section']}) {s['what']}: diffusers is not installed" in stdout


def test_time_budget_skips_and_says_so(tmp_path, monkeypatch):
    """Past the budget, diffusers' runs are skipped with the reason; ours always run."""
    monkeypatch.setenv("DDPM_FAST_BENCH_MALLOC", "default")
    path = tmp_path / "budget.json"
    code, stdout = _run_cli([*CPU_ARGS, "--only", "sample", "--budget-s", "0", "--out", str(path)])
    assert code == 0, stdout
    data = json.loads(path.read_text())
    assert {r["impl"] for r in data["rows"]} == {"ddpm_fast sample() eager"} and data["budget_s"] == 0
    if HAS_DIFFUSERS:
        budget = [s for s in data["skipped"] if s["reason"].startswith("time budget")]
        assert {s["what"] for s in budget} == {
            f"diffusers DDPM {SMALL.ddpm_steps} steps (fp32)",
            f"diffusers DDIM {SMALL.ddim_steps} steps (fp32)",
        }


def test_python_m_entry_point(tmp_path):
    """`python -m ddpm_fast bench --headline` in a subprocess (one section), commit from git."""
    path = tmp_path / "unet.json"
    env = {**os.environ, "DDPM_FAST_COMMIT": "from-env"}
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_fast", *CPU_ARGS, "--only", "unet", "--out", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(path.read_text())
    assert {r["section"] for r in data["rows"]} == {"unet"} and len(data["rows"]) == 2
    glibc = platform.libc_ver()[0] == "glibc" and os.environ.get("DDPM_FAST_BENCH_MALLOC") != "default"
    assert (data["malloc"] != "default") == glibc  # the command keeps freed memory, as the benchmarks do
    assert "forward+backward" in result.stdout and f"wrote {path}" in result.stdout
    git = measure.git_commit(Path(__file__).resolve().parent)
    from_git = git["source"] == "git rev-parse HEAD"
    assert data["commit"]["commit"] == (git["commit"] if from_git else "from-env")  # git first, where it works


def test_cli_errors(capsys):
    assert cli.main(["bench", "--out", "x.json"]) == 2
    assert "--out: only with --headline" in capsys.readouterr().err
    assert cli.main([*CPU_ARGS, "--only", "sample,bogus"]) == 2
    assert "unknown section(s) bogus" in capsys.readouterr().err
    assert cli.main(["bench", "--headline", "--aot"]) == 2


def test_commit_from_the_environment_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_FAST_COMMIT", "abc123")
    assert measure.git_commit(tmp_path) == {"commit": "abc123", "source": "DDPM_FAST_COMMIT", "dirty": None}
    monkeypatch.delenv("DDPM_FAST_COMMIT")
    assert measure.git_commit(tmp_path)["commit"] == "unknown"


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA GH200 480GB", "nvidia-gh200-480gb"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
    ],
)
def test_device_slug(name, slug):
    assert measure.slug_of(name) == slug


def test_default_output_path():
    path = run.default_output("h100", "2026-12-05")
    assert path.name == "h100-2026-12-05-headline.json" and path.parent.parts[-2:] == ("benchmarks", "results")


def test_table_speedups_and_notes():
    r = report.Report(progress=False)
    r.add(report.Row("train", "step", "diffusers", "bf16", 2.0, rate=64, unit="img/s", baseline=True))
    r.add(report.Row("train", "step", "ours", "bf16", 0.5, rate=256, unit="img/s", peak_pct=41.25, peak_of="bf16"))
    r.add(report.Row("sample", "DDPM", "ours", "bf16", 7.5, rate=34.1, unit="img/s", note="timed over 200 steps"))
    text = r.table()
    lines = text.splitlines()
    assert lines[2] == f"[{report.SECTIONS['sample']}]"  # sections in SECTIONS' order, whatever ran first
    assert "4.00x" in text and "41.2% bf16" in text and "base" in text
    assert "ours [1]" in text and lines[-1] == "[1] timed over 200 steps"
    rows = r.rows_json()
    assert rows[2]["speedup_vs"] == {"diffusers (bf16)": 4.0} and rows[1]["speedup"] == 1.0
    with pytest.raises(ValueError, match="bad time"):
        r.add(report.Row("train", "step", "broken", "bf16", float("nan")))


def test_budget():
    unlimited = run.Budget(None)
    assert unlimited.fits(1e9)
    budget = run.Budget(10.0)
    assert budget.fits(1.0) and not budget.fits(60.0)
    assert "time budget: ~60 s expected" in budget.why(60.0)
