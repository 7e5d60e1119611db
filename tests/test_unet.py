"""ddpm_fast.UNet: equivalence with diffusers' UNet2DModel (the oracle) on small configs and once on the
full DDPM-CIFAR10 config, weights round trips (diffusers objects and folders, our checkpoints), the fused
ops against the reference ops (forward and gradients, fp32 and bf16 autocast), preset parameter counts,
torch.compile(fullgraph=True) forward and backward, variants (class labels, learned variance, scale-shift)
and bad configs or inputs. Only the tests that build diffusers models take the ``diffusers`` fixture (they
skip where it is missing); diffusers' configs are plain dicts, converted without it."""

import json
import logging

import pytest
import torch
from conftest import assert_close_to_reference

from ddpm_fast import UNet, UNetConfig
from ddpm_fast.unet import PRESETS
from ddpm_fast.unet_diffusers import config_from_diffusers, config_to_diffusers

logging.getLogger("diffusers").setLevel(logging.ERROR)  # attention_head_dim=None warns on every block

DDPM_CIFAR10 = dict(  # google/ddpm-cifar10-32's config.json
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    norm_num_groups=32,
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    attention_head_dim=None,
    dropout=0.1,
)
SMALL = dict(  # the CIFAR-10 model's structure (DDPM options, skip widths, 4x4 middle) at 16x16, width 32
    DDPM_CIFAR10,
    sample_size=16,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)
