"""Cascades (issue 20): the U-Net's low-resolution conditioning (cond_channels, conditioning augmentation),
``sample_cascade`` against the stages run by hand, ``--task superres`` training with exact resume, the
``sample-cascade`` command, and bad inputs."""

import dataclasses
import json

import pytest
import torch
from conftest import assert_close_to_reference
from test_unet import perturb_

from ddpm_fast import SchedulerConfig, UNet, UNetConfig, sample, sample_cascade
from ddpm_fast import checkpoint as ckpt
from ddpm_fast.cascade import LowResConditioned
from ddpm_fast.cli import main, stage_scheduler_options
from ddpm_fast.ops import q_sample
from ddpm_fast.schedule import Schedule
from ddpm_fast.train import TrainConfig, train
from ddpm_fast.unet_diffusers import config_to_diffusers

# the UNetConfig fields before cascades: a model without conditioning writes exactly these
FIELDS_BEFORE = [
    "sample_size", "in_channels", "out_channels", "base_channels", "channel_mult", "num_res_blocks",
    "attention_resolutions", "mid_attention", "num_heads", "head_channels", "dropout", "num_groups", "norm_eps",
    "time_conditioning", "time_embed_dim", "num_classes", "learned_variance", "flip_sin_to_cos", "freq_shift",
    "downsample_padding",
]  # fmt: skip


def tiny(size: int, **overrides) -> UNet:
    options = {"in_channels": 1, "channel_mult": (1, 2) if size == 8 else (1, 2, 2), **overrides}
    return UNet.from_preset("tiny", sample_size=size, **options).eval()


def superres(**overrides) -> UNet:
    return tiny(16, cond_channels=1, **overrides)


# ------------------------------------------------------------------ the model
def test_no_conditioning_leaves_the_model_as_before(tmp_path):
    """cond_channels=0: the config writes the old keys only, and the state dict is the plain model's; a
    super-resolution model adds conv_in's input channels (and the level's MLP), nothing else. With its
    conditioning weights zeroed it computes what the plain model computes."""
    torch.manual_seed(0)
    plain = tiny(16)
    assert list(plain.config.to_dict()) == FIELDS_BEFORE
    path = plain.save(tmp_path / "plain")
    assert list(json.loads((path / "config.json").read_text())) == sorted(FIELDS_BEFORE)
    old_style = {k: v for k, v in plain.config.to_dict().items()}  # a config.json written before cascades
    assert UNetConfig.from_dict(old_style) == plain.config
    assert UNet.load(path).config == plain.config

    sr = superres(cond_noise_embedding=True)
    own, theirs = plain.state_dict(), sr.state_dict()
    assert set(theirs) - set(own) == {f"cond_noise_embed.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert set(own) <= set(theirs)
    for k, v in own.items():
        want = (v.shape[0], 2, *v.shape[2:]) if k == "conv_in.weight" else v.shape
        assert theirs[k].shape == want, k

    sr = superres()
    state = dict(own)
    state["conv_in.weight"] = torch.cat([own["conv_in.weight"], torch.zeros_like(own["conv_in.weight"])], 1)
    sr.load_state_dict(state)
    x, low = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 8, 8)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(sr(x, t, low_res=low), plain(x, t), rtol=1e-5, atol=1e-6)


def test_conditioning_upsamples_bilinearly_and_concatenates():
    """low_res enters as improved-diffusion's SuperResModel feeds it: bilinear (align_corners=False) to the
    sample's size, concatenated after x; a full-size conditioning image goes in as it is."""
    torch.manual_seed(1)
    sr = superres()
    x, low = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 4, 4)
    t = torch.tensor([10, 20])
    up = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.equal(sr(x, t, low_res=low), sr(x, t, low_res=up))
        inputs = []
        hook = sr.conv_in.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
        sr(x, t, low_res=low)
        hook.remove()
    assert torch.equal(inputs[0], torch.cat([x, up], 1))


def test_save_load_keeps_the_conditioning(tmp_path):
    torch.manual_seed(2)
    sr = superres(cond_noise_embedding=True, num_classes=3)
    perturb_(sr, 3)
    loaded = UNet.load(sr.save(tmp_path / "sr"))
    assert loaded.config == sr.config and loaded.config.cond_channels == 1 and loaded.config.cond_noise_embedding
    x, low, t = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        want = sr(x, t, class_labels=torch.tensor([0, 2]), low_res=low, aug_level=torch.tensor([0, 500]))
        assert torch.equal(
            loaded(x, t, class_labels=torch.tensor([0, 2]), low_res=low, aug_level=torch.tensor([0, 500])), want
        )


