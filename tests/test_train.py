"""The trainer: exact resume, EMA math, fused vs reference q_sample, NaN stop, metrics, bad inputs."""

import json

import pytest
import torch
from host_reads import no_host_reads
from torch import nn

from ddpm_fast import checkpoint as ckpt
from ddpm_fast import reference
from ddpm_fast.ema import EMA, ema_decay
from ddpm_fast.schedule import Schedule
from ddpm_fast.train import NonFiniteLossError, TrainConfig, Trainer, _step_seed, train

# The tiny U-Net on 16x16 digits, a batch of 4: a step costs ~0.1 s on 2 cores.
BASE = dict(
    dataset="digits",
    image_size=16,
    preset="tiny",
    batch_size=4,
    warmup_steps=3,
    lr=1e-3,
    ema_decay=0.99,
    sample_images=0,
    progress=False,
    log_every=1,
    mixed_precision="no",
    device="cpu",
)


def config(tmp_path, name: str, **overrides) -> TrainConfig:
    return TrainConfig(**{**BASE, "out": str(tmp_path / name), **overrides})


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


@pytest.mark.parametrize(
    "options",
    [
        {},
        # conditional with label dropout, min-SNR weights, v-prediction and 2 micro-batches
        {"class_conditional": True, "cfg_dropout": 0.5, "min_snr_gamma": 5.0, "prediction_type": "v", "grad_accum": 2},
    ],
    ids=["plain", "conditional-accum-minsnr-v"],
)
def test_resume_is_exact(tmp_path, options):
    """N steps + resume + N steps == 2N steps in one run, bitwise (CPU, fp32)."""
    whole = train(config(tmp_path, "whole", steps=4, checkpoint_every=2, **options))
    first = train(config(tmp_path, "split", steps=2, checkpoint_every=2, **options))
    assert first.last_checkpoint.name == "step_00000002"
    resumed = train(config(tmp_path, "split", steps=4, checkpoint_every=2, resume="auto", **options))
    assert resumed.step == 4
    assert_same_weights(whole.model, resumed.model)
    assert_same_weights(whole.ema_model, resumed.ema_model)
    # and the weights moved: the comparison is not between two untouched models
    start = ckpt.load_checkpoint(tmp_path / "split" / "checkpoints" / "step_00000002")
    assert not torch.equal(start.model_state["conv_in.weight"], resumed.model.state_dict()["conv_in.weight"])
    # the metrics of the resumed steps equal the uninterrupted run's
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in lines("whole")] == [r["loss"] for r in lines("split")]


def test_resume_from_other_config_is_refused(tmp_path):
    train(config(tmp_path, "run", steps=1))
    with pytest.raises(ValueError, match=r"another configuration:\n  batch_size: 4 in the checkpoint, 8 now"):
        train(config(tmp_path, "run", steps=2, batch_size=8, resume="auto"))
    with pytest.raises(ValueError, match="U-Net config differs"):
        # the same options, another model: a checkpoint of another architecture
        Trainer(config(tmp_path, "run", steps=2, resume="auto", preset="tiny"), model=_other_unet()).train()


def _other_unet() -> nn.Module:
    from ddpm_fast.unet import UNet

    return UNet.from_preset("tiny", in_channels=1, out_channels=1, sample_size=16, base_channels=16, num_groups=4)


