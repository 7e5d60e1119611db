"""Training learned variances (issue 19): the hybrid and kl losses equal their reference formulas,
the hybrid loss's stop-gradient on the mean, loss-second-moment importance sampling (its math, its
exact resume), mixed precision with accumulation, DDP, the CLI flags and bad inputs."""

import json
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from test_train import assert_same_weights, config

from ddpm_fast import reference, vlb
from ddpm_fast.cli import main as cli_main
from ddpm_fast.train import LossSecondMomentResampler, TrainConfig, Trainer, _step_seed, train

pytestmark = pytest.mark.usefixtures("one_thread")
HYBRID = dict(variance_type="learned_range", loss="hybrid")


def test_model_has_the_variance_channels(tmp_path):
    trainer = Trainer(config(tmp_path, "run", steps=1, **HYBRID))
    assert trainer.model.config.model_out_channels == 2 * trainer.in_channels
    assert trainer.scheduler_config.variance_type == "learned_range"


@pytest.mark.parametrize("loss", ["hybrid", "kl"])
def test_loss_is_the_reference_formula(tmp_path, loss):
    """One micro-batch: hybrid = mean(MSE + 0.001 T L_t) and kl = mean(T L_t), L_t the float64
    reference's term of each sample (bits/dim) at its drawn t."""
    trainer = Trainer(config(tmp_path, "run", steps=1, noise="torch", variance_type="learned_range", loss=loss))
    x0, _ = next(iter(trainer.loader))
    captured = {}
    trainer.model.register_forward_hook(lambda m, a, out: captured.update(pred=out.detach()))
    got = trainer.loss_on(x0, None, micro=0)
    g = torch.Generator().manual_seed(_step_seed(0, 0, 0, 0))
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    schedule = trainer.schedule
    x_t = reference.q_sample(x0, t, schedule, noise)
    pred = captured["pred"]
    terms = vlb.vlb_terms(schedule, pred.double(), x0.double(), x_t.double(), t, variance_type="learned_range")
    mse = (pred[:, :1].double() - noise.double()).pow(2).flatten(1).mean(1)
    want = (mse + 1e-3 * 1000 * terms).mean() if loss == "hybrid" else (1000 * terms).mean()
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=0)


def test_hybrid_gradient_reaches_the_mean_through_mse_only(tmp_path):
    """d loss / d model output: the prediction channels get the MSE's gradient alone (the
    stop-gradient), the variance channels lambda T d L_t / d v."""
    trainer = Trainer(config(tmp_path, "run", steps=1, noise="torch", **HYBRID))
    x0, _ = next(iter(trainer.loader))
    captured = {}

    def keep(module, args, out):
        out.retain_grad()
        captured["pred"] = out

    trainer.model.register_forward_hook(keep)
    trainer.loss_on(x0, None, micro=0).backward()
    pred = captured["pred"]
    g = torch.Generator().manual_seed(_step_seed(0, 0, 0, 0))
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    n, m = x0.shape[0], x0[0].numel()
    want_mean = 2 * (pred[:, :1].detach() - noise) / (m * n)
    torch.testing.assert_close(pred.grad[:, :1], want_mean, rtol=1e-5, atol=1e-9)
    p = pred.detach().double().requires_grad_()
    x_t = reference.q_sample(x0, t, trainer.schedule, noise)
    (vlb.vlb_terms(trainer.schedule, p, x0.double(), x_t.double(), t).sum() * 1e-3 * 1000 / n).backward()
    torch.testing.assert_close(pred.grad[:, 1:].double(), p.grad[:, 1:], rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------- importance sampling
def test_resampler_is_uniform_until_warm_then_weights_by_the_loss_rms():
    r = LossSecondMomentResampler(4, history=3, uniform_prob=0.0)
    g = torch.Generator().manual_seed(0)
    t, w = r.sample(5, g, torch.device("cpu"))
    assert w is None and torch.equal(t, torch.randint(0, 4, (5,), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="too little history: 4 of 4 timesteps"):
        r.probabilities()
    losses = {0: [1.0, 1.0, 1.0, 5.0], 1: [2.0, 2.0, 2.0], 2: [3.0, 4.0, 0.0], 3: [1.0, 1.0, 1.0]}
    for ti, values in losses.items():
        r.update(torch.full((len(values),), ti), torch.tensor(values))
    assert r.warmed_up()
    assert r.losses[0].tolist() == [1.0, 1.0, 5.0]  # the oldest dropped
    rms = torch.tensor([(27 / 3) ** 0.5, 2.0, (25 / 3) ** 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(r.probabilities(), rms / rms.sum())
    t, w = r.sample(20000, g, torch.device("cpu"))
    freq = torch.bincount(t, minlength=4).double() / t.numel()
    torch.testing.assert_close(freq, rms / rms.sum(), atol=0.015, rtol=0)
    torch.testing.assert_close(w.double(), 1 / (4 * (rms / rms.sum())[t]), rtol=1e-6, atol=0)
    clone = LossSecondMomentResampler(4, history=3, uniform_prob=0.0)
    clone.load_state_dict(r.state_dict())
    assert torch.equal(clone.probabilities(), r.probabilities())
    with pytest.raises(ValueError, match="saved history has shape"):
        LossSecondMomentResampler(5, history=3).load_state_dict(r.state_dict())
    with pytest.raises(ValueError, match="at least 2 losses per timestep"):
        LossSecondMomentResampler(4, history=1)


IMPORTANCE = dict(HYBRID, timestep_sampler="loss-second-moment", num_train_timesteps=2, batch_size=8, grad_accum=2)


def test_resume_is_exact_with_hybrid_loss_and_importance_sampling(tmp_path):
    """2 + 2 resumed steps == 4 steps, bit for bit. T = 2 and 8 samples a step: the history fills
    (10 per t) during step 3, so the resumed half samples by importance from the saved history."""
    whole = train(config(tmp_path, "whole", steps=4, checkpoint_every=2, **IMPORTANCE))
    train(config(tmp_path, "split", steps=2, checkpoint_every=2, **IMPORTANCE))
    state = torch.load(tmp_path / "split" / "checkpoints" / "step_00000002" / "training_state.pt", weights_only=True)
    assert state["timestep_sampler"]["counts"].sum() == 16  # 2 steps x 8 samples in the history
    resumed = train(config(tmp_path, "split", steps=4, checkpoint_every=2, resume="auto", **IMPORTANCE))
    assert_same_weights(whole.model, resumed.model)
    assert_same_weights(whole.ema_model, resumed.ema_model)
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in lines("whole")] == [r["loss"] for r in lines("split")]
    final = torch.load(tmp_path / "split" / "checkpoints" / "step_00000004" / "training_state.pt", weights_only=True)
    assert final["timestep_sampler"]["counts"].tolist() == [10, 10]  # warm: steps 3 and 4 drew by importance


def test_resume_without_the_sampler_history_is_refused(tmp_path):
    train(config(tmp_path, "run", steps=1, **HYBRID))
    path = tmp_path / "run" / "checkpoints" / "step_00000001"
    trainer = Trainer(config(tmp_path, "other", steps=2, **HYBRID, timestep_sampler="loss-second-moment"))
    trainer.config.timestep_sampler = "uniform"  # the saved config must match; the state lacks the history
    with pytest.raises(ValueError, match="holds no timestep-sampler history"):
        trainer.resume(path)


def test_kl_loss_and_bf16_autocast_with_accumulation_train(tmp_path):
    """The bound alone (learned variance), and the hybrid loss under bf16 autocast with 2 micro-batches
    and EMA: finite losses, moving weights."""
    for name, options in (
        ("kl", dict(variance_type="learned_range", loss="kl")),
        ("bf16", dict(HYBRID, mixed_precision="bf16", grad_accum=2, prediction_type="v")),
        ("learned", dict(variance_type="learned", loss="hybrid")),
    ):
        result = train(config(tmp_path, name, steps=2, checkpoint_every=0, **options))
        assert result.last_loss is not None and torch.isfinite(torch.tensor(result.last_loss)), name
        assert not torch.equal(
            result.model.state_dict()["conv_out.weight"], result.ema_model.state_dict()["conv_out.weight"]
        )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"loss": "hybrid"}, "--loss hybrid trains a learned variance"),
        ({"variance_type": "learned_range"}, "hybrid loss"),
        ({"loss": "mse"}, "unknown loss"),
        ({"timestep_sampler": "importance"}, "unknown timestep_sampler"),
        ({"variance_type": "learned_range", "loss": "hybrid", "vlb_weight": -1.0}, "vlb_weight"),
    ],
)
def test_bad_options(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**config(tmp_path, "run").to_dict(), **options})