def _forward_backward(model, x, t, labels, low, level, grad):
    model.zero_grad(set_to_none=True)
    x, low = x.clone().requires_grad_(), low.clone().requires_grad_()
    out = model(x, t, class_labels=labels, low_res=low, aug_level=level)
    out.backward(grad.to(out.dtype))
    grads = {"x": x.grad, "low_res": low.grad, **{k: p.grad for k, p in model.named_parameters()}}
    return out.detach(), grads


def test_conditioning_fused_ops_match_reference_ops():
    """A super-resolution model with conditioning augmentation and classes on the fused ops and on the
    reference ops: output and every gradient (x, low_res, parameters) under the tolerance rule."""
    torch.manual_seed(4)
    fast = superres(cond_noise_embedding=True, num_classes=3)
    perturb_(fast, 5)
    fast.train()
    ref = UNet(fast.config, backend="reference")
    ref.load_state_dict(fast.state_dict())
    ref64 = UNet(fast.config, backend="reference").double()
    ref64.load_state_dict(fast.state_dict())
    g = torch.Generator().manual_seed(6)
    x, low = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t, level, labels = torch.tensor([0, 500, 999]), torch.tensor([0, 250, 999]), torch.tensor([0, 2, 3])
    grad = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    got, got_g = _forward_backward(fast, x, t, labels, low, level, grad)
    want, want_g = _forward_backward(ref, x, t, labels, low, level, grad)
    exact, exact_g = _forward_backward(ref64, x.double(), t, labels, low.double(), level, grad)
    assert_close_to_reference(got, want, exact)
    assert exact_g["cond_noise_embed.linear_1.weight"].abs().sum() > 0  # the level's MLP is trained
    for name in exact_g:
        per_sample = name in ("x", "low_res")
        flat = (lambda v: v) if per_sample else (lambda v: v.reshape(1, -1))  # noqa: E731
        try:
            assert_close_to_reference(
                flat(got_g[name]), flat(want_g[name]), flat(exact_g[name]), reduction=not per_sample
            )
        except AssertionError as err:
            raise AssertionError(f"gradient of {name}: {err}") from None


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({}, ValueError, "pass the conditioning image as low_res"),
        ({"low_res": torch.zeros(2, 3, 8, 8)}, ValueError, r"low_res must have shape \(2, 1, h, w\)"),
        ({"low_res": torch.zeros(1, 1, 8, 8)}, ValueError, r"low_res must have shape \(2, 1, h, w\)"),
        ({"low_res": torch.zeros(2, 1, 5, 5)}, ValueError, "must divide the sample's 16x16"),
        ({"low_res": torch.zeros(2, 1, 32, 32)}, ValueError, "must divide the sample's 16x16"),
        ({"low_res": torch.zeros(2, 1, 8, 8, dtype=torch.int64)}, TypeError, "floating-point"),
        ({"low_res": torch.zeros(2, 1, 8, 8), "aug_level": 3}, ValueError, "cond_noise_embedding=False"),
    ],
)
def test_bad_conditioning_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        superres()(torch.zeros(2, 1, 16, 16), 5, **kwargs)


def test_bad_conditioning_configs_and_inputs():
    with pytest.raises(ValueError, match="low_res / aug_level given to a U-Net without"):
        tiny(16)(torch.zeros(2, 1, 16, 16), 5, low_res=torch.zeros(2, 1, 8, 8))
    augmented = superres(cond_noise_embedding=True)
    with pytest.raises(ValueError, match="pass aug_level="):
        augmented(torch.zeros(2, 1, 16, 16), 5, low_res=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="aug_level must be >= 0"):
        augmented(torch.zeros(2, 1, 16, 16), 5, low_res=torch.zeros(2, 1, 8, 8), aug_level=-1)
    with pytest.raises(ValueError, match="needs a conditioning image"):
        UNetConfig(cond_noise_embedding=True)
    with pytest.raises(ValueError, match="cond_channels must be an int >= 0"):
        UNetConfig(cond_channels=-1)


