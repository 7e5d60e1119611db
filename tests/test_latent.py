"""Latent diffusion: the Autoencoder adapter against diffusers, sample(decode=), the trainer's latent cache
(reuse, invalidation, resume of a killed encode, damage), latent checkpoints and the CLI, bad inputs.

Every test uses a small randomly initialised AutoencoderKL saved to a tmp folder (1 channel in and out,
4 latent channels, downsampling 2: 16x16 digits -> 4x8x8 latents) and an image folder of 12 digits."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ddpm_fast import checkpoint as ckpt  # noqa: E402
from ddpm_fast import latent  # noqa: E402
from ddpm_fast.cli import main as cli_main  # noqa: E402
from ddpm_fast.data import digits_dataset, make_dataset  # noqa: E402
from ddpm_fast.latent import (  # noqa: E402
    Autoencoder,
    LatentCacheError,
    cache_header,
    encode_dataset,
    load_autoencoder,
    load_latent_cache,
)
from ddpm_fast.sampler import sample  # noqa: E402
from ddpm_fast.train import TrainConfig, train  # noqa: E402
from ddpm_fast.unet import UNet, preset_config  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny convolutions are ~100x slower when 2 threads fight a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_vae(folder: Path, seed: int = 0, **config) -> Path:
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        **{"scaling_factor": 0.5, **config},
    )
    vae.save_pretrained(str(folder))
    return folder


def make_folder(root: Path, n: int = 12) -> Path:
    from PIL import Image

    images, _ = digits_dataset(image_size=16, split="all").tensors()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        array = ((images[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(array).save(root / f"{i:03d}.png")
    return root


def files_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_vae(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture
def count_encodes(monkeypatch):
    """Counts Autoencoder.encode calls; ``calls.fail_after = k`` makes call k + 1 raise (a killed encode)."""

    class Calls:
        n = 0
        fail_after = None

    original = Autoencoder.encode

    def counted(self, *args, **kwargs):
        if Calls.fail_after is not None and Calls.n >= Calls.fail_after:
            raise KeyboardInterrupt("killed")
        Calls.n += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Autoencoder, "encode", counted)
    return Calls


def base_config(tmp_path, vae_dir, data_dir, name="run", **overrides) -> TrainConfig:
    options = dict(
        dataset="folder",
        data_dir=str(data_dir),
        image_size=16,
        preset="tiny",
        batch_size=4,
        steps=2,
        warmup_steps=1,
        lr=1e-3,
        ema_decay=0.9,
        sample_images=0,
        progress=False,
        log_every=1,
        mixed_precision="no",
        device="cpu",
        latent_autoencoder=str(vae_dir),
        latent_cache=str(tmp_path / "cache"),
        latent_shard_size=4,
        out=str(tmp_path / name),
    )
    return TrainConfig(**{**options, **overrides})


# ---------------------------------------------------------------- the adapter
def test_autoencoder_matches_diffusers(tmp_path):
    """encode = (mode - shift) * scale, decode = vae.decode(z / scale + shift).sample, chunked, fp32."""
    folder = make_vae(tmp_path / "vae", scaling_factor=0.7, shift_factor=0.1)
    auto = load_autoencoder(folder, chunk_size=3)
    vae = diffusers.AutoencoderKL.from_pretrained(str(folder)).eval()
    x = torch.rand(7, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        want_z = (vae.encode(x).latent_dist.mode() - 0.1) * 0.7
        z = auto.encode(x)
        torch.testing.assert_close(z, want_z, rtol=1e-5, atol=1e-6)
        want_x = vae.decode(z / 0.7 + 0.1).sample
        torch.testing.assert_close(auto.decode(z), want_x, rtol=1e-5, atol=1e-6)
        # a posterior draw: mean + std * the given noise
        noise = torch.randn_like(z)
        dist = vae.encode(x).latent_dist
        torch.testing.assert_close(
            auto.encode(x, posterior="sample", noise=noise), (dist.mean + dist.std * noise - 0.1) * 0.7
        )
    assert auto.record()["class"] == "AutoencoderKL" and auto.identity == latent.autoencoder_identity(folder)


def test_vq_model(tmp_path):
    """A VQModel: latents = encode(x).latents * scale (pre-quantisation, as LDM caches them), decode quantises."""
    torch.manual_seed(0)
    vq = diffusers.VQModel(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=3,
        norm_num_groups=4,
        num_vq_embeddings=16,
        scaling_factor=0.8,
    )
    vq.save_pretrained(str(tmp_path / "vq"))
    auto = load_autoencoder(tmp_path / "vq")
    assert auto.record()["class"] == "VQModel"
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        z = auto.encode(x)
        torch.testing.assert_close(z, vq.eval().encode(x).latents * 0.8)
        torch.testing.assert_close(auto.decode(z), vq.decode(z / 0.8).sample)
    with pytest.raises(ValueError, match="needs an encoder with a posterior"):
        auto.encode(x, posterior="sample", noise=torch.zeros_like(z))


def test_sample_decode_equals_diffusers(vae_dir):
    """sample(decode=vae) == diffusers' decode of sample()'s latents, for a loaded Autoencoder, the raw
    diffusers module and the folder path; output_type applies to the decoded images."""
    torch.manual_seed(0)
    unet = UNet.from_preset("tiny", in_channels=4, sample_size=8).eval()
    vae = diffusers.AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    kw = dict(batch_size=5, num_inference_steps=3, scheduler="ddim", progress=False)
    latents = sample(unet, generator=torch.Generator().manual_seed(1), **kw)
    assert latents.shape == (5, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(latents / vae.config.scaling_factor).sample
    for decode in (load_autoencoder(vae_dir, chunk_size=2), vae, str(vae_dir)):
        images = sample(unet, generator=torch.Generator().manual_seed(1), decode=decode, **kw)
        assert images.shape == (5, 1, 16, 16) and images.dtype == torch.float32
        torch.testing.assert_close(images, want, rtol=1e-5, atol=1e-5)
    array = sample(unet, generator=torch.Generator().manual_seed(1), decode=vae, output_type="np", **kw)
    np.testing.assert_allclose(array, (want / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-5)
    pil = sample(unet, generator=torch.Generator().manual_seed(1), decode=vae, output_type="pil", **kw)
    assert len(pil) == 5 and pil[0].size == (16, 16)


def test_latent_presets():
    for name, side in (("latent32", 32), ("latent64", 64)):
        config = preset_config(name)
        assert (config.in_channels, config.out_channels, config.sample_size) == (4, 4, side)


# ---------------------------------------------------------------- train, cache, checkpoint, CLI
def test_train_sample_decode_end_to_end(tmp_path, vae_dir, data_dir, count_encodes):
    """encode -> train -> checkpoint records the autoencoder -> CLI sample decodes; the second run reuses
    the cache (no encode call), another autoencoder or changed data re-encode into a new directory."""
    first = train(base_config(tmp_path, vae_dir, data_dir, sample_images=4, sample_steps=2))
    assert count_encodes.n == 3  # 12 images, shards of 4
    assert first.model.config.in_channels == 4 and first.model.config.sample_size == 8
    record = ckpt.load_latent_record(first.run_dir)
    assert record["identity"] == latent.autoencoder_identity(vae_dir)
    assert record["latent_shape"] == [4, 8, 8] and record["scaling_factor"] == 0.5
    from PIL import Image

    grid = sorted((first.run_dir / "samples").glob("*.png"))
    assert grid and Image.open(grid[-1]).size[0] > 2 * 16  # decoded 16 px images, scale 2, 2 columns

    # CLI: the recorded autoencoder decodes 16x16 images
    out = tmp_path / "grid.png"
    rc = cli_main(
        ["sample", "--checkpoint", str(first.run_dir), "--out", str(out), "--num-images", "4", "--steps", "2"]
    )
    assert rc == 0 and Image.open(out).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)

    # a second run (another --out, the same cache root): no encode call
    caches = sorted((tmp_path / "cache").iterdir())
    assert len(caches) == 1
    before = files_digest(caches[0])
    count_encodes.n = 0
    train(base_config(tmp_path, vae_dir, data_dir, name="again"))
    assert count_encodes.n == 0

    # another autoencoder's weights: a new cache directory, the old one untouched
    other = make_vae(tmp_path / "vae2", seed=1)
    train(base_config(tmp_path, other, data_dir, name="other"))
    assert count_encodes.n == 3
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert files_digest(caches[0]) == before

    # the dataset changes (one image rewritten): re-encoded into a third directory
    changed = make_folder(tmp_path / "changed")
    from PIL import Image as PILImage

    PILImage.fromarray(np.zeros((16, 16), np.uint8)).save(changed / "005.png")
    count_encodes.n = 0
    train(base_config(tmp_path, vae_dir, changed, name="changed"))
    assert count_encodes.n == 3 and len(list((tmp_path / "cache").iterdir())) == 3

    # resuming with another autoencoder is refused; --autoencoder with other weights is refused by sample
    with pytest.raises(ValueError, match="latent autoencoder differs"):
        train(base_config(tmp_path, other, data_dir, steps=3, resume="auto"))
    with pytest.raises(ValueError, match="is a latent-diffusion checkpoint"):
        ckpt.export_pipeline(first.run_dir, tmp_path / "pipeline")
    with pytest.raises(LatentCacheError, match="not the one the checkpoint was trained with"):
        latent.checkpoint_autoencoder(first.run_dir, autoencoder=other)
    assert latent.checkpoint_autoencoder(first.run_dir, autoencoder=other, check_identity=False) is not None


def test_latent_resume_is_exact(tmp_path, vae_dir, data_dir):
    """2 steps + resume + 2 steps == 4 steps on latents (with hflip: the mirrored images' latents)."""
    whole = train(base_config(tmp_path, vae_dir, data_dir, name="whole", steps=4, hflip=True))
    train(base_config(tmp_path, vae_dir, data_dir, name="split", steps=2, hflip=True))
    resumed = train(base_config(tmp_path, vae_dir, data_dir, name="split", steps=4, hflip=True, resume="auto"))
    for a, b in ((whole.model, resumed.model), (whole.ema_model, resumed.ema_model)):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(va, vb), k


def test_hflip_uses_the_mirrored_images_latents(tmp_path, vae_dir):
    auto = load_autoencoder(vae_dir)
    small = make_dataset("digits", image_size=16, split="test", hflip=True, seed=3)
    small.images, small.labels = small.images[:6], small.labels[:6]
    encode_dataset(tmp_path / "c", auto, small, dataset_name="digits6", hflip=True, shard_size=4)
    cached = load_latent_cache(tmp_path / "c", hflip=True, seed=3)
    flips = [cached.is_flipped(i) for i in range(6)]
    assert any(flips) and not all(flips)
    for i in range(6):
        image = small.images[i : i + 1].clone()
        want = auto.encode(image.flip(-1) if flips[i] else image)[0]
        torch.testing.assert_close(cached[i][0], want)
        assert int(cached[i][1]) == int(small.labels[i])


def test_killed_encode_resumes_at_the_next_missing_shard(tmp_path, vae_dir, data_dir, count_encodes):
    auto = load_autoencoder(vae_dir)
    dataset = make_dataset("folder", image_size=16, root=data_dir)
    count_encodes.fail_after = 1
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(tmp_path / "c", auto, dataset, dataset_name="d", shard_size=4)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["cache.json", "shard_00000.json", "shard_00000.safetensors"]  # no partial files left
    count_encodes.fail_after, count_encodes.n = None, 0
    encode_dataset(tmp_path / "c", auto, dataset, dataset_name="d", shard_size=4)
    assert count_encodes.n == 2  # shards 1 and 2 only
    resumed = load_latent_cache(tmp_path / "c")
    encode_dataset(tmp_path / "whole", auto, dataset, dataset_name="d", shard_size=4)
    assert torch.equal(resumed.latents, load_latent_cache(tmp_path / "whole").latents)
    # posterior="sample": seeded per image, so a resumed encode draws what the uninterrupted one draws
    encode_dataset(tmp_path / "s1", auto, dataset, dataset_name="d", shard_size=4, posterior="sample", seed=5)
    encode_dataset(tmp_path / "s2", auto, dataset, dataset_name="d", shard_size=5, posterior="sample", seed=5)
    s1, s2 = load_latent_cache(tmp_path / "s1"), load_latent_cache(tmp_path / "s2")
    assert torch.equal(s1.latents, s2.latents) and not torch.equal(s1.latents, resumed.latents)


def test_damaged_shard_is_named(tmp_path, vae_dir, data_dir):
    auto = load_autoencoder(vae_dir)
    dataset = make_dataset("folder", image_size=16, root=data_dir)
    encode_dataset(tmp_path / "c", auto, dataset, dataset_name="d", shard_size=4)
    shard = tmp_path / "c" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="shard_00001.safetensors is damaged") as err:
        load_latent_cache(tmp_path / "c")
    assert err.value.path == shard
    # the remedy the message gives: delete it, rerun, only that shard is encoded again
    shard.unlink()
    with pytest.raises(LatentCacheError, match=r"incomplete: shard\(s\) \[1\] missing"):
        load_latent_cache(tmp_path / "c")
    encode_dataset(tmp_path / "c", auto, dataset, dataset_name="d", shard_size=4)
    assert load_latent_cache(tmp_path / "c").latents.shape == (12, 4, 8, 8)