def test_ema_matches_a_reference_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ema = EMA(model, decay=0.95)
    shadow = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for n in range(25):
        model(torch.randn(8, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        used = ema.update(model)
        d = min(0.95, (1 + n) / (10 + n))
        assert used == d == ema_decay(0.95, n)
        for name, p in model.named_parameters():
            shadow[name] = d * shadow[name] + (1 - d) * p.detach()
        for name, b in model.named_buffers():
            shadow[name] = b.clone()  # buffers (BatchNorm statistics) are copied, not averaged
    for k, v in ema.model.state_dict().items():
        torch.testing.assert_close(v, shadow[k], rtol=1e-6, atol=1e-7)
    assert ema.num_updates == 25 and not any(p.requires_grad for p in ema.model.parameters())
    assert ema_decay(0.9999, 10**6) == 0.9999 and ema_decay(0.9, 0, warmup=False) == 0.9
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)


def test_fused_q_sample_trains_like_the_reference(tmp_path):
    """Same batch, same noise (torch draws): the fused q_sample and the reference give the same
    first-step loss and gradients, up to fp32 rounding in x_t and the target. (Weights after a few
    AdamW steps are not compared: Adam divides by sqrt(v), so where a gradient is ~0 a 1-ulp
    difference in x_t becomes a whole learning-rate step, and which weights do so depends on the
    CPU's vector ISA.)"""
    losses, grads = {}, {}
    for backend in ("cpp", "reference"):
        trainer = Trainer(config(tmp_path, backend, steps=1, noise="torch", q_sample_backend=backend))
        x0, _ = next(iter(trainer.loader))
        loss = trainer.loss_on(x0, None, micro=0)
        loss.backward()
        losses[backend] = loss.detach()
        grads[backend] = {k: p.grad for k, p in trainer.model.named_parameters()}
    torch.testing.assert_close(losses["cpp"], losses["reference"], rtol=1e-5, atol=0)
    for k, ref in grads["reference"].items():
        fused = grads["cpp"][k]
        scale = ref.abs().max().item()
        assert scale > 0, f"{k}: no gradient, the comparison would be empty"
        torch.testing.assert_close(fused, ref, rtol=0, atol=1e-4 * scale, msg=k)


def test_loss_is_the_reference_loss(tmp_path):
    """One micro-batch's loss equals reference.q_sample + training_target + diffusion_loss."""
    trainer = Trainer(config(tmp_path, "run", steps=1, noise="torch", min_snr_gamma=5.0, prediction_type="v"))
    x0, _ = next(iter(trainer.loader))
    loss = trainer.loss_on(x0, None, micro=0)
    g = torch.Generator().manual_seed(_step_seed(0, 0, 0, 0))
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    schedule = Schedule.from_config(trainer.scheduler_config)
    x_t = reference.q_sample(x0, t, schedule, noise)
    target = reference.training_target(x0, noise, t, schedule, "v_prediction")
    with torch.no_grad():
        expected = reference.diffusion_loss(trainer.model(x_t, t), target, t, schedule, "v_prediction", 5.0)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = config(tmp_path, "run", steps=6, checkpoint_every=2)
    trainer = Trainer(cfg)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output  # the 3rd forward = step 3

    trainer.model.register_forward_hook(poison)
    with pytest.raises(
        NonFiniteLossError, match=r"at step 3: training stopped\. The last good checkpoint is .*step_00000002"
    ):
        trainer.train()
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002"]
    loaded = ckpt.load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in loaded.model_state.values())


def test_metrics_log_and_lr_warmup(tmp_path):
    result = train(config(tmp_path, "run", steps=4, log_every=2, warmup_steps=4, checkpoint_every=0))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * 2 / 4, 1e-3])
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 and 0 < r["grad_norm"] for r in records)
    # checkpoint_every=0: only the final checkpoint
    assert result.last_checkpoint.name == "step_00000004"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000004"]


def test_sample_grid_is_written(tmp_path):
    train(config(tmp_path, "run", steps=1, class_conditional=True, sample_images=4, sample_steps=2))
    png = tmp_path / "run" / "samples" / "step_00000001.png"
    from PIL import Image

    with Image.open(png) as img:
        assert img.size == (2 * (2 * 18 + 2), 2 * (2 * 18 + 2))  # 2x2 grid of 16 px + 2 px gaps, scale 2


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"variance_type": "learned_range"}, ValueError, "hybrid loss"),
        ({"prediction_type": "noise"}, ValueError, "unknown prediction_type"),
        ({"batch_size": 6, "grad_accum": 4}, ValueError, "divisible"),
        ({"steps": 0}, ValueError, "steps must be >= 1"),
        ({"lr": float("nan")}, ValueError, "lr must be"),
        ({"cfg_dropout": 1.0}, ValueError, "cfg_dropout"),
        ({"mixed_precision": "fp8"}, ValueError, "mixed_precision"),
        ({"mixed_precision": "fp16"}, ValueError, "needs a CUDA device"),
        ({"dataset": "folder"}, ValueError, "needs --data-dir"),
        ({"dataset": "imagenet"}, ValueError, "unknown dataset"),
        ({"noise": "uniform"}, ValueError, "unknown noise"),
        (
            {"sample_images": 4, "sample_scheduler": "unipc", "sample_steps": 1},
            ValueError,
            "sample_steps=1 is fewer than sample_scheduler unipc's solver_order=2: ask for sample_steps >= 2",
        ),
        ({"eval_every": 5, "eval_steps": 1}, ValueError, "eval_steps=1 is fewer than eval_scheduler dpmsolver"),
        (
            {
                "sample_images": 4,
                "sample_scheduler": "dpmsolver++",
                "sample_steps": 2,
                "sample_scheduler_options": {"solver_order": 3},
            },
            ValueError,
            "sample_steps=2 is fewer than sample_scheduler dpmsolver\\+\\+'s solver_order=3",
        ),  # fmt: skip
        (
            {"eval_every": 5, "eval_scheduler_options": {"clip_sample": True}},
            ValueError,
            "eval_scheduler_options: dpmsolver\\+\\+ has no option 'clip_sample'",
        ),
        ({"sample_scheduler_options": {"timestep_spacing": "sideways"}}, ValueError, "sample_scheduler_options: "),
        ({"eval_scheduler_options": {"beta_end": 0.03}}, ValueError, "belongs to the noise schedule"),
        ({"sample_scheduler_options": ["solver_order=3"]}, ValueError, "must be a table of option = value"),
    ],
)
def test_bad_options(tmp_path, options, error, match):
    with pytest.raises(error, match=match):
        Trainer(config(tmp_path, "run", **{"steps": 1, **options}))