VARIANTS = {
    "ddpm": SMALL,
    # improved-diffusion style: scale-shift, classes (+ null row), learned variance, 8-wide heads, odd
    # diffusers defaults (flip_sin_to_cos, freq_shift 0, padding 1, eps 1e-5), attention at the top level
    "scale_shift_classes": dict(
        sample_size=16,
        in_channels=3,
        out_channels=6,
        block_out_channels=(32, 64),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        layers_per_block=2,
        norm_num_groups=8,
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=5,
        time_embedding_dim=96,
    ),
    "no_mid_attention": dict(
        SMALL, add_attention=False, down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3
    ),
}


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter (norm weights, biases and zero-initialised ones too) by seeded noise, so
    that a mapping or arithmetic mistake cannot hide behind an init value of 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = 0.3 if p.dim() == 1 else 0.5 * p.std().clamp(min=0.02).item()
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def make_diffusers(diffusers, config: dict, seed: int = 0):
    """A diffusers UNet2DModel of ``config`` with perturbed weights, in eval mode."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    perturb_(model, seed + 1)
    return model


def inputs(config: dict, n: int = 2, seed: int = 0, classes: bool = False):
    g = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    x = torch.randn(n, config.get("in_channels", 3), size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    labels = torch.randint(0, config["num_class_embeds"], (n,), generator=g) if classes else None
    return x, t, labels


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ equivalence with diffusers
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_diffusers_small(diffusers, variant):
    cfg = VARIANTS[variant]
    theirs = make_diffusers(diffusers, cfg)
    ours = UNet.from_diffusers(theirs).eval()
    classes = "num_class_embeds" in cfg
    x, t, labels = inputs(cfg, classes=classes)
    with torch.no_grad():
        want = theirs(x, t, class_labels=labels).sample
        got = ours(x, t, class_labels=labels)
        got_cl = ours(x.to(memory_format=torch.channels_last), t, class_labels=labels)
        got_1 = ours(x[1:], t[1:], class_labels=None if labels is None else labels[1:])
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-4
    assert rel_err(got_cl, want) < 1e-4
    assert rel_err(got_1, want[1:]) < 1e-4
    # back to diffusers: the same config and bit-identical tensors
    back = ours.to_diffusers()
    assert_same_state(back.state_dict(), theirs.state_dict())
    for key, value in theirs.config.items():
        if not key.startswith("_") and key != "num_train_timesteps":
            want_value = list(value) if isinstance(value, tuple) else value
            got_value = back.config[key]
            assert (list(got_value) if isinstance(got_value, tuple) else got_value) == want_value, key


def test_matches_diffusers_cifar10(diffusers):
    """The full google/ddpm-cifar10-32 architecture (35.7M parameters, one head, middle attention at
    4x4, GroupNorm over 384/512-channel skip concatenations, (0, 1, 0, 1) downsampling pad)."""
    theirs = make_diffusers(diffusers, DDPM_CIFAR10, seed=3)
    ours = UNet.from_diffusers(theirs).eval()
    assert ours.config == UNet.from_preset("cifar10", dropout=0.1).config
    assert sum(p.numel() for p in ours.parameters()) == 35_746_307
    widths = {m.num_channels for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert {384, 512} <= widths
    x, t, _ = inputs(DDPM_CIFAR10, n=2, seed=4)
    with torch.no_grad():
        err = rel_err(ours(x, t), theirs(x, t).sample)
    assert err < 1e-4, err
    assert_same_state(ours.to_diffusers().state_dict(), theirs.state_dict())


def test_from_diffusers_folder(diffusers, tmp_path):
    theirs = make_diffusers(diffusers, SMALL, seed=5)
    theirs.save_pretrained(tmp_path / "pipe" / "unet")
    x, t, _ = inputs(SMALL, seed=6)
    with torch.no_grad():
        want = UNet.from_diffusers(theirs).eval()(x, t)
        for path in (
            tmp_path / "pipe" / "unet",
            tmp_path / "pipe",
            tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors",
        ):
            assert torch.equal(UNet.from_diffusers(str(path)).eval()(x, t), want)
    with pytest.raises(FileNotFoundError, match="config.json"):
        UNet.from_diffusers(tmp_path)


def test_learned_variance_inferred_or_given():
    cfg = dict(SMALL, out_channels=6)
    assert config_from_diffusers(cfg).learned_variance
    assert config_from_diffusers(cfg).out_channels == 3
    plain = config_from_diffusers(cfg, learned_variance=False)
    assert not plain.learned_variance and plain.out_channels == 6
    assert config_to_diffusers(plain)["out_channels"] == config_to_diffusers(config_from_diffusers(cfg))["out_channels"]


@pytest.mark.parametrize(
    "change, option",
    [
        (dict(time_embedding_type="fourier"), "time_embedding_type"),
        (dict(center_input_sample=True), "center_input_sample"),
        (dict(mid_block_scale_factor=2.0), "mid_block_scale_factor"),
        (dict(downsample_type="resnet"), "downsample_type"),
        (dict(upsample_type="resnet"), "upsample_type"),
        (dict(act_fn="gelu"), "act_fn"),
        (dict(class_embed_type="timestep"), "class_embed_type"),
        (dict(mid_block_type=None), "mid_block_type"),
        (dict(resnet_time_scale_shift="scale_shift"), "attn_norm_num_groups"),
        (dict(attn_norm_num_groups=4), "attn_norm_num_groups"),
        (dict(down_block_types=("DownBlock2D", "SkipDownBlock2D", "DownBlock2D")), "down_block_types"),
        (dict(up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")), "up_block_types"),
        (dict(block_out_channels=(32, 48, 64)), "block_out_channels"),
        (dict(sample_size=(16, 32)), "sample_size"),
    ],
)
def test_unsupported_diffusers_options(change, option):
    with pytest.raises(ValueError, match=option):
        config_from_diffusers({**SMALL, **change})


def test_unknown_diffusers_key():
    with pytest.raises(ValueError, match="frobnicate"):
        config_from_diffusers({**SMALL, "frobnicate": 1})


# ------------------------------------------------------------------ fused ops vs reference ops
def _forward_backward(model: UNet, x, t, labels, grad):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x, t, class_labels=labels)
    out.backward(grad.to(out.dtype))
    grads = {"x": x.grad, **{k: p.grad for k, p in model.named_parameters()}}
    return out.detach(), grads


@pytest.mark.parametrize("variant", ["tiny_add", "scale_shift_classes"])
def test_fused_ops_match_reference_ops(variant):
    """The same weights on the fused ops and on ddpm_fast.reference: outputs and every gradient under
    the tolerance rule (errors against the fp64 reference at most 2x the fp32 reference's own)."""
    if variant == "tiny_add":
        fast = UNet.from_preset("tiny", sample_size=16, in_channels=1, num_classes=None)
        labels = None
    else:
        torch.manual_seed(7)
        fast = UNet(config_from_diffusers(VARIANTS["scale_shift_classes"]))
        labels = torch.tensor([0, 4, 2])
    perturb_(fast, 8)
    fast.train()  # dropout is 0: train mode only exercises the training paths
    ref = UNet(fast.config, backend="reference")
    ref.load_state_dict(fast.state_dict())
    ref64 = UNet(fast.config, backend="reference").double()
    ref64.load_state_dict(fast.state_dict())
    g = torch.Generator().manual_seed(9)
    c, s = fast.config.in_channels, 8  # the nets are convolutional: 8x8 inputs keep the fp64 run short
    x = torch.randn(3, c, s, s, generator=g)  # NCHW: the model makes it channels_last
    t = torch.tensor([0, 500, 999])
    grad = torch.randn(3, fast.config.model_out_channels, s, s, generator=g, dtype=torch.float64)

    got, got_g = _forward_backward(fast, x, t, labels, grad)
    want, want_g = _forward_backward(ref, x, t, labels, grad)
    exact, exact_g = _forward_backward(ref64, x.double(), t, labels, grad)
    assert_close_to_reference(got, want, exact)
    for name in exact_g:
        # per sample for x, over the whole tensor for a parameter (its rows are not samples)
        # (a parameter's gradient is a long sum: the reductions' floor)
        flat = (lambda v: v) if name == "x" else (lambda v: v.reshape(1, -1))  # noqa: E731
        try:
            assert_close_to_reference(flat(got_g[name]), flat(want_g[name]), flat(exact_g[name]), reduction=name != "x")
        except AssertionError as err:
            raise AssertionError(f"gradient of {name}: {err}") from None

    # bf16 autocast: convolutions in bf16, norm statistics and softmax in fp32
    fast.eval(), ref.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got16 = fast(x, t, class_labels=labels)
        want16 = ref(x, t, class_labels=labels)
    assert got16.dtype == want16.dtype == torch.bfloat16
    with torch.no_grad():
        exact = ref64.eval()(x.double(), t, class_labels=labels)
    assert_close_to_reference(got16, want16, exact)


# ------------------------------------------------------------------ presets and configs
def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_preset(name: str) -> UNet:
    with torch.device("meta"):
        return UNet.from_preset(name)


def test_preset_parameter_counts():
    """cifar10 has exactly the 35,746,307 parameters of google/ddpm-cifar10-32 (built on the meta device)."""
    counts = {name: parameter_count(meta_preset(name)) for name in PRESETS}
    assert counts["cifar10"] == 35_746_307
    assert counts["celebahq256"] == counts["lsun256"] > 100e6
    assert counts["tiny"] < 2e6
    cfg = UNet.from_preset("cifar10", dropout=0.0).config
    assert (cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks, cfg.attention_resolutions) == (
        128,
        (1, 2, 2, 2),
        2,
        (16,),
    )
    big = PRESETS["celebahq256"]
    assert (big["channel_mult"], big["attention_resolutions"]) == ((1, 1, 2, 2, 4, 4), (16,))


def test_preset_parameter_counts_match_diffusers(diffusers):
    """Every preset has as many parameters as the diffusers UNet2DModel of its exported config."""
    for name in PRESETS:
        ours = meta_preset(name)
        with torch.device("meta"):
            theirs = diffusers.UNet2DModel(**config_to_diffusers(ours.config))
        assert parameter_count(ours) == parameter_count(theirs), name


def test_tiny_demo_overrides():
    model = UNet.from_preset("tiny", in_channels=1, sample_size=16, num_classes=10)
    assert model.in_channels == 1 and model.sample_size == 16 and model.null_class_label == 10
    assert model.config.out_channels == 1 and model.config.attention_resolutions == (8,)
    assert model.class_embed.num_embeddings == 11
    x = torch.randn(2, 1, 16, 16)
    out = model(x, torch.tensor([1, 2]), class_labels=torch.tensor([3, 10]))
    assert out.shape == (2, 1, 16, 16)


def test_config_dict_round_trip():
    cfg = UNet.from_preset("tiny", num_classes=3, learned_variance=True, time_conditioning="scale_shift").config
    d = json.loads(json.dumps(cfg.to_dict()))
    assert UNetConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig keys.*bogus"):
        UNetConfig.from_dict({**d, "bogus": 1})


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(num_groups=24), ValueError, "not divisible by num_groups=24"),
        (dict(base_channels=48), ValueError, r"48 channels \(conv_in output\) is not divisible by num_groups=32"),
        (dict(attention_resolutions=(12,)), ValueError, r"attention_resolutions \[12\] never occur"),
        (dict(sample_size=20), ValueError, "sample_size=20 must be divisible by"),
        (dict(time_conditioning="film"), ValueError, "time_conditioning"),
        (dict(num_heads=3), ValueError, "num_heads=3"),
        (dict(head_channels=48), ValueError, "head_channels=48"),
        (dict(channel_mult=()), ValueError, "channel_mult"),
        (dict(channel_mult=(1.5, 2)), TypeError, "channel_mult"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(num_classes=0), ValueError, "num_classes"),
        (dict(bogus=1), ValueError, "unknown UNetConfig keys"),
    ],
)
def test_bad_configs(overrides, error, match):
    with pytest.raises(error, match=match):
        UNet.from_preset("cifar10", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown U-Net preset 'imagenet'.*cifar10"):
        UNet.from_preset("imagenet")
    with pytest.raises(TypeError, match="UNetConfig"):
        UNet({"sample_size": 32})


# ------------------------------------------------------------------ variants and inputs
def test_class_conditional_learned_variance_shapes():
    model = UNet.from_preset("tiny", sample_size=16, num_classes=4, learned_variance=True).eval()
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([5, 5, 5])
    with torch.no_grad():
        out = model(x, t, class_labels=torch.tensor([0, 3, 4]))
        assert out.shape == (3, 6, 16, 16)
        null = torch.full((3,), model.null_class_label)
        assert torch.equal(model(x, t), model(x, t, class_labels=null))  # None = the null label
        assert not torch.equal(model(x, t, class_labels=torch.tensor([0, 1, 2])), model(x, t))
        assert torch.equal(model(x, 5), model(x, t))  # int and scalar-tensor timesteps broadcast
        assert torch.equal(model(x, torch.tensor(5)), model(x, t))
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 4\]"):
        model(x, t, class_labels=torch.tensor([0, 1, 5]))
    with pytest.raises(TypeError, match="class_labels"):
        model(x, t, class_labels=torch.tensor([0.0, 1.0, 2.0]))