# ---------------------------------------------------------------- bad inputs
def test_cache_of_another_autoencoder_is_refused_and_left_alone(tmp_path, vae_dir, data_dir):
    dataset = make_dataset("folder", image_size=16, root=data_dir)
    encode_dataset(tmp_path / "c", load_autoencoder(vae_dir), dataset, dataset_name="d", shard_size=4)
    before = files_digest(tmp_path / "c")
    other = load_autoencoder(make_vae(tmp_path / "other", seed=1))
    with pytest.raises(LatentCacheError, match=r"encoded from something else:\n  autoencoder.identity"):
        encode_dataset(tmp_path / "c", other, dataset, dataset_name="d", shard_size=4)
    with pytest.raises(LatentCacheError, match="autoencoder.identity"):
        load_latent_cache(tmp_path / "c", expect=cache_header(other, dataset, "d", shard_size=4))
    assert files_digest(tmp_path / "c") == before


def test_not_an_autoencoder_folder(tmp_path, vae_dir, data_dir, capsys):
    unet_dir = tmp_path / "unet"
    UNet.from_preset("tiny", in_channels=1, sample_size=8).to_diffusers().save_pretrained(str(unet_dir))
    with pytest.raises(
        ValueError, match="not a diffusers autoencoder folder: config.json's _class_name is 'UNet2DModel'"
    ):
        load_autoencoder(unet_dir)
    with pytest.raises(FileNotFoundError, match="does not exist .*nothing is downloaded"):
        load_autoencoder(tmp_path / "stabilityai" / "sd-vae-ft-mse")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot read its config.json"):
        load_autoencoder(tmp_path / "empty")
    # the trainer stops before writing anything
    with pytest.raises(ValueError, match="not a diffusers autoencoder folder"):
        train(base_config(tmp_path, unet_dir, data_dir, name="bad"))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "cache").exists()
    args = ["train", "--dataset", "folder", "--data-dir", str(data_dir), "--latent-autoencoder", str(unet_dir)]
    assert cli_main([*args, "--out", str(tmp_path / "bad"), "--device", "cpu", "--no-progress"]) == 2
    assert "not a diffusers autoencoder folder" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_decoder_output_must_be_an_image_batch():
    unet = UNet.from_preset("tiny", in_channels=4, sample_size=8).eval()
    kw = dict(batch_size=2, num_inference_steps=1, scheduler="ddim", progress=False)
    with pytest.raises(ValueError, match=r"expected an image batch \(2, 1 or 3, H, W\)"):
        sample(unet, decode=lambda z: z, **kw)  # 4 channels: latents, not images
    with pytest.raises(ValueError, match=r"expected an image batch"):
        sample(unet, decode=lambda z: z[:1, :3], **kw)
    with pytest.raises(ValueError, match="returned dict, not an"):
        sample(unet, decode=lambda z: {"images": z}, **kw)
    with pytest.raises(TypeError, match="decode must be"):
        sample(unet, decode=3, **kw)


