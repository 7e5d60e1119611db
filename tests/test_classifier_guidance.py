"""Classifier guidance in sample() (issue 20) and the noise-aware classifier with its trainer.

- sample(model, classifier=, classifier_scale=, class_labels=) equals a loop written here over the
  reference step with the gradient of a linear classifier in closed form (DDPM, DDIM, DPM-Solver++,
  Euler; with classifier-free guidance on top), on the fused step and the reference step;
- guidance=fn takes the same gradient; scale 0 is the unguided loop;
- the captured loop (a fake CUDA graph on the CPU) equals the eager one, and no step after the first
  reads a tensor on the host;
- bad inputs: labels outside the classifier's classes, guidance without labels, a classifier with an
  image-shaped output, a gradient of the wrong shape, both classifier and guidance;
- ddpm_fast.classifier.Classifier: shapes, presets, gradient, save/load; the trainer's
  --task classifier learns noised digits, resumes exactly, and the CLI takes --task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import pytest
import torch
from host_reads import no_host_reads
from test_sampler import LabelledToy, cuda_only, fake_graphs, gen, spy_captures, toy

from ddpm_fast import Schedule, SchedulerConfig, reference, sample
from ddpm_fast.classifier import Classifier, ClassifierConfig, preset_config
from ddpm_fast.solvers import apply_step, new_history, resolve
from ddpm_fast.solvers.base import with_guidance

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 3, 3)


class LinearClassifier(torch.nn.Module):
    """logits = W x.flatten() + b t: log p(y | x) has the gradient W_y - sum_k p_k W_k."""

    def __init__(self, classes=4, dim=18, seed=0):
        super().__init__()
        g = gen(seed)
        self.num_classes = classes
        self.weight = torch.nn.Parameter(torch.randn(classes, dim, generator=g) * 0.5)
        self.t_weight = torch.nn.Parameter(torch.randn(classes, generator=g) * 1e-3)

    def forward(self, x, t):
        return x.flatten(1) @ self.weight.T + t.float()[:, None] * self.t_weight

    def gradient(self, x, t, labels):
        with torch.no_grad():
            p = self.forward(x, t).softmax(-1)
            w = self.weight.double()
            return (w[labels] - p.double() @ w).reshape(x.shape).to(x.dtype)


def hand_loop(name, x_T, labels, clf, scale, cfg=None, steps=8, model=toy):
    """The guided loop from the reference step (DDPM, DDIM) or apply_step (the solvers), with the
    classifier's gradient in closed form; DDPM's noise drawn from gen(5) after each model call."""
    config = SchedulerConfig(num_train_timesteps=100)
    _, solver, source = resolve(name, config)
    schedule = Schedule.from_config(source)
    plan = solver.plan(schedule, steps)
    g = gen(5)
    x = x_T * plan.init_noise_sigma
    n = x.shape[0]
    if hasattr(plan, "mix"):
        plan = with_guidance(plan, solver.prediction_type)
        history = new_history(plan, x)
    for s in range(plan.num_steps):
        t = plan.timesteps[s].expand(n)
        if cfg is None:
            out = model(x, t)
        else:
            both = model(torch.cat([x, x]), t.repeat(2), class_labels=torch.cat([torch.full_like(labels, 3), labels]))
            out = both[:n] + cfg * (both[n:] - both[:n])
        guide = scale * clf.gradient(x, t, labels)
        if hasattr(plan, "mix"):
            x = apply_step(plan, s, x, out, history, None, guide=guide)
        else:
            z = torch.randn(x.shape, generator=g) if plan.draws[s] else None
            prev = plan.prev_timesteps[s].expand(n)
            x = reference.posterior_step(out, x, t, prev, schedule, solver.config, z, None, guide)[0]
    return x


def run_sample(name, x_T, labels, clf, scale, cfg=None, steps=8, model=toy, **kw):
    return sample(
        model,
        x_T=x_T,
        scheduler=name,
        scheduler_config=SchedulerConfig(num_train_timesteps=100),
        num_inference_steps=steps,
        class_labels=labels if clf is not None or cfg is not None else None,
        classifier=clf,
        classifier_scale=scale,
        guidance_scale=cfg,
        noise="torch",
        generator=gen(5),
        progress=False,
        **kw,
    )


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmsolver++", "euler"])
def test_sample_equals_the_guided_reference_loop(name, backend):
    clf = LinearClassifier()
    labels = torch.tensor([0, 3, 1])
    x_T = torch.randn(3, *SHAPE, generator=gen(1))
    want = hand_loop(name, x_T, labels, clf, 2.0)
    got = run_sample(name, x_T, labels, clf, 2.0, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = run_sample(name, x_T, labels, None, None)
    assert (got - plain).abs().max() > 1e-2  # the classifier moved the samples
    torch.testing.assert_close(run_sample(name, x_T, labels, clf, 0.0), plain, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ddpm", "dpmsolver++"])
def test_classifier_and_classifier_free_guidance_together(name):
    clf = LinearClassifier(seed=2)
    labels = torch.tensor([0, 2, 1])
    x_T = torch.randn(3, *SHAPE, generator=gen(2))
    want = hand_loop(name, x_T, labels, clf, 1.5, cfg=3.0, model=LabelledToy())
    got = run_sample(name, x_T, labels, clf, 1.5, cfg=3.0, model=LabelledToy())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_guidance_function_takes_the_gradient():
    clf = LinearClassifier(seed=3)
    labels = torch.tensor([1, 2, 0])
    x_T = torch.randn(3, *SHAPE, generator=gen(3))
    seen = []

    def guidance(x, t):
        seen.append(torch.is_grad_enabled())
        return 2.0 * clf.gradient(x, t, labels)

    kw = dict(x_T=x_T, scheduler="ddim", scheduler_config=SchedulerConfig(num_train_timesteps=100))
    kw.update(num_inference_steps=6, progress=False)
    by_fn = sample(toy, guidance=guidance, **kw)
    by_classifier = sample(toy, classifier=clf, classifier_scale=2.0, class_labels=labels, **kw)
    torch.testing.assert_close(by_fn, by_classifier, rtol=1e-6, atol=1e-6)
    assert seen == [True] * 6  # called once per step, with autograd on


@pytest.mark.parametrize("name", ["ddpm", "dpmsolver++"])
def test_captured_loop_equals_eager(monkeypatch, name):
    """The classifier's forward and backward are part of the captured step (fake CUDA graph on the CPU):
    chunks of 2, 2 and 1 replay the eager loop bit for bit."""
    made = fake_graphs(monkeypatch)
    clf = LinearClassifier(seed=4)
    kw = dict(shape=SHAPE, batch_size=5, chunk_size=2, class_labels=[0, 1, 2, 3, 1], classifier=clf)
    kw.update(classifier_scale=2.0, scheduler=name, scheduler_config=dict(num_train_timesteps=100))
    kw.update(num_inference_steps=8, progress=False)
    graphed = sample(toy, generator=gen(0), **kw)
    eager = sample(toy, generator=gen(0), cuda_graph=False, **kw)
    assert len(made) == 2 and sum(g.replays for g in made) > 10
    assert torch.equal(graphed, eager)


@cuda_only
@pytest.mark.parametrize("name", ["ddpm", "dpmsolver++"])
def test_cuda_graph_captures_the_classifier(monkeypatch, name):
    """On a GPU the classifier's forward and backward are captured with the model and the step: the
    graphed loop equals the eager one (same kernels; the fused CUDA step), with no capture warning."""
    captured = spy_captures(monkeypatch)
    clf = Classifier(tiny_classifier_config(sample_size=8, in_channels=3)).cuda().eval()
    kw = dict(shape=(3, 8, 8), batch_size=5, chunk_size=3, class_labels=[0, 1, 2, 3, 4], classifier=clf)
    kw.update(classifier_scale=2.0, scheduler=name, num_inference_steps=8, progress=False, dtype=torch.float32)
    kw["device"] = "cuda"
    g = lambda: torch.Generator("cuda").manual_seed(0)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns and falls back to eager steps
        graphed = sample(toy, generator=g(), cuda_graph=True, **kw)
    eager = sample(toy, generator=g(), cuda_graph=False, **kw)
    assert len(captured) == 2  # chunks of 3 and 2
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


def test_no_host_reads_after_the_first_step():
    clf = Classifier(tiny_classifier_config(sample_size=8, in_channels=3)).eval()
    kw = dict(shape=(3, 8, 8), batch_size=3, class_labels=[0, 2, 1], classifier=clf, classifier_scale=1.0)
    kw.update(scheduler="ddim", scheduler_config=dict(num_train_timesteps=60), num_inference_steps=4, progress=False)
    with contextlib.ExitStack() as guard:

        def enter_after_step_0(i, t, x):
            if i == 0:
                guard.enter_context(no_host_reads())

        guarded = sample(toy, generator=gen(0), callback=enter_after_step_0, **kw)
    torch.testing.assert_close(guarded, sample(toy, generator=gen(0), **kw), rtol=0, atol=0)


def test_bad_inputs():
    clf = LinearClassifier()  # 4 classes
    kw = dict(shape=SHAPE, batch_size=2, num_inference_steps=2, progress=False, scheduler="ddim")
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\] for this classifier, got 0..4"):
        sample(toy, classifier=clf, class_labels=[0, 4], **kw)
    anonymous = lambda x, t: clf(x, t)  # noqa: E731 (tells no num_classes: checked on its logits)
    with pytest.raises(ValueError, match="class labels go up to 5, but the classifier has 4 classes"):
        sample(toy, classifier=anonymous, class_labels=[5, 1], **kw)
    with pytest.raises(ValueError, match="classifier guidance needs class_labels"):
        sample(toy, classifier=clf, **kw)
    with pytest.raises(ValueError, match="image-shaped output"):
        sample(toy, classifier=toy, class_labels=[0, 1], **kw)
    with pytest.raises(ValueError, match="gradient must be shaped like x_t"):
        sample(toy, guidance=lambda x, t: x[:, :1], **kw)
    with pytest.raises(TypeError, match="floating-point gradient"):
        sample(toy, guidance=lambda x, t: None, **kw)
    with pytest.raises(ValueError, match="not both"):
        sample(toy, classifier=clf, guidance=lambda x, t: x, class_labels=[0, 1], **kw)
    with pytest.raises(ValueError, match="classifier_scale applies"):
        sample(toy, classifier_scale=2.0, **kw)
    with pytest.raises(ValueError, match="class_labels .* not class-conditional"):
        sample(toy, class_labels=[0, 1], **kw)  # labels without a classifier still need a conditional model
    zero_snr = dict(num_train_timesteps=100, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        sample(toy, classifier=clf, class_labels=[0, 1], **{**kw, "scheduler_config": zero_snr})


# ---------------------------------------------------------------- the classifier
def tiny_classifier_config(**kw) -> ClassifierConfig:
    return preset_config("tiny", **{"base_channels": 16, "num_groups": 4, "pool_head_channels": 16, **kw})


@pytest.mark.parametrize("pool", ["attention", "mean"])
def test_classifier_shapes_gradient_and_files(tmp_path, pool):
    model = Classifier(tiny_classifier_config(sample_size=8, in_channels=1, num_classes=3, pool=pool)).eval()
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    logits = model(x, torch.tensor([3, 700]))
    assert logits.shape == (2, 3) and logits.dtype == torch.float32
    (grad,) = torch.autograd.grad(logits.log_softmax(-1)[:, 1].sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    ref = dataclasses.replace(model.config)
    model.backend = "reference"  # the fused ops and the plain PyTorch ones agree
    torch.testing.assert_close(model(x, torch.tensor([3, 700])), logits, rtol=1e-4, atol=1e-5)
    loaded = Classifier.load(model.save(tmp_path / "clf"))
    assert loaded.config == ref
    torch.testing.assert_close(loaded(x, torch.tensor([3, 700])), logits, rtol=1e-4, atol=1e-5)
    assert preset_config("classifier").attention_resolutions == (16, 8)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        ClassifierConfig(num_classes=1)
    with pytest.raises(ValueError, match="unknown ClassifierConfig keys"):
        ClassifierConfig.from_dict({"num_classes": 3, "learned_variance": True})
    if pool == "attention":
        with pytest.raises(ValueError, match="attention pooling was built for 4 positions"):
            model(torch.randn(1, 1, 16, 16), 0)


def test_train_classifier_learns_and_resumes(tmp_path):
    """--task classifier on the digits: a 2 + 2 step run resumed equals 4 steps straight, the EMA
    classifier loads for sampling, diffusion-only options are refused."""
    from ddpm_fast.train import TrainConfig, train

    base = dict(task="classifier", dataset="digits", image_size=8, preset="tiny", batch_size=16, lr=2e-3)
    base.update(warmup_steps=0, num_train_timesteps=100, checkpoint_every=2, log_every=1, progress=False)
    base.update(device="cpu", seed=3)
    straight = train(TrainConfig(out=str(tmp_path / "a"), steps=4, **base))
    train(TrainConfig(out=str(tmp_path / "b"), steps=2, **base))
    resumed = train(TrainConfig(out=str(tmp_path / "b"), steps=4, resume="auto", **base))
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    clf = Classifier.load(tmp_path / "a")
    assert clf.num_classes == 10 and not clf.training
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(clf(x, torch.tensor([1, 2])), straight.ema_model(x, torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="apply to diffusion training"):
        train(TrainConfig(out=str(tmp_path / "c"), steps=1, **{**base, "min_snr_gamma": 5.0}))


def test_cli_train_task_classifier(tmp_path):
    from ddpm_fast.cli import main

    out = tmp_path / "run"
    args = ["train", "--task", "classifier", "--dataset", "digits", "--image-size", "8", "--steps", "1"]
    args += ["--batch-size", "8", "--out", str(out), "--device", "cpu", "--no-progress", "--num-train-timesteps", "50"]
    assert main(args) == 0
    assert Classifier.load(out).num_classes == 10


def test_cli_sample_with_classifier_guidance(tmp_path, capsys):
    """`ddpm-fast sample --classifier RUN --classifier-scale s`: an unconditional diffusion run guided
    by a classifier run writes its grid (labels cycle over the classifier's classes); a label
    outside them, and a classifier path that is not one, are errors that write nothing."""
    from ddpm_fast.cli import main

    common = ["--dataset", "digits", "--image-size", "8", "--steps", "1", "--batch-size", "8", "--device", "cpu"]
    common += ["--no-progress", "--num-train-timesteps", "50"]
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "ddpm"), *common]) == 0
    assert main(["train", "--task", "classifier", "--out", str(tmp_path / "clf"), *common]) == 0
    sample = ["sample", "--checkpoint", str(tmp_path / "ddpm"), "--num-images", "4", "--steps", "2", "--device", "cpu"]
    grid = tmp_path / "guided.png"
    assert main([*sample, "--classifier", str(tmp_path / "clf"), "--classifier-scale", "3", "--out", str(grid)]) == 0
    assert grid.is_file()
    bad = tmp_path / "bad.png"
    assert main([*sample, "--classifier", str(tmp_path / "clf"), "--class-labels", "10", "--out", str(bad)]) == 2
    assert "class labels must lie in [0, 9]" in capsys.readouterr().err
    assert main([*sample, "--classifier", str(tmp_path / "nothing"), "--out", str(bad)]) == 2
    assert not bad.exists()