def test_to_diffusers_refuses_a_conditioned_model(tmp_path):
    """diffusers' UNet2DModel takes no conditioning image: export is refused before anything is written."""
    sr = superres()
    with pytest.raises(ValueError, match="no diffusers UNet2DModel equivalent"):
        config_to_diffusers(sr.config)
    pytest.importorskip("diffusers")
    with pytest.raises(ValueError, match="no diffusers UNet2DModel equivalent"):
        sr.to_diffusers()
    run = _checkpoint(tmp_path / "sr", sr, SchedulerConfig())
    out = tmp_path / "pipeline"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="no diffusers UNet2DModel equivalent"):
        ckpt.export_pipeline(run, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------ sample_cascade
def _checkpoint(run, model: UNet, scheduler_config: SchedulerConfig):
    state = model.state_dict()
    return ckpt.save_checkpoint(
        run,
        1,
        model_state=state,
        ema_state=state,
        model_config=model.config.to_dict(),
        scheduler_config=scheduler_config.to_dict(),
        train_config={},
        training_state={"step": 1},
    )


def _stages():
    torch.manual_seed(10)
    base = tiny(8, num_classes=10)
    sr = superres(cond_noise_embedding=True)
    perturb_(base, 11), perturb_(sr, 12)
    return base, sr


SR_CONFIG = SchedulerConfig(beta_schedule="squaredcos_cap_v2")  # the stages' schedules may differ


@pytest.mark.parametrize("per_image", [False, True], ids=["one-generator", "generator-per-image"])
def test_sample_cascade_equals_the_stages_by_hand(per_image):
    """Base (DDIM, classifier-free guidance) then the super-resolution stage (DPM-Solver++, another schedule),
    in chunks: the same images as sample() on each stage with the conditioning passed by a plain closure,
    the augmentation noise drawn from the same generator(s) between the stages."""
    base, sr = _stages()
    n, chunk, level = 3, 2, 120
    labels = torch.tensor([0, 3, 9])

    def gens():
        if per_image:
            return [torch.Generator().manual_seed(100 + i) for i in range(n)]
        return torch.Generator().manual_seed(100)

    got = sample_cascade(
        [base, sr],
        batch_size=n,
        schedulers=["ddim", "dpmsolver++"],
        steps=[2, 2],
        scheduler_configs=[None, SR_CONFIG],
        class_labels=labels,
        guidance_scale=2.0,
        aug_level=level,
        generator=gens(),
        chunk_size=chunk,
        return_all=True,
    )

    g = gens()
    low = sample(
        base,
        batch_size=n,
        scheduler="ddim",
        num_inference_steps=2,
        class_labels=labels,
        guidance_scale=2.0,
        generator=g,
        chunk_size=chunk,
    )
    assert torch.equal(got[0], low)
    low = low.clamp(-1, 1)
    if per_image:
        z = torch.stack([torch.randn(low.shape[1:], generator=gi) for gi in g])
    else:
        z = torch.randn(low.shape, generator=g)
    s = torch.full((n,), level)
    cond = q_sample(low, s, Schedule.from_config(SR_CONFIG), noise=z)[0]
    parts = []
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)

        def stage(x, t, class_labels=None, lo=lo, hi=hi):
            return sr(x, t, low_res=cond[lo:hi], aug_level=s[lo:hi])

        parts.append(
            sample(
                stage,
                (1, 16, 16),
                batch_size=hi - lo,
                scheduler="dpmsolver++",
                num_inference_steps=2,
                scheduler_config=SR_CONFIG,
                generator=g[lo:hi] if per_image else g,
            )
        )
    assert got[1].shape == (n, 1, 16, 16)
    assert torch.equal(got[1], torch.cat(parts))


