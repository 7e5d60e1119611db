"""Checkpoints: layout, the latest pointer, last-K pruning, atomic saves (an interrupted save leaves
the previous checkpoint loadable), path resolution, loading for sampling, clear errors."""

import json

import pytest
import torch

from ddpm_fast import checkpoint as ckpt
from ddpm_fast.schedule import SchedulerConfig
from ddpm_fast.unet import UNet


def tiny_unet(**overrides) -> UNet:
    kw = dict(in_channels=1, out_channels=1, sample_size=16, num_classes=10)
    kw.update(overrides)
    torch.manual_seed(0)
    return UNet.from_preset("tiny", **kw)


def contents(model: UNet, step: int) -> dict:
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}  # distinct from the raw weights
    return dict(
        model_state=model.state_dict(),
        ema_state=ema,
        model_config=model.config.to_dict(),
        scheduler_config=SchedulerConfig(prediction_type="v_prediction").to_dict(),
        train_config={"steps": step},
        training_state={"step": step, "rng": {"torch": torch.get_rng_state()}},
    )


@pytest.fixture(scope="module")
def model() -> UNet:
    return tiny_unet()


def test_layout_latest_and_keep_last(tmp_path, model):
    for step in (1, 2, 3, 4):
        path = ckpt.save_checkpoint(tmp_path, step, keep_last=2, **contents(model, step))
        assert path == tmp_path / "checkpoints" / f"step_{step:08d}"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step_00000004").iterdir()) == sorted(ckpt.FILES)
    scheduler = json.loads((tmp_path / "checkpoints" / "step_00000004" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDPMScheduler" and scheduler["prediction_type"] == "v_prediction"
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.step == 4 and loaded.training_state["step"] == 4
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model_state[k], v)
        assert torch.equal(loaded.ema_state[k], v * 0.5)
    # no hidden temporary directories left behind
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resave_same_step_replaces_it(tmp_path, model):
    ckpt.save_checkpoint(tmp_path, 5, **contents(model, 5))
    changed = contents(model, 5)
    changed["train_config"] = {"steps": 99}
    ckpt.save_checkpoint(tmp_path, 5, **changed)
    assert ckpt.load_checkpoint(tmp_path).train_config == {"steps": 99}


@pytest.mark.parametrize("fail_at", ["ema.safetensors", "training_state.pt", "rename"])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, model, monkeypatch, fail_at):
    ckpt.save_checkpoint(tmp_path, 1, **contents(model, 1))
    real_save_file, real_torch_save, real_rename = ckpt.save_file, ckpt.torch.save, ckpt.os.rename

    def failing_save_file(tensors, filename, metadata=None):
        if filename.endswith(fail_at):
            with open(filename, "wb") as f:
                f.write(b"partial")  # a half-written file, then the crash
            raise OSError("disk full (injected)")
        return real_save_file(tensors, filename, metadata=metadata)

    def failing_torch_save(obj, f):
        if str(f).endswith(fail_at):
            raise OSError("disk full (injected)")
        return real_torch_save(obj, f)

    def failing_rename(src, dst):
        if fail_at == "rename" and "step_00000002" in str(dst):
            raise OSError("power cut (injected)")
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    monkeypatch.setattr(ckpt.torch, "save", failing_torch_save)
    monkeypatch.setattr(ckpt.os, "rename", failing_rename)
    with pytest.raises(OSError, match="injected"):
        ckpt.save_checkpoint(tmp_path, 2, **contents(model, 2))
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert not (root / "step_00000002").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.step == 1
    assert torch.equal(loaded.ema_state["conv_in.weight"], model.state_dict()["conv_in.weight"] * 0.5)


def test_crash_leftovers_are_ignored_then_cleaned(tmp_path, model):
    ckpt.save_checkpoint(tmp_path, 1, **contents(model, 1))
    root = tmp_path / "checkpoints"
    leftover = root / ".tmp_step_00000002_deadbeef"  # a process killed mid-save (no cleanup ran)
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert ckpt.resolve_checkpoint(tmp_path) == root / "step_00000001"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000001"]
    ckpt.save_checkpoint(tmp_path, 2, **contents(model, 2))
    assert not leftover.exists()


def test_resolve_paths_and_errors(tmp_path, model):
    step_dir = ckpt.save_checkpoint(tmp_path / "run", 3, **contents(model, 3))
    assert ckpt.resolve_checkpoint(tmp_path / "run") == step_dir
    assert ckpt.resolve_checkpoint(tmp_path / "run" / "checkpoints") == step_dir
    assert ckpt.resolve_checkpoint(step_dir) == step_dir
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.resolve_checkpoint(tmp_path / "empty")
    (step_dir / "training_state.pt").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete: missing training_state.pt"):
        ckpt.load_checkpoint(step_dir)
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.save_checkpoint(tmp_path / "run", 4, keep_last=0, **contents(model, 4))


def test_load_for_sampling(tmp_path, model):
    ckpt.save_checkpoint(tmp_path, 7, **contents(model, 7))
    ema_model, scheduler_config = ckpt.load_for_sampling(tmp_path)
    assert isinstance(ema_model, UNet) and not ema_model.training
    assert scheduler_config == SchedulerConfig(prediction_type="v_prediction")
    for k, v in model.state_dict().items():
        assert torch.equal(ema_model.state_dict()[k], v * 0.5)
    raw, _ = ckpt.load_for_sampling(tmp_path, ema=False)
    assert torch.equal(raw.conv_in.weight, model.conv_in.weight)


def test_load_for_sampling_other_config_is_a_clear_error(tmp_path, model):
    step_dir = ckpt.save_checkpoint(tmp_path, 1, **contents(model, 1))
    other = tiny_unet(base_channels=16, num_groups=4).config.to_dict()
    (step_dir / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="do not fit"):
        ckpt.load_for_sampling(tmp_path)
    (step_dir / "config.json").write_text(json.dumps({"not_a_unet_key": 1}))
    with pytest.raises(ValueError, match="not a valid ddpm_fast U-Net config"):
        ckpt.load_for_sampling(tmp_path)


def test_export_pipeline_round_trip(tmp_path, model):
    diffusers = pytest.importorskip("diffusers")
    ckpt.save_checkpoint(tmp_path / "run", 1, **contents(model, 1))
    out = ckpt.export_pipeline(tmp_path / "run", tmp_path / "pipe")
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    ours, scheduler_config = ckpt.load_for_sampling(tmp_path / "run")
    again, again_config = ckpt.load_for_sampling(out)  # the pipeline folder loads back
    assert again_config == scheduler_config
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([3, 900])
    labels = torch.tensor([1, 10])
    with torch.no_grad():
        expected = ours(x, t, labels)
        theirs = pipe.unet(x, t, class_labels=labels).sample
        back = again(x, t, labels)
    assert (theirs - expected).abs().max() / expected.abs().max() < 1e-4
    torch.testing.assert_close(back, expected)