def test_sample_grid_takes_scheduler_options(tmp_path):
    """--sample-scheduler-option: the run's grid is sample()'s with those options on the EMA weights (and
    differs from the plain sampler's); a lower solver_order lowers the fewest steps allowed."""
    from ddpm_fast import load_for_sampling, sample
    from ddpm_fast.images import save_grid

    options = {"use_karras_sigmas": True}
    cfg = config(tmp_path, "run", steps=1, sample_images=4, sample_scheduler="dpmsolver++", sample_steps=3,
                 sample_scheduler_options=options)  # fmt: skip
    train(cfg)
    grid = tmp_path / "run" / "samples" / "step_00000001.png"
    model, scheduler_config = load_for_sampling(tmp_path / "run")

    def grid_bytes(name, **kw):
        generator = torch.Generator().manual_seed(cfg.seed)
        images = sample(model, batch_size=4, num_inference_steps=3, scheduler="dpmsolver++",
                        scheduler_config=scheduler_config, generator=generator, **kw)  # fmt: skip
        return save_grid(images, tmp_path / name, scale=2).read_bytes()

    assert grid.read_bytes() == grid_bytes("want.png", scheduler_options=options)
    assert grid.read_bytes() != grid_bytes("plain.png")
    # 1 step is too few for DPM-Solver++'s default order 2, enough with solver_order=1
    one_step = dict(sample_images=4, sample_scheduler="dpmsolver++", sample_steps=1)
    with pytest.raises(ValueError, match="sample_steps=1 is fewer than"):
        config(tmp_path, "run2", **one_step)
    config(tmp_path, "run2", **one_step, sample_scheduler_options={"solver_order": 1})


def test_bad_image_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        Trainer(config(tmp_path, "run", dataset="folder", data_dir=str(tmp_path / "empty")))
    bad = tmp_path / "bad" / "cats"
    bad.mkdir(parents=True)
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image file"):
        Trainer(config(tmp_path, "run", dataset="folder", data_dir=str(tmp_path / "bad")))


def test_config_from_dict():
    cfg = TrainConfig.from_dict({"batch-size": 8, "lr": 1e-3, "prediction_type": "x0"})
    assert cfg.batch_size == 8 and cfg.prediction_type == "sample"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown train option"):
        TrainConfig.from_dict({"batchsize": 8})


def test_bad_labels_are_refused_on_the_host(tmp_path):
    """Labels are checked on the host batch before they move (the step itself reads no values)."""
    trainer = Trainer(config(tmp_path, "run", steps=1, class_conditional=True))
    x0, labels = next(iter(trainer.loader))
    trainer.train_step(iter([(x0, labels)]))  # the data's own labels pass
    bad = labels.clone()
    bad[-1] = trainer.num_classes
    with pytest.raises(ValueError, match=r"class labels \d+\.\.10; the model was built for 10 classes"):
        trainer.train_step(iter([(x0, bad)]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])  # fmt: skip
def test_train_step_reads_nothing_from_the_device(tmp_path, monkeypatch, device):
    """After one warm-up step, a training step (labels with dropout, min-SNR weights, grad clip,
    AdamW, EMA, 2 micro-batches) hands no tensor value to Python: no host sync per step. The
    labels' range is checked on the host batch (test_bad_labels_are_refused_on_the_host): off
    here, as are the data loader's own host reads (the batches are drawn before)."""
    cfg = config(tmp_path, "run", steps=3, class_conditional=True, cfg_dropout=0.3, min_snr_gamma=5.0,
                 grad_clip=1.0, grad_accum=2, device=device)  # fmt: skip
    trainer = Trainer(cfg)
    source = trainer.loader.forever()
    batches = iter([next(source) for _ in range(4)])
    trainer.train_step(batches)
    monkeypatch.setattr(trainer, "_check_labels", lambda labels: None)
    # AdamW (not fused) keeps each step count as a CPU scalar and reads it: a host read, no sync.
    host_steps = {id(s["step"]) for s in trainer.optimizer.state.values() if s["step"].device.type == "cpu"}
    with no_host_reads(allow=lambda t: id(t) in host_steps):
        loss, grad_norm = trainer.train_step(batches)
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)