def test_data_outside_the_8bit_range_is_refused(tmp_path):
    trainer = Trainer(config(tmp_path, "run", steps=1, **HYBRID))
    x0, labels = next(iter(trainer.loader))
    with pytest.raises(ValueError, match=r"the training data holds values in .*8-bit data scaled to \[-1, 1\]"):
        trainer.train_step(iter([(x0 * 1.5, labels)]))


def test_cli_flags(tmp_path):
    out = tmp_path / "cli"
    args = ["train", "--dataset", "digits", "--preset", "tiny", "--steps", "1", "--batch-size", "2",
            "--no-progress", "--sample-images", "0", "--device", "cpu", "--out", str(out),
            "--variance-type", "learned_range", "--loss", "hybrid", "--timestep-sampler", "loss-second-moment",
            "--vlb-weight", "0.002"]  # fmt: skip
    assert cli_main(args) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["variance_type"], saved["loss"], saved["timestep_sampler"], saved["vlb_weight"]) == (
        "learned_range",
        "hybrid",
        "loss-second-moment",
        0.002,
    )


WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    from safetensors.torch import save_file
    from ddpm_fast.train import TrainConfig, Trainer

    out = sys.argv[1]
    torch.set_num_threads(1)
    config = TrainConfig(dataset="digits", image_size=16, preset="tiny", batch_size=8, steps=4, warmup_steps=2,
                         lr=1e-3, checkpoint_every=0, sample_images=0, progress=False, log_every=1, device="cpu",
                         out=out, variance_type="learned_range", loss="hybrid", num_train_timesteps=2,
                         timestep_sampler="loss-second-moment")
    trainer = Trainer(config)
    result = trainer.train()
    rank = trainer.dist.rank
    state = {"model." + k: v.contiguous() for k, v in result.model.state_dict().items()}
    state["history"] = trainer.resampler.losses.contiguous()
    state["counts"] = trainer.resampler.counts.contiguous()
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    trainer.close()
    """
)


def test_ddp_ranks_share_the_sampler_history(tmp_path):
    """2 gloo ranks: every rank's (t, loss) reach both histories (all-gathered), which stay equal, as
    do the parameters; 4 steps x 8 samples fill T = 2's history past warm-up."""
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(script), str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / "run" / f"rank{r}.safetensors")) for r in (0, 1))
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    assert rank0["counts"].tolist() == [10, 10]
