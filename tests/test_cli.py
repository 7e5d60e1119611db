"""The command line: train (flags and a TOML file), sample (a PNG grid), --help, errors, a short demo."""

import dataclasses
import json

import pytest
from PIL import Image

from ddpm_fast import cli
from ddpm_fast.train import TrainConfig

TRAIN_FLAGS = ["--dataset", "digits", "--image-size", "16", "--preset", "tiny", "--batch-size", "4"]
QUIET = ["--no-progress", "--sample-images", "0", "--warmup-steps", "2", "--device", "cpu"]


def test_train_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name.endswith("_scheduler_options"):  # a table, given as repeated KEY=VALUE flags
            flag = flag.removesuffix("s") + " KEY=VALUE"
        assert flag in text, flag
        assert " ".join(f.metadata["help"].split())[:40] in text, f.name
    assert "--config" in text


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step class-conditional run from a TOML file, with --steps given as a flag overriding it."""
    tmp = tmp_path_factory.mktemp("cli")
    toml = tmp / "run.toml"
    toml.write_text("[train]\nsteps = 5\nclass-conditional = true\nlr = 0.001\nlog_every = 1\nseed = 3\n")
    run = tmp / "run"
    code = cli.main(["train", "--config", str(toml), *TRAIN_FLAGS, *QUIET, "--steps", "2", "--out", str(run)])
    assert code == 0
    return run


def test_train_reads_toml_and_flags_override(trained_run):
    saved = json.loads((trained_run / "checkpoints" / "step_00000002" / "train_config.json").read_text())
    assert saved["steps"] == 2  # the flag beat the file's 5
    assert saved["class_conditional"] is True and saved["lr"] == 0.001 and saved["seed"] == 3  # from the file
    assert saved["batch_size"] == 4 and saved["progress"] is False  # flags
    assert (trained_run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert len((trained_run / "metrics.jsonl").read_text().splitlines()) == 2


def test_sample_writes_a_png_grid(trained_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", str(trained_run), "--num-images", "6", "--steps", "3", "--out", str(out)]
    assert (
        cli.main([*args, "--scheduler", "ddim", "--nrow", "3", "--class-labels", "1,7", "--guidance-scale", "2"]) == 0
    )
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.size == (3 * 18 + 2, 2 * 18 + 2) and img.mode == "L"
    # a step directory works too, with DDPM and the raw weights
    step_dir = trained_run / "checkpoints" / "step_00000002"
    args = ["sample", "--checkpoint", str(step_dir), "--num-images", "2", "--steps", "2", "--scheduler", "ddpm"]
    assert cli.main([*args, "--raw-weights", "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").is_file()


def test_sample_dtype(trained_run, tmp_path, monkeypatch):
    """--dtype picks the model's autocast dtype: float32 on a CPU that defaults to bf16 gives the fp32
    grid (the suite's default), bfloat16 a different one, auto follows the CPU."""
    args = ["sample", "--checkpoint", str(trained_run), "--num-images", "4", "--steps", "3", "--class-labels", "2"]

    def grid(name, *extra):
        out = tmp_path / f"{name}.png"
        assert cli.main([*args, *extra, "--out", str(out)]) == 0
        return out.read_bytes()

    fp32 = grid("default")
    bf16 = grid("bf16", "--dtype", "bfloat16")
    monkeypatch.setenv("DDPM_FAST_CPU_BF16", "1")  # as on a CPU with bf16 units
    assert grid("auto") == bf16 != fp32
    assert grid("fp32", "--dtype", "float32") == fp32


def test_sample_scheduler_options(trained_run, tmp_path, capsys):
    """--scheduler-option KEY=VALUE (repeatable) and a TOML scheduler_options table set the sampler's options."""
    args = ["sample", "--checkpoint", str(trained_run), "--num-images", "4", "--steps", "4", "--class-labels", "2"]
    args += ["--scheduler", "dpmsolver++"]

    def grid(name, *extra):
        out = tmp_path / f"{name}.png"
        assert cli.main([*args, *extra, "--out", str(out)]) == 0
        return out.read_bytes()

    flags = grid("flags", "--scheduler-option", "solver_order=3", "--scheduler-option", "use_karras_sigmas=true")
    toml = tmp_path / "options.toml"
    toml.write_text("[sample]\nscheduler_options = { solver_order = 3, use_karras_sigmas = true }\n")
    assert grid("toml", "--config", str(toml)) == flags != grid("default")
    out = str(tmp_path / "bad.png")
    assert cli.main([*args, "--scheduler-option", "beta_end=0.03", "--out", out]) == 2
    assert "'beta_end' belongs to the noise schedule the model was trained with" in capsys.readouterr().err
    assert cli.main([*args, "--scheduler-option", "solver_order", "--out", out]) == 2
    assert "--scheduler-option takes KEY=VALUE (e.g. solver_order=3), got 'solver_order'" in capsys.readouterr().err


def test_scheduler_option_values():
    pairs = ["solver_order=3", "use-karras-sigmas=true", "s_noise=0.5", "timestep_spacing = trailing", "sigma_min=none"]
    pairs += ["s_tmax=inf", "disable_corrector=[1, 2]"]
    assert cli.scheduler_options(pairs, {"solver_order": 2, "lower_order_final": False}) == {
        "solver_order": 3,  # the flag beats the table
        "lower_order_final": False,
        "use_karras_sigmas": True,
        "s_noise": 0.5,
        "timestep_spacing": "trailing",
        "sigma_min": None,
        "s_tmax": float("inf"),
        "disable_corrector": [1, 2],
    }
    assert cli.scheduler_options((), None) is None
    with pytest.raises(ValueError, match="scheduler_options must be a table"):
        cli.scheduler_options((), "solver_order=3")


def test_check_names_the_machine_and_passes(capsys):
    """`ddpm-fast check` (CI's first step): a line on the CPU, then every backend against the reference."""
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cpu: ") and "bf16 units: " in out and "runs the model in fp32" in out  # the suite's 0
    assert "all backends match the reference" in out


def test_sample_errors(trained_run, tmp_path, capsys):
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint", str(trained_run), "--class-labels", "12", "--num-images", "2"]) == 2
    assert "class labels must lie in [0, 9]" in capsys.readouterr().err
    assert cli.main(["sample", "--out", str(tmp_path / "x.png")]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err
    assert cli.sample_grid(str(trained_run), num_images=1, steps=1, out=str(tmp_path / "d.png")).is_file()
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16, got 'fp64'"):
        cli.sample_grid(str(trained_run), dtype="fp64", out=str(tmp_path / "x.png"))
    # fewer steps than the multistep solver's order (2 by default): the message, no traceback, no grid
    out = tmp_path / "few.png"
    for name in ("dpmsolver++", "unipc"):
        args = ["sample", "--checkpoint", str(trained_run), "--scheduler", name, "--steps", "1", "--out", str(out)]
        assert cli.main([*args, "--num-images", "2"]) == 2
        err = capsys.readouterr().err
        assert "num_inference_steps=1 is fewer than solver_order=2" in err and "Traceback" not in err
    assert not out.exists()


def test_train_scheduler_option_flags_over_the_toml_table(tmp_path, capsys):
    """--sample-scheduler-option / --eval-scheduler-option KEY=VALUE flags add to (and override) the
    config file's tables; the run's saved config holds the merged options; bad ones fail before training."""
    toml = tmp_path / "run.toml"
    toml.write_text(
        "[train]\nsteps = 1\n[train.sample_scheduler_options]\nuse_karras_sigmas = false\nsolver_order = 2\n"
    )
    run = tmp_path / "run"
    args = ["train", "--config", str(toml), *TRAIN_FLAGS, *QUIET, "--sample-scheduler", "dpmsolver++"]
    flags = [
        "--sample-scheduler-option",
        "use_karras_sigmas=true",
        "--sample-scheduler-option",
        "lower_order_final=false",
    ]
    assert cli.main([*args, *flags, "--out", str(run)]) == 0
    saved = json.loads((run / "checkpoints" / "step_00000001" / "train_config.json").read_text())
    assert saved["sample_scheduler_options"] == {
        "use_karras_sigmas": True,
        "solver_order": 2,
        "lower_order_final": False,
    }
    assert saved["eval_scheduler_options"] is None
    capsys.readouterr()
    bad = [
        (["--sample-scheduler-option", "karras"], "--sample-scheduler-option takes KEY=VALUE"),
        (["--sample-scheduler-option", "clip_sample=true"], "sample_scheduler_options: dpmsolver++ has no option"),
        (["--eval-scheduler-option", "solver_order=9"], "eval_scheduler_options: "),
    ]
    for extra, message in bad:
        assert cli.main([*args, *extra, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_train_errors(tmp_path, capsys):
    code = cli.main(
        ["train", *TRAIN_FLAGS, *QUIET, "--steps", "1", "--variance-type", "learned", "--out", str(tmp_path)]
    )
    assert code == 2
    assert "hybrid loss" in capsys.readouterr().err
    toml = tmp_path / "bad.toml"
    toml.write_text("batchsize = 3\n")
    assert cli.main(["train", "--config", str(toml), "--out", str(tmp_path)]) == 2
    assert "unknown train option(s): batchsize" in capsys.readouterr().err


def test_short_demo_learns_digits(tmp_path, capsys):
    """The demo, shortened (150 steps of 32 images, 100 samples, DDIM-10), with a looser threshold
    than the full run's: the trained samples' classifier FID must be at most half the untrained
    model's (measured: 26 vs 150), and the conditional samples must be recognised well above chance
    (10%; measured 53%)."""
    from ddpm_fast.demo import run_demo

    result = run_demo(
        out=str(tmp_path / "demo"),
        steps=150,
        batch_size=32,
        warmup_steps=50,
        num_images=100,
        sample_steps=10,
        threshold=0.5,
        time_limit=0.0,
        progress=False,
    )
    text = capsys.readouterr().out
    assert "untrained U-Net" in text and "trained U-Net (EMA)" in text and "real digits" in text
    assert result.steps == 150
    assert result.passed, text
    assert result.fid_trained <= 0.5 * result.fid_untrained
    assert result.fid_real < result.fid_trained  # real digits remain closer to the held-out ones
    assert result.accuracy_trained > 0.3 and result.accuracy_real > 0.9
    with Image.open(result.grid) as img:
        assert img.size == (4 * (10 * 18 + 2), 4 * (10 * 18 + 2))
