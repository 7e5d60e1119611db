"""Checkpoints: layout, the latest pointer, last-K pruning, atomic saves (an interrupted save leaves
the previous checkpoint loadable), path resolution, loading for sampling, clear errors; files damaged
after the save (truncated, or one bit flipped): the manifest finds them, a resume falls back to the
newest intact checkpoint, every other load names the file."""

import hashlib
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from ddpm_fast import checkpoint as ckpt
from ddpm_fast.checkpoint import CheckpointError
from ddpm_fast.schedule import SchedulerConfig
from ddpm_fast.train import TrainConfig, train
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
    written = sorted(p.name for p in (tmp_path / "checkpoints" / "step_00000004").iterdir())
    assert written == sorted((*ckpt.FILES, "manifest.json"))
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
    (step_dir / "manifest.json").unlink()  # else the edits below read as damage
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


# ------------------------------------------------------------------ damaged files
def truncate(path: Path) -> None:
    """A copy cut short: the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bit(path: Path) -> None:
    """A bad sector: one bit flipped in the middle of the file, its length kept."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": truncate, "bit-flipped": flip_bit}


def names(path: Path) -> str:
    return re.escape(str(path))


def test_manifest_holds_each_files_checksum(tmp_path, model):
    step_dir = ckpt.save_checkpoint(tmp_path, 1, **contents(model, 1))
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert sorted(manifest) == sorted(ckpt.FILES)
    for name, entry in manifest.items():
        data = (step_dir / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", [*ckpt.FILES, "manifest.json"])
def test_damaged_step_dir_is_an_error_naming_the_file(tmp_path, model, name, damage):
    step_dir = ckpt.save_checkpoint(tmp_path, 1, **contents(model, 1))
    DAMAGE[damage](step_dir / name)
    # a flipped bit in the manifest may land in a checksum: then the file it describes is named
    with pytest.raises(CheckpointError, match=names(step_dir)) as error:
        ckpt.load_checkpoint(step_dir)
    if name != "manifest.json" or damage == "truncated":
        assert error.value.path == step_dir / name
    with pytest.raises(CheckpointError, match=names(error.value.path)):
        ckpt.load_for_resume(step_dir)  # a step directory named explicitly is never replaced by another


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", ["ema.safetensors", "config.json", "scheduler_config.json"])
def test_load_for_sampling_names_the_damaged_file(tmp_path, model, name, damage):
    step_dir = ckpt.save_checkpoint(tmp_path, 1, **contents(model, 1))
    DAMAGE[damage](step_dir / name)
    with pytest.raises(CheckpointError, match=names(step_dir / name)):
        ckpt.load_for_sampling(tmp_path)


def test_load_for_sampling_reads_and_checks_only_what_it_needs(tmp_path, model):
    step_dir = ckpt.save_checkpoint(tmp_path, 1, **contents(model, 1))
    truncate(step_dir / "training_state.pt")
    truncate(step_dir / "model.safetensors")
    ema_model, _ = ckpt.load_for_sampling(tmp_path)
    assert torch.equal(ema_model.conv_in.weight, model.conv_in.weight * 0.5)
    with pytest.raises(CheckpointError, match=names(step_dir / "model.safetensors")):
        ckpt.load_for_sampling(tmp_path, ema=False)


def test_checkpoint_without_manifest_still_loads(tmp_path, model):
    """Written before manifests existed: loads as before; damage is found where parsing finds it."""
    step_dir = ckpt.save_checkpoint(tmp_path, 1, **contents(model, 1))
    (step_dir / "manifest.json").unlink()
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.step == 1 and torch.equal(loaded.model_state["conv_in.weight"], model.conv_in.weight)
    ema_model, _ = ckpt.load_for_sampling(tmp_path)
    assert torch.equal(ema_model.conv_in.weight, model.conv_in.weight * 0.5)
    for name in ckpt.FILES:
        copy = tmp_path / "copy"
        ckpt.shutil.copytree(step_dir, copy)
        truncate(copy / name)
        with pytest.raises(CheckpointError, match=names(copy / name)):
            ckpt.load_checkpoint(copy)
        ckpt.shutil.rmtree(copy)


def damaged_run(tmp_path: Path, model: UNet, damaged: dict[int, str], damage: str, steps=(1, 2, 3)) -> Path:
    for step in steps:
        ckpt.save_checkpoint(tmp_path, step, **contents(model, step))
    for step, name in damaged.items():
        DAMAGE[damage](tmp_path / "checkpoints" / ckpt.step_dir_name(step) / name)
    return tmp_path


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, model, damage):
    run = damaged_run(tmp_path, model, {3: "ema.safetensors", 2: "training_state.pt"}, damage)
    root = run / "checkpoints"
    with pytest.warns(UserWarning, match="resuming from .*step_00000001") as record:
        loaded = ckpt.load_for_resume(run)
    assert loaded.step == 1 and loaded.path == root / "step_00000001"
    message = str(record[0].message)
    assert str(root / "step_00000003" / "ema.safetensors") in message
    assert str(root / "step_00000002" / "training_state.pt") in message
    # the checkpoints directory is a run's too; an intact newest checkpoint loads without a warning
    with pytest.warns(UserWarning, match="resuming from .*step_00000001"):
        assert ckpt.load_for_resume(root).step == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert damaged_run(tmp_path / "intact", model, {}, damage).exists()
        assert ckpt.load_for_resume(tmp_path / "intact").step == 3


