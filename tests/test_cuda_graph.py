"""CUDA only: the fused ops replay inside a captured CUDA graph (no host syncs, no host-side
branching on tensor values), with fresh in-kernel noise per replay."""

import pytest
import torch

import ddpm_fast
from ddpm_fast import Schedule, StepConfig, posterior_step, q_sample, reference
from ddpm_fast.ops import no_value_checks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = [name for name in ("cuda", "triton") if ddpm_fast.backends()[name][0]]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_ddpm_step_replays_in_a_cuda_graph(backend):
    device = torch.device("cuda")
    schedule = Schedule.from_config(device=device)
    config = StepConfig(kind="ddpm", thresholding=True, sample_max_value=2.0)
    x = torch.randn(4, 3, 16, 16, device=device)
    model_output = torch.randn(4, 3, 16, 16, device=device)
    t = torch.full((4,), 500, device=device)
    prev_t = t - 1
    seed = torch.Generator(device=device).manual_seed(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), no_value_checks():
        for _ in range(2):  # warm up: compile, allocate, fill caches
            posterior_step(model_output, x, t, prev_t, schedule, config, generator=seed, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), no_value_checks():
        out, _ = posterior_step(model_output, x, t, prev_t, schedule, config, backend=backend)
    graph.replay()
    first = out.clone()
    graph.replay()
    second = out.clone()
    assert not torch.equal(first, second), "each replay must draw fresh noise"
    # Both replays are valid steps: the same mean, noise of the right scale.
    mean, _ = reference.posterior_step(model_output, x, t, prev_t, schedule, config, torch.zeros_like(x))
    for result in (first, second):
        z = (result - mean) / reference.ddpm_posterior_std(
            schedule.alphas_cumprod[500].float(), schedule.alphas_cumprod[499].float(), "fixed_small", None
        )
        assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_q_sample_replays_in_a_cuda_graph(backend):
    device = torch.device("cuda")
    schedule = Schedule.from_config(device=device)
    x0 = torch.randn(8, 3, 8, 8, device=device)
    t = torch.randint(0, 1000, (8,), device=device)
    with no_value_checks():
        q_sample(x0, t, schedule, target="v_prediction", backend=backend)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x_t, noise, target = q_sample(x0, t, schedule, target="v_prediction", backend=backend)
    graph.replay()
    expected = reference.q_sample(x0, t, schedule, noise)
    torch.testing.assert_close(x_t, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        target, reference.training_target(x0, noise, t, schedule, "v_prediction"), rtol=1e-5, atol=1e-5
    )
