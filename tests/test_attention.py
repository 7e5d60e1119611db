"""attention and attention_block against the reference (explicit fp32 softmax) under the tolerance
rule, forward and backward: the Triton kernel (under the interpreter on CPU, so shapes stay small:
seq 16..70, head_dim 32..512 incl. 96/160/320 and non-contiguous layouts), SDPA, the block in NCHW
and channels_last, diffusers' Attention as the oracle for the block, torch.compile and bad inputs."""

import itertools

import pytest
import torch
from conftest import HAS_CUDA, TRITON_INTERPRETED, assert_close_to_reference

from ddpm_fast import attention, attention_block, backends, reference
from ddpm_fast.ops.attention import _attention_backward_op, _attention_op, _backend_for

TRITON = backends()["triton"][0]
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_triton = pytest.mark.skipif(not TRITON, reason="triton cannot run here")


def draw(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def grads_of(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> with respect to every input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out)


def check_rule(fn, inputs, grad_out, ref_fn):
    """The tolerance rule (DESIGN.md) on the output and every gradient: fn in dtype D and ref_fn in
    D against ref_fn on the inputs upcast to fp64 (all on the CPU)."""
    out, grads = grads_of(fn, inputs, grad_out)
    cpu = [t.detach().cpu() for t in inputs]
    ref, ref_grads = grads_of(ref_fn, cpu, grad_out.cpu())
    exact, exact_grads = grads_of(ref_fn, [t.double() for t in cpu], grad_out.cpu().double())
    assert out.dtype == inputs[0].dtype
    assert_close_to_reference(out, ref, exact)
    for i, (g, r, e) in enumerate(zip(grads, ref_grads, exact_grads, strict=True)):
        assert g.shape == inputs[i].shape and g.dtype == inputs[i].dtype
        try:
            assert_close_to_reference(g, r, e)
        except AssertionError as err:
            raise AssertionError(f"gradient of input {i}: {err}") from err
    return out


# ------------------------------------------------------------------ the Triton kernel
# (B, H, Sq, Sk, D, dtype): padded head dims (96, 160, 320), the split path (320, 512), sequences
# not a multiple of the block, several key and query blocks (70 keys, 40 queries), Sq != Sk.
TRITON_CASES = [
    (1, 1, 16, 16, 32, torch.float32),
    (1, 2, 40, 40, 96, torch.float32),
    (1, 1, 33, 33, 160, torch.bfloat16),
    (1, 2, 40, 70, 64, torch.float32),
    (1, 1, 24, 24, 512, torch.float32),
    (1, 1, 20, 20, 320, torch.float16),
    (2, 1, 17, 17, 256, torch.bfloat16),
    (1, 1, 40, 40, 512, torch.bfloat16),
    (1, 1, 40, 100, 128, torch.float16),
]
if HAS_CUDA:  # full shapes on a GPU: the U-Net's and the benchmark's
    TRITON_CASES += [
        (8, 1, 256, 256, 256, torch.bfloat16),
        (4, 1, 256, 256, 512, torch.bfloat16),
        (2, 1, 256, 256, 512, torch.float32),
        (2, 8, 1024, 1024, 64, torch.float16),
        (2, 1, 1000, 1000, 128, torch.bfloat16),
    ]


def qkv(b, h, sq, sk, d, dtype, seed=0):
    return draw((b, h, sq, d), dtype, seed), draw((b, h, sk, d), dtype, seed + 1), draw((b, h, sk, d), dtype, seed + 2)


@needs_triton
@pytest.mark.parametrize(("b", "h", "sq", "sk", "d", "dtype"), TRITON_CASES, ids=str)
def test_triton_matches_reference(b, h, sq, sk, d, dtype):
    q, k, v = qkv(b, h, sq, sk, d, dtype)
    grad_o = draw((b, h, sq, d), dtype, 9)
    check_rule(lambda q, k, v: attention(q, k, v, backend="triton"), (q, k, v), grad_o, reference.attention)


@needs_triton
def test_triton_non_contiguous_and_scale():
    """q, k, v as strided views of one packed (B, S, 3, H, D) tensor, and a head-dim stride that is
    not 1 (a transposed view), with an explicit scale."""
    b, s, h, d = 2, 20, 2, 48
    packed = draw((b, s, 3, h, d), torch.float32, 3)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    grad_o = draw((b, h, s, d), torch.float32, 4)
    fn = lambda q, k, v: attention(q, k, v, 0.3, backend="triton")  # noqa: E731
    ref = lambda q, k, v: reference.attention(q, k, v, 0.3)  # noqa: E731
    check_rule(fn, (q, k, v), grad_o, ref)
    kt = draw((b, h, d, s), torch.float32, 5).transpose(-1, -2)  # stride(-1) == s
    check_rule(fn, (q, kt, v), grad_o, ref)


@needs_triton
def test_triton_peaked_softmax():
    """Scores in the hundreds (one key dominates each query): the online softmax's running max keeps
    the forward exact to the tolerance rule. The backward rebuilds P from the recomputed scores and
    the stored log-sum-exp, whose rounding at that magnitude (ulp(700) ~ 6e-5) sets its error: the
    fp32 rule for reductions (1e-4 relative) there."""
    q, k, v = qkv(1, 1, 20, 70, 32, torch.float32, seed=11)
    grad_o = draw((1, 1, 20, 32), torch.float32, 12)
    fn = lambda q, k, v: attention(q, k, v, 30.0, backend="triton")  # noqa: E731
    ref = lambda q, k, v: reference.attention(q, k, v, 30.0)  # noqa: E731
    out, grads = grads_of(fn, (q, k, v), grad_o)
    exact, exact_grads = grads_of(ref, [t.double() for t in (q, k, v)], grad_o.double())
    assert_close_to_reference(out, ref(q, k, v), exact)
    for g, e in zip(grads, exact_grads, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


@needs_triton
def test_triton_empty_batch():
    q = torch.empty(0, 1, 16, 32, device=DEVICE)
    assert attention(q, q, q, backend="triton").shape == q.shape


@needs_triton
def test_triton_opcheck():
    """torch.library.opcheck: schema, fake implementations and autograd registration of both ops
    (AOTAutograd: test_triton_op_traces_fullgraph)."""
    q, k, v = qkv(1, 1, 16, 16, 32, torch.float32, seed=13)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(_attention_op, (q, k, v, 0.25), test_utils=utils)
    o, lse = _attention_op(q, k, v, 0.25)
    torch.library.opcheck(_attention_backward_op, (torch.ones_like(o), q, k, v, o, lse, 0.25), test_utils=utils)


@needs_triton
def test_triton_op_traces_fullgraph():
    """Dynamo + AOTAutograd over the Triton op (its fake and autograd registrations), fwd and bwd."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 16, 16, 32, torch.float32, seed=14))
    fn = torch.compile(lambda q, k, v: attention(q, k, v, backend="triton"), backend="aot_eager", fullgraph=True)
    out = fn(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = reference.attention(q, k, v)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_config_is_pure_and_splits_wide_heads():
    """Configurations depend on (shape, dtype, arch) only; head_dim 512 splits its output (no
    [64, 512] fp32 accumulator: that spills), a head held whole is one output slice (the kernels
    rely on it), and every block is >= 16 (tl.dot's minimum)."""
    from ddpm_fast.kernels.triton_attention import attention_config

    for arch, backward, dtype in itertools.product((None, 80, 90), (False, True), (torch.bfloat16, torch.float32)):
        for d in (32, 96, 160, 256, 320, 512):
            for s in (16, 33, 256, 4096):
                cfg = attention_config(s, s, d, dtype, arch, backward)
                assert cfg == attention_config(s, s, d, dtype, arch, backward)
                assert min(cfg.block_m, cfg.block_n, cfg.block_dk, cfg.block_dv) >= 16
                assert cfg.block_d >= d and cfg.block_d % cfg.block_dk == 0 and cfg.block_d % cfg.block_dv == 0
                assert cfg.num_dk > 1 or cfg.block_dv == cfg.block_d
                if d > 256:
                    assert cfg.block_dv < cfg.block_d and cfg.num_dk > 1


# ------------------------------------------------------------------ SDPA, reference, dispatch
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", ["sdpa", "reference", None])
def test_sdpa_and_reference(backend, dtype):
    q, k, v = qkv(2, 3, 37, 29, 40, dtype, seed=20)
    grad_o = draw((2, 3, 37, 40), dtype, 21)
    check_rule(lambda q, k, v: attention(q, k, v, backend=backend), (q, k, v), grad_o, reference.attention)


def test_default_dispatch():
    """CUDA: SDPA up to head_dim 256, Triton for wider heads (float64: SDPA). CPU, as measured fastest:
    SDPA, except the plain reference for heads over 256, and for heads of 256 when gradients are
    needed (not under no_grad)."""

    def choice(d, dtype=torch.float32, grad=False):
        q = torch.empty(1, 1, 16, d, dtype=dtype, device=DEVICE, requires_grad=grad)
        return _backend_for(None, q, q, q)

    if DEVICE.type == "cuda":
        assert [choice(d) for d in (64, 256, 512)] == ["sdpa", "sdpa", "triton" if TRITON else "sdpa"]
        assert choice(512, torch.float64) == "sdpa"
        return
    assert [choice(d) for d in (64, 128, 256, 512)] == ["sdpa", "sdpa", "sdpa", "reference"]
    assert [choice(d, grad=True) for d in (64, 128, 256, 512)] == ["sdpa", "sdpa", "reference", "reference"]
    with torch.no_grad():
        assert choice(256, grad=True) == "sdpa"


# ------------------------------------------------------------------ the block
def block_params(c, dtype, seed=30):
    """norm weight/bias (C,), qkv weight (3C, C) and bias, proj weight (C, C) and bias."""
    return [
        1 + draw((c,), dtype, seed, 0.1),
        draw((c,), dtype, seed + 1, 0.1),
        draw((3 * c, c), dtype, seed + 2, c**-0.5),
        draw((3 * c,), dtype, seed + 3, 0.1),
        draw((c, c), dtype, seed + 4, c**-0.5),
        draw((c,), dtype, seed + 5, 0.1),
    ]


BLOCK_BACKENDS = ["sdpa", "reference"] + (["triton"] if TRITON else [])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(("heads", "dtype"), [(1, torch.float32), (2, torch.float32), (1, torch.bfloat16)])
@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_block_matches_reference(backend, heads, dtype, channels_last):
    n, c, hw = (1, 64, 4) if TRITON_INTERPRETED and backend == "triton" else (2, 64, 5)
    x = draw((n, c, hw, hw + 1), dtype, 40)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = block_params(c, dtype)
    grad_y = draw(x.shape, dtype, 41)
    if channels_last:
        grad_y = grad_y.to(memory_format=torch.channels_last)
    fn = lambda x, *p: attention_block(x, *p, num_heads=heads, backend=backend)  # noqa: E731
    ref = lambda x, *p: reference.attention_block(x, *p, num_heads=heads)  # noqa: E731
    y = check_rule(fn, (x, *params), grad_y, ref)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_block_without_biases():
    x = draw((2, 32, 3, 3), torch.float32, 42)
    p = block_params(32, torch.float32)
    p[3] = p[5] = None
    y = attention_block(x, *p)
    p64 = [None if t is None else t.double() for t in p]
    assert_close_to_reference(y, reference.attention_block(x, *p), reference.attention_block(x.double(), *p64))


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_block_matches_diffusers_attention(backend):
    """diffusers' Attention as built by UNet2DModel's attention blocks with the DDPM-CIFAR10 config
    (one head as wide as the channels, GroupNorm(32, eps 1e-6), residual, biases), its to_q/to_k/to_v
    weights concatenated into qkv_weight, on an NCHW input."""
    attention_processor = pytest.importorskip("diffusers.models.attention_processor")
    c = 64
    torch.manual_seed(0)
    attn = attention_processor.Attention(
        c,
        heads=1,
        dim_head=c,
        rescale_output_factor=1.0,
        eps=1e-6,
        norm_num_groups=32,
        spatial_norm_dim=None,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    ).to(DEVICE)
    with torch.no_grad():
        attn.group_norm.weight.add_(0.1 * torch.randn(c, device=DEVICE))
        attn.group_norm.bias.add_(0.1 * torch.randn(c, device=DEVICE))
    x = draw((2, c, 4, 4) if backend == "triton" and TRITON_INTERPRETED else (2, c, 8, 8), torch.float32, 50)
    qkv_weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
    qkv_bias = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
    norm = attn.group_norm
    with torch.no_grad():
        want = attn(x)
        got = attention_block(
            x, norm.weight, norm.bias, qkv_weight, qkv_bias, attn.to_out[0].weight, attn.to_out[0].bias,
            num_groups=32, eps=1e-6, backend=backend,
        )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_block_under_autocast(channels_last):
    """bf16 autocast with fp32 x and weights (the trainer's setting): y in fp32 like the reference's
    (the residual added in fp32), within bf16 error of the exact block."""
    x = draw((2, 32, 4, 4), torch.float32, 70)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = block_params(32, torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = attention_block(x, *params)
        ref = reference.attention_block(x, *params)
    exact = reference.attention_block(x.double(), *[p.double() for p in params])
    assert y.dtype == ref.dtype == torch.float32
    err, ref_err = ((t.double() - exact).abs().max().item() for t in (y, ref))
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)


def test_block_compiles_fullgraph():
    """torch.compile(fullgraph=True) of the block's forward and backward (the U-Net is compiled):
    one graph, the same values and gradients as the reference."""
    x = draw((2, 32, 4, 4), torch.float32, 60).requires_grad_()
    params = [p.requires_grad_() for p in block_params(32, torch.float32)]
    fn = torch.compile(lambda x, *p: attention_block(x, *p).square().sum(), fullgraph=True)
    got = fn(x, *params)
    got_grads = torch.autograd.grad(got, (x, *params))
    want = reference.attention_block(x, *params).square().sum()
    want_grads = torch.autograd.grad(want, (x, *params))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


# ------------------------------------------------------------------ bad inputs
def test_bad_attention_inputs():
    q = torch.zeros(1, 2, 16, 32)
    with pytest.raises(ValueError, match="k has shape"):
        attention(q, torch.zeros(1, 2, 16, 64), torch.zeros(1, 2, 16, 64))
    with pytest.raises(ValueError, match="k has shape"):
        attention(q, torch.zeros(1, 1, 16, 32), torch.zeros(1, 1, 16, 32))
    with pytest.raises(ValueError, match="v has shape"):
        attention(q, q, torch.zeros(1, 2, 15, 32))
    with pytest.raises(ValueError, match="no keys"):
        attention(q, q[:, :, :0], q[:, :, :0])
    with pytest.raises(ValueError, match="head_dim 513"):
        big = torch.zeros(1, 1, 16, 513)
        attention(big, big, big)
    with pytest.raises(ValueError, match=r"\(batch, heads, seq, head_dim\)"):
        attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="float32"):
        attention(q.long(), q.long(), q.long())
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match="one device"):
        attention(q, q.to("meta"), q)
    with pytest.raises(TypeError, match="torch.Tensor"):
        attention(q, q, [1.0])
    with pytest.raises(ValueError, match="scale"):
        attention(q, q, q, -1.0)
    with pytest.raises(ValueError, match="unknown backend 'cpp' for attention.*no C\\+\\+ kernel"):
        attention(q, q, q, backend="cpp")
    if TRITON:
        with pytest.raises(TypeError, match="float64"):
            qd = q.double().to(DEVICE)
            attention(qd, qd, qd, backend="triton")
    else:
        with pytest.raises(RuntimeError, match="not available"):
            attention(q, q, q, backend="triton")


def test_bad_block_inputs():
    x = torch.zeros(1, 32, 2, 2)
    p = block_params(32, torch.float32)
    p = [t.cpu() for t in p]
    with pytest.raises(ValueError, match="qkv_weight must have shape"):
        attention_block(x, p[0], p[1], p[4], p[3], p[4], p[5])
    with pytest.raises(ValueError, match="proj_weight must have shape"):
        attention_block(x, p[0], p[1], p[2], p[3], p[2], p[5])
    with pytest.raises(ValueError, match="num_heads"):
        attention_block(x, *p, num_heads=3)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        attention_block(x[0, 0], *p)
    with pytest.raises(TypeError, match="qkv_bias must be a torch.Tensor or None"):
        attention_block(x, p[0], p[1], p[2], 1.0, p[4], p[5])
    with pytest.raises(ValueError, match="norm_weight is on meta"):
        attention_block(x, p[0].to("meta"), *p[1:])
    with pytest.raises(ValueError, match="num_groups"):
        attention_block(x, *p, num_groups=5)