def test_resume_with_no_intact_checkpoint_names_every_damaged_file(tmp_path, model):
    run = damaged_run(tmp_path, model, {1: "config.json", 2: "model.safetensors"}, "truncated", steps=(1, 2))
    root = run / "checkpoints"
    with pytest.raises(CheckpointError, match="no intact checkpoint") as error:
        ckpt.load_for_resume(run)
    assert str(root / "step_00000001" / "config.json") in str(error.value)
    assert str(root / "step_00000002" / "model.safetensors") in str(error.value)


def test_resume_skips_checkpoints_newer_than_latest_and_a_lost_pointer(tmp_path, model):
    run = damaged_run(tmp_path, model, {2: "model.safetensors"}, "truncated", steps=(1, 2, 3))
    root = run / "checkpoints"
    (root / "latest").write_text("step_00000002\n")  # step 3: stale (a resume from 2 re-trains it)
    with pytest.warns(UserWarning, match=names(root / "step_00000002" / "model.safetensors")):
        assert ckpt.load_for_resume(run).step == 1
    (root / "latest").unlink()
    with pytest.warns(UserWarning, match="missing or names no checkpoint"):
        assert ckpt.load_for_resume(run).step == 3


# The tiny U-Net on 16x16 digits, a batch of 4 (as in test_train): a step costs ~0.1 s on 2 cores.
def train_config(out: Path, **overrides) -> TrainConfig:
    options = dict(dataset="digits", image_size=16, preset="tiny", batch_size=4, warmup_steps=3, lr=1e-3)
    options.update(ema_decay=0.99, sample_images=0, progress=False, log_every=1, mixed_precision="no")
    return TrainConfig(**{**options, "device": "cpu", "out": str(out), "checkpoint_every": 2, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(train_config(tmp_path_factory.mktemp("whole"), steps=4))


@pytest.mark.parametrize(
    "damage, name, resume",
    [("truncated", "model.safetensors", "auto"), ("bit-flipped", "training_state.pt", "run directory")],
)
def test_trainer_resumes_exactly_from_the_older_checkpoint(tmp_path, uninterrupted, damage, name, resume):
    """4 steps with checkpoints at 2 and 4, step 4 damaged: --resume warns and continues from
    step 2, bit for bit as the uninterrupted run; the damaged checkpoint is written anew."""
    run = tmp_path / "run"
    train(train_config(run, steps=4))
    damaged = run / "checkpoints" / "step_00000004" / name
    DAMAGE[damage](damaged)
    with pytest.warns(UserWarning, match=names(damaged)):
        resumed = train(train_config(run, steps=4, resume="auto" if resume == "auto" else str(run)))
    assert resumed.step == 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 3, 4]  # the resumed run trained steps 3 and 4 again, from step 2
    for mine, theirs in ((resumed.model, uninterrupted.model), (resumed.ema_model, uninterrupted.ema_model)):
        for k, v in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[k], v), k
    assert ckpt.load_checkpoint(run).step == 4  # rewritten intact


def test_trainer_refuses_a_damaged_step_directory(tmp_path):
    run = tmp_path / "run"
    train(train_config(run, steps=2))
    step_dir = run / "checkpoints" / "step_00000002"
    flip_bit(step_dir / "ema.safetensors")
    with pytest.raises(CheckpointError, match=names(step_dir / "ema.safetensors")):
        train(train_config(run, steps=4, resume=str(step_dir)))


# ------------------------------------------------------------------ UNet.save / UNet.load
@pytest.mark.parametrize("damage", DAMAGE)
def test_unet_load_names_the_damaged_file(tmp_path, model, damage):
    path = model.save(tmp_path / "unet")
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(manifest) == ["config.json", "model.safetensors"]
    DAMAGE[damage](path / "model.safetensors")
    for source in (path, path / "model.safetensors"):
        with pytest.raises(CheckpointError, match=names(path / "model.safetensors")):
            UNet.load(source)


def test_unet_load_without_manifest(tmp_path, model):
    path = model.save(tmp_path / "unet")
    (path / "manifest.json").unlink()
    assert torch.equal(UNet.load(path).conv_in.weight, model.conv_in.weight)
    truncate(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=names(path / "model.safetensors")):
        UNet.load(path)


def test_unet_load_with_a_damaged_manifest(tmp_path, model):
    path = model.save(tmp_path / "unet")
    truncate(path / "manifest.json")
    with pytest.raises(CheckpointError, match=names(path / "manifest.json")):
        UNet.load(path)