def test_sample_cascade_from_checkpoints_and_the_cli(tmp_path):
    """Stages given as checkpoint paths (EMA weights and their scheduler configs) sample what the models do;
    ``ddpm-fast sample-cascade`` writes the grid (and each stage's)."""
    base, sr = _stages()
    base_run = _checkpoint(tmp_path / "base", base, SchedulerConfig()).parent.parent
    sr_run = _checkpoint(tmp_path / "sr", sr, SR_CONFIG).parent.parent
    options = dict(batch_size=2, steps=[1, 1], class_labels=[4, 5], aug_level=50)
    want = sample_cascade(
        [base, sr],
        scheduler_configs=[SchedulerConfig(), SR_CONFIG],
        generator=torch.Generator().manual_seed(0),
        **options,
    )
    got = sample_cascade([base_run, sr_run], generator=torch.Generator().manual_seed(0), **options)
    assert torch.equal(got, want)
    out = tmp_path / "grid.png"
    args = ["sample-cascade", "--checkpoints", str(base_run), str(sr_run), "--out", str(out), "--num-images", "2"]
    # UniPC's default order 2 takes 2 steps at least
    assert main([*args, "--steps", "1,2", "--schedulers", "ddim,unipc", "--aug-level", "10", "--stage-grids"]) == 0
    assert out.is_file() and (tmp_path / "grid-stage0.png").is_file()


def test_sample_cascade_scheduler_options_per_stage(tmp_path):
    """scheduler_options (one mapping for all stages, or one per stage) sample what the same options written
    into each stage's scheduler config do, and change the images; the CLI's [STAGE:]KEY=VALUE flags give the
    per-stage mappings."""
    base, sr = _stages()
    run = dict(batch_size=2, steps=[3, 3], class_labels=[1, 2], aug_level=40, return_all=True)

    def cascade(schedulers, **options):
        return sample_cascade(
            [base, sr], schedulers=schedulers, generator=torch.Generator().manual_seed(5), **run, **options
        )

    trailing = {"timestep_spacing": "trailing"}
    shared = cascade(["ddim", "ddim"], scheduler_configs=[None, SR_CONFIG], scheduler_options=trailing)
    configs = [
        SchedulerConfig(timestep_spacing="trailing"),
        dataclasses.replace(SR_CONFIG, timestep_spacing="trailing"),
    ]
    assert all(map(torch.equal, shared, cascade(["ddim", "ddim"], scheduler_configs=configs)))
    plain = cascade(["ddim", "ddim"], scheduler_configs=[None, SR_CONFIG])
    assert not torch.equal(shared[0], plain[0]) and not torch.equal(shared[1], plain[1])

    per_stage = [{"clip_sample": False}, {"solver_order": 1, "use_karras_sigmas": True}]
    got = cascade(["ddim", "dpmsolver++"], scheduler_configs=[None, SR_CONFIG], scheduler_options=per_stage)
    ddpm_only = ("clip_sample", "clip_sample_range", "set_alpha_to_one")  # keys DPM-Solver++ warns about
    sr_dict = {k: v for k, v in SR_CONFIG.to_dict().items() if k not in ddpm_only}
    sr_dict.update(solver_order=1, use_karras_sigmas=True)
    want = cascade(["ddim", "dpmsolver++"], scheduler_configs=[SchedulerConfig(clip_sample=False), sr_dict])
    assert all(map(torch.equal, got, want))
    default = cascade(["ddim", "dpmsolver++"], scheduler_configs=[None, SR_CONFIG], scheduler_options=[None, None])
    assert not torch.equal(got[1], default[1])

    flags = ["timestep_spacing=trailing", "1:solver_order=1", "1:timestep_spacing=leading"]
    assert stage_scheduler_options(flags, 2) == [trailing, {"timestep_spacing": "leading", "solver_order": 1}]
    assert stage_scheduler_options(["0:clip_sample=false"], 3) == [{"clip_sample": False}, None, None]
    assert stage_scheduler_options([], 2) is None
    with pytest.raises(ValueError, match="for stage 2, but the cascade has 2 stages"):
        stage_scheduler_options(["2:solver_order=1"], 2)
    base_run = _checkpoint(tmp_path / "base", base, SchedulerConfig()).parent.parent
    sr_run = _checkpoint(tmp_path / "sr", sr, SR_CONFIG).parent.parent
    out = tmp_path / "grid.png"
    args = ["sample-cascade", "--checkpoints", str(base_run), str(sr_run), "--out", str(out), "--num-images", "2"]
    args += ["--schedulers", "ddim,dpmsolver++", "--steps", "1,1"]
    assert main([*args, "--scheduler-option", "steps_offset=1", "--scheduler-option", "1:solver_order=1"]) == 0
    assert out.is_file()