def test_bad_inputs():
    model = UNet.from_preset("tiny", sample_size=16)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, H, W\)"):
        model(torch.randn(2, 1, 16, 16), 1)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(2, 3, 18, 18), 1)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        model(x.to(torch.int64), 1)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(2,\)"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="t must be"):
        model(x, "1")
    with pytest.raises(ValueError, match="unconditional"):
        model(x, 1, class_labels=torch.tensor([0, 1]))


# ------------------------------------------------------------------ checkpoints
def test_save_load_round_trip(tmp_path):
    model = UNet.from_preset("tiny", sample_size=16, num_classes=3)
    perturb_(model, 10)
    model.eval()
    x, t, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 900]), torch.tensor([0, 3])
    with torch.no_grad():
        want = model(x, t, class_labels=labels)
    path = model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    assert UNetConfig.from_dict(json.loads((path / "config.json").read_text())) == model.config
    for source in (path, path / "model.safetensors"):
        loaded = UNet.load(source).eval()
        assert loaded.config == model.config
        assert_same_state(loaded.state_dict(), model.state_dict())
        with torch.no_grad():
            assert torch.equal(loaded(x, t, class_labels=labels), want)
    # saving again replaces the directory, and leaves no temporary siblings
    other = UNet.from_preset("tiny", sample_size=16)
    other.save(path)
    assert UNet.load(path).config == other.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_load_weights_of_another_config(tmp_path):
    UNet.from_preset("tiny", sample_size=16).save(tmp_path / "a")
    small = UNet.from_preset("tiny", sample_size=16, base_channels=16)
    with pytest.raises(ValueError, match="do not fit.*shape mismatches"):
        small.load_weights(UNet.load(tmp_path / "a").state_dict())
    with pytest.raises(ValueError, match="missing.*class_embed"):
        UNet.from_preset("tiny", sample_size=16, num_classes=2).load_weights(UNet.load(tmp_path / "a").state_dict())
    with pytest.raises(FileNotFoundError, match="no U-Net checkpoint"):
        UNet.load(tmp_path / "missing")


# ------------------------------------------------------------------ torch.compile
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's CPU path
def test_compile_fullgraph_forward_backward():
    """The tiny preset compiles with fullgraph=True (any graph break raises), forward and backward,
    and matches eager."""
    torch.manual_seed(11)
    model = UNet.from_preset("tiny", in_channels=1, sample_size=16, num_classes=10)  # the trainer demo's
    perturb_(model, 12)
    x, t, labels = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 10])

    def step(fn):
        model.zero_grad(set_to_none=True)
        out = fn(x, t, class_labels=labels)
        out.square().mean().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    want, want_g = step(model)
    torch._dynamo.reset()
    try:
        got, got_g = step(torch.compile(model, fullgraph=True))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    for k in want_g:
        torch.testing.assert_close(got_g[k], want_g[k], rtol=1e-3, atol=1e-4 * want_g[k].abs().max().item(), msg=k)