def test_latent_options_checked():
    with pytest.raises(ValueError, match="latent_posterior"):
        TrainConfig(latent_autoencoder="x", latent_posterior="mean")
    with pytest.raises(ValueError, match="decoder term models 8-bit pixels"):
        TrainConfig(latent_autoencoder="x", loss="hybrid", variance_type="learned_range")
    with pytest.raises(ValueError, match="not done for latent runs"):
        TrainConfig(latent_autoencoder="x", eval_every=10)
    with pytest.raises(ValueError, match="identity"):
        cache_header(Autoencoder(encode=lambda x: x), make_dataset("digits", image_size=8, split="test"), "d")
    header = json.dumps(
        cache_header(
            Autoencoder(encode=lambda x: x, identity="i"), make_dataset("digits", image_size=8, split="test"), "d"
        )
    )
    assert "tensors:" in header


DDP_WORKER = """
import os, sys
import torch
from safetensors.torch import save_file
from ddpm_fast.train import TrainConfig, Trainer

vae, data, out, cache = sys.argv[1:]
torch.set_num_threads(1)
config = TrainConfig(dataset="folder", data_dir=data, image_size=16, preset="tiny", batch_size=4, steps=2,
                     warmup_steps=1, lr=1e-3, sample_images=0, progress=False, device="cpu", out=out,
                     mixed_precision="no", latent_autoencoder=vae, latent_cache=cache, latent_shard_size=4)
trainer = Trainer(config)
result = trainer.train()
state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
save_file(state, os.path.join(out, f"rank{trainer.dist.rank}.safetensors"))
trainer.close()
"""


def test_ddp_ranks_share_the_encode(tmp_path, vae_dir, data_dir):
    """2 gloo ranks under torchrun: the shards are split by rank, both train on the whole cache (identical
    parameters), and the cache equals a single-process encode."""
    import subprocess
    import sys

    from safetensors.torch import load_file
    from test_ddp import free_port

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", str(script), str(vae_dir), str(data_dir), str(tmp_path / "run")]
    cmd.append(str(tmp_path / "cache"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / "run" / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    (cache,) = (tmp_path / "cache").iterdir()
    encode_dataset(
        tmp_path / "single",
        load_autoencoder(vae_dir),
        make_dataset("folder", image_size=16, root=data_dir),
        dataset_name=f"folder:{data_dir}",
        shard_size=4,
    )
    torch.testing.assert_close(load_latent_cache(cache).latents, load_latent_cache(tmp_path / "single").latents)