def test_sample_cascade_checks_every_stages_options_first(tmp_path, capsys):
    """A bad option name or value of any stage fails, naming the stage, before the base model runs."""
    base, sr = _stages()
    calls = []

    def counted(x, t, class_labels=None):
        calls.append(1)
        return base(x, t, class_labels=class_labels)

    counted.config, counted.null_class_label = base.config, base.null_class_label
    run = dict(batch_size=1, steps=2, schedulers=["ddim", "dpmsolver++"], class_labels=0)
    cases = [
        (
            [None, {"clip_sample": True}],
            ValueError,
            r"stage 1: scheduler_options: dpmsolver\+\+ has no option 'clip_sample'",
        ),
        ([None, {"solver_order": 7}], ValueError, "stage 1: .*solver_order"),
        ([{"timestep_spacing": "sideways"}, None], ValueError, "stage 0: .*timestep_spacing"),
        ([None, {"beta_schedule": "linear"}], ValueError, "stage 1: .*belongs to the noise schedule"),
        ([None, 3], TypeError, "stage 1: scheduler_options must be a mapping"),
        ([None, None, None], ValueError, "scheduler_options has 3 entries; the cascade has 2 stages"),
    ]
    for options, error, match in cases:
        with pytest.raises(error, match=match):
            sample_cascade([counted, sr], scheduler_options=options, **run)
    assert not calls
    base_run = _checkpoint(tmp_path / "base", base, SchedulerConfig()).parent.parent
    sr_run = _checkpoint(tmp_path / "sr", sr, SR_CONFIG).parent.parent
    out = tmp_path / "grid.png"
    args = ["sample-cascade", "--checkpoints", str(base_run), str(sr_run), "--out", str(out)]
    assert main([*args, "--scheduler-option", "1:solver_order=2"]) == 2
    assert "stage 1: scheduler_options: ddim has no option 'solver_order'" in capsys.readouterr().err
    assert main([*args, "--scheduler-option", "5:clip_sample=true"]) == 2
    assert "for stage 5, but the cascade has 2 stages" in capsys.readouterr().err
    assert not out.exists()


def test_cascade_bad_inputs(tmp_path, capsys):
    base, sr = _stages()
    plain16 = tiny(16)
    rgb_sr = tiny(16, in_channels=3, cond_channels=3)
    sr12 = tiny(12, cond_channels=1)
    run = dict(batch_size=2, steps=1, schedulers="ddim")
    cases = [
        ([base, plain16], {}, "stage 1 takes no conditioning image"),
        ([base, rgb_sr], {}, "takes a 3-channel conditioning image, got 1"),
        ([base, sr12], {}, "makes 12x12 images from 8x8"),
        ([sr, base], {}, "stage 0 is a super-resolution model"),
        ([base, superres()], {"aug_level": 5}, "not trained with conditioning augmentation"),
        ([base, sr], {"aug_level": 1000}, r"aug_level of stage 1 must be an int timestep in \[0, 999\]"),
        ([base, sr], {"steps": [1, 1, 1]}, "steps has 3 entries; the cascade has 2 stages"),
        ([base, sr], {"aug_level": [1, 2]}, "aug_level has 2 entries; the cascade has 1 super-resolution stage"),
        ([tiny(8), sr], {"class_labels": 1}, "no stage of the cascade is class-conditional"),
        ([base, sr], {"guidance_scale": [None, 2.0]}, r"stage\(s\) \[1\], which are not class-conditional"),
        ([], {}, "non-empty list"),
        ([base, sr], {"output_type": "png"}, "unknown output_type 'png'"),
    ]
    for stages, options, match in cases:
        with pytest.raises(ValueError, match=match):
            sample_cascade(stages, **{**run, **options})
    with pytest.raises(ValueError, match="bound conditioning holds 2"):
        bound = LowResConditioned(sr, torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64))
        sample(bound, batch_size=4, scheduler="ddim", num_inference_steps=1)
    # the command refuses a plain model as a super-resolution stage and writes nothing
    base_run = _checkpoint(tmp_path / "base", base, SchedulerConfig()).parent.parent
    plain_run = _checkpoint(tmp_path / "plain", plain16, SchedulerConfig()).parent.parent
    out = tmp_path / "grid.png"
    assert main(["sample-cascade", "--checkpoints", str(base_run), str(plain_run), "--out", str(out)]) == 2
    assert "takes no conditioning image" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ the trainer
SR_TRAIN = dict(
    task="superres",
    low_res=8,
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


@pytest.mark.parametrize(
    "options",
    [{"cond_noise_max": 300, "cond_noise_min": 20, "class_conditional": True, "noise": "torch"}],
    ids=["augmented-conditional"],
)
def test_superres_training_resumes_exactly(tmp_path, options):
    """--task superres: 2 steps + resume + 2 steps == 4 steps bit for bit; the U-Net is conditioned."""

    def cfg(name: str, steps: int, **kw) -> TrainConfig:
        return TrainConfig(**{**SR_TRAIN, **options, "out": str(tmp_path / name), "steps": steps, **kw})

    whole = train(cfg("whole", 4, checkpoint_every=2))
    train(cfg("split", 2, checkpoint_every=2))
    resumed = train(cfg("split", 4, checkpoint_every=2, resume="auto"))
    assert resumed.step == 4
    assert whole.model.config.cond_channels == 1
    assert whole.model.config.cond_noise_embedding == ("cond_noise_max" in options)
    for a, b in ((whole.model, resumed.model), (whole.ema_model, resumed.ema_model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    start = ckpt.load_checkpoint(tmp_path / "split" / "checkpoints" / "step_00000002")
    assert not torch.equal(start.model_state["conv_in.weight"], resumed.model.state_dict()["conv_in.weight"])


def test_superres_loss_conditions_on_the_downsampled_batch(tmp_path, monkeypatch):
    """The model gets low_res = the batch area-downsampled (noised at the drawn levels when augmenting)."""
    from ddpm_fast.train import Trainer

    trainer = Trainer(TrainConfig(**{**SR_TRAIN, "out": str(tmp_path / "r"), "steps": 1, "cond_noise_max": 5}))
    seen = {}
    forward = trainer.forward_model

    def spy(x, t, **kwargs):
        seen.update(kwargs)
        return forward(x, t, **kwargs)

    monkeypatch.setattr(trainer, "forward_model", spy)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    trainer.loss_on(x0, None, 0)
    assert set(seen) == {"low_res", "aug_level"} and seen["aug_level"].shape == (4,)
    assert int(seen["aug_level"].min()) >= 0 and int(seen["aug_level"].max()) <= 5
    clean = torch.nn.functional.avg_pool2d(x0, 2)
    noise_scale = trainer.schedule.sqrt_one_minus_alphas_cumprod[5].item()
    assert (seen["low_res"] - clean).abs().max() < 6 * noise_scale + 0.01
    assert not torch.equal(seen["low_res"], clean)


def test_superres_sample_grid_is_written(tmp_path):
    result = train(
        TrainConfig(**{**SR_TRAIN, "out": str(tmp_path / "r"), "steps": 1, "sample_images": 4, "sample_steps": 2})
    )
    assert (result.run_dir / "samples" / "step_00000001.png").is_file()


@pytest.mark.parametrize(
    "options,match",
    [
        ({"low_res": None}, "--task superres needs --low-res"),
        ({"low_res": 5}, "--low-res 5 must divide --image-size 16"),
        ({"low_res": 16}, "--low-res 16 must divide --image-size 16 and be smaller"),
        ({"cond_noise_max": 1000}, r"0 <= cond_noise_min <= cond_noise_max < 1000"),
        ({"cond_noise_max": 10, "cond_noise_min": 20}, r"0 <= cond_noise_min <= cond_noise_max"),
        ({"cond_noise_min": 3}, "--cond-noise-min needs --cond-noise-max"),
        ({"task": "diffusion"}, "apply to --task superres"),
        ({"eval_every": 10}, "--eval-every is not done for --task superres"),
        ({"latent_autoencoder": "vae"}, "trains in pixel space"),
    ],
)
def test_bad_superres_options(tmp_path, options, match):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(**{**SR_TRAIN, "out": str(out), "steps": 1, **options}))
    assert not out.exists()


def test_superres_cli_flags():
    """The train command's flags reach the config (they are TrainConfig's fields)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"low_res", "cond_noise_min", "cond_noise_max"} <= fields
    with pytest.raises(SystemExit):
        main(["train", "--task", "superres", "--low-res", "nope"])
