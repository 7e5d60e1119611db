"""Built-in datasets (digits, shapes, image folder) and the resumable, shardable loader."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import (
    SHAPE_CLASSES,
    FolderDataset,
    flip_decision,
    load_digits_array,
    make_dataset,
    make_loader,
)


def check_item(image: torch.Tensor, label: torch.Tensor, channels: int, size: int) -> None:
    assert image.dtype == torch.float32 and image.shape == (channels, size, size)
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert label.dtype == torch.int64 and label.dim() == 0


# ---------------------------------------------------------------- digits


def test_digits_array_is_sklearn_digits():
    images, labels = load_digits_array()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 16
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_shapes_and_range(size):
    ds = make_dataset("digits", image_size=size)
    assert len(ds) == 1437 and ds.channels == 1 and ds.num_classes == 10 and ds.image_size == size
    for i in (0, 5, len(ds) - 1):
        check_item(*ds[i], 1, size)
    images, labels = ds.tensors()
    assert images.shape == (1437, 1, size, size) and labels.shape == (1437,)
    assert images.min() == -1.0 and images.max() == 1.0  # background is 0 -> -1, ink reaches 16 -> 1
    assert set(labels.tolist()) == set(range(10))


def test_digits_upscaling_matches_interpolate():
    raw, raw_labels = load_digits_array()
    ds = make_dataset("digits", image_size=16, split="all")
    x = torch.from_numpy(raw).float().unsqueeze(1) / 8 - 1
    bilinear = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ds.tensors()[0], bilinear)
    assert ds.tensors()[1].tolist() == raw_labels.tolist()
    nearest = make_dataset("digits", image_size=16, split="all", interpolation="nearest").tensors()[0]
    torch.testing.assert_close(nearest, x.repeat_interleave(2, -1).repeat_interleave(2, -2))


def test_digits_splits_are_disjoint_and_cover():
    raw, _ = load_digits_array()
    train = make_dataset("digits", image_size=8, split="train").tensors()[0]
    test = make_dataset("digits", image_size=8, split="test").tensors()[0]
    assert len(train) + len(test) == len(raw) == 1797 and len(test) == 360
    everything = torch.cat([train, test]).flatten(1)

    # Same multiset of images as the raw array (sort rows to compare regardless of order).
    def canon(t):
        return sorted(map(tuple, t.tolist()))

    assert canon(everything) == canon(torch.from_numpy(raw).float().flatten(1) / 8 - 1)


# ---------------------------------------------------------------- shapes


def test_shapes_content_and_determinism():
    a = make_dataset("shapes", image_size=24, num_images=300, seed=3)
    b = make_dataset("shapes", image_size=24, num_images=300, seed=3)
    c = make_dataset("shapes", image_size=24, num_images=300, seed=4)
    test = make_dataset("shapes", image_size=24, num_images=300, seed=3, split="test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images) and not torch.equal(a.images, test.images)
    assert a.num_classes == len(SHAPE_CLASSES) and a.channels == 3
    assert sorted(set(a.labels.tolist())) == list(range(len(SHAPE_CLASSES)))
    check_item(*a[7], 3, 24)
    # Each image holds a shape: two colours dominate, and the shape covers a sizeable part of it.
    img = a.images[0].flatten(1).T  # (pixels, channels)
    colours, counts = img.unique(dim=0, return_counts=True)
    top2 = counts.sort(descending=True).values[:2]
    assert top2.sum() > 0.7 * img.shape[0] and top2[1] > 0.05 * img.shape[0]
    grey = make_dataset("shapes", image_size=16, num_images=10, channels=1)
    check_item(*grey[0], 1, 16)


def test_shapes_classes_have_their_geometry():
    ds = make_dataset("shapes", image_size=32, num_images=400, seed=0)
    x = ds.images.float()
    # Foreground = pixels differing from the corner (background) colour.
    fg = (x - x[:, :, :1, :1]).abs().sum(1) > 30
    area = fg.flatten(1).sum(1).float()
    rows = fg.any(2).sum(1).float()
    cols = fg.any(1).sum(1).float()
    fill = area / (rows * cols)  # fraction of the bounding box covered
    mean_fill = {k: fill[ds.labels == k].mean().item() for k in range(4)}
    assert mean_fill[1] > 0.95  # square fills its box
    assert 0.72 < mean_fill[0] < 0.85  # circle: pi/4
    assert 0.4 < mean_fill[2] < 0.6  # triangle: 1/2
    assert 0.4 < mean_fill[3] < 0.6  # cross: 1 - 4 * 0.35^2 = 0.51


def test_shapes_are_fast():
    make_dataset("shapes", image_size=32, num_images=64)
    start = time.perf_counter()
    make_dataset("shapes", image_size=32, num_images=4096)
    assert time.perf_counter() - start < 5.0  # well under 1 s here even with 4 other jobs on the 2 cores


# ---------------------------------------------------------------- flips


def test_flips_deterministic_and_real():
    plain = make_dataset("digits", image_size=16)
    flipping = make_dataset("digits", image_size=16, hflip=True, seed=11)
    again = make_dataset("digits", image_size=16, hflip=True, seed=11)
    flipped = {0: 0, 1: 0}
    for i in range(200):
        x, y = flipping[i]
        x0, y0 = plain[i]
        assert torch.equal(x, again[i][0]) and y == y0
        if flipping.is_flipped(i):
            assert torch.equal(x, x0.flip(-1)) and not torch.equal(x, x0)
        else:
            assert torch.equal(x, x0)
        flipped[int(flipping.is_flipped(i))] += 1
    assert 70 < flipped[1] < 130  # a fair coin
    # Another epoch draws other flips; the epoch's flips do not depend on the loading order.
    flipping.set_epoch(1)
    assert [flipping.is_flipped(i) for i in range(200)] != [flipping.is_flipped(i, 0) for i in range(200)]
    assert flip_decision(11, 1, 5) == flipping.is_flipped(5)


# ---------------------------------------------------------------- folder


def write_png(path, size, mode="RGB", value=None):
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    h, w = size
    shape = (h, w) if mode == "L" else (h, w, 4 if mode == "RGBA" else 3)
    arr = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return arr


def test_folder_labelled(tmp_path):
    write_png(tmp_path / "cats" / "a.png", (20, 30))
    write_png(tmp_path / "cats" / "b.jpg", (40, 40))
    write_png(tmp_path / "dogs" / "sub" / "c.png", (12, 12), mode="RGBA")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    ds = make_dataset("folder", image_size=8, root=tmp_path)
    assert ds.class_names == ("cats", "dogs") and ds.num_classes == 2 and len(ds) == 3 and ds.channels == 3
    assert [int(ds[i][1]) for i in range(3)] == [0, 0, 1]
    for i in range(3):
        check_item(*ds[i], 3, 8)


def test_folder_resize_and_center_crop(tmp_path):
    # A 20x60 image, white in columns 16..43 and black elsewhere: the shorter side -> 10, the width
    # -> 30 (white 8..21), the center crop keeps columns 10..19: white only, away from the edges.
    arr = np.zeros((20, 60), np.uint8)
    arr[:, 16:44] = 255
    Image.fromarray(arr, mode="L").save(tmp_path / "x.png")
    ds = make_dataset("folder", image_size=10, root=tmp_path)
    x, y = ds[0]
    assert ds.num_classes is None and int(y) == -1 and ds.channels == 1
    assert x.shape == (1, 10, 10)
    assert (x > 0.95).all()  # only the white middle survives the crop
    # A uniform image stays uniform at the right value whatever the resize.
    write_png(tmp_path / "grey" / "g.png", (33, 17), mode="RGB", value=51)
    grey = FolderDataset(tmp_path / "grey", image_size=8)
    torch.testing.assert_close(grey[0][0], torch.full((3, 8, 8), 51 / 127.5 - 1))


def test_folder_channel_conversion_and_flip(tmp_path):
    write_png(tmp_path / "a.png", (16, 16), mode="L")
    write_png(tmp_path / "b.png", (16, 16), mode="RGB")
    with pytest.raises(ValueError, match="mixes channel counts.*channels=1 or channels=3"):
        make_dataset("folder", image_size=16, root=tmp_path)
    grey = make_dataset("folder", image_size=16, root=tmp_path, channels=1)
    rgb = make_dataset("folder", image_size=16, root=tmp_path, channels=3)
    check_item(*grey[1], 1, 16)
    check_item(*rgb[0], 3, 16)
    flipping = make_dataset("folder", image_size=16, root=tmp_path, channels=3, hflip=True, seed=2)
    for i in range(2):
        expected = rgb[i][0].flip(-1) if flipping.is_flipped(i) else rgb[i][0]
        assert torch.equal(flipping[i][0], expected)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        make_dataset("folder", image_size=8, root=tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images found"):
        make_dataset("folder", image_size=8, root=tmp_path / "empty")
    bad = tmp_path / "bad"
    write_png(bad / "ok.png", (8, 8))
    (bad / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        make_dataset("folder", image_size=8, root=bad)
    both = tmp_path / "both"
    write_png(both / "top.png", (8, 8))
    write_png(both / "cls" / "in.png", (8, 8))
    with pytest.raises(ValueError, match="both at its top level and in subfolders"):
        make_dataset("folder", image_size=8, root=both)
    with pytest.raises(ValueError, match="needs root"):
        make_dataset("folder", image_size=8)
    with pytest.raises(ValueError, match="no held-out split"):
        make_dataset("folder", image_size=8, root=bad, split="test")


def test_folder_truncated_file_named_on_load(tmp_path):
    write_png(tmp_path / "t.png", (64, 64))
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut
    ds = make_dataset("folder", image_size=8, root=tmp_path)
    with pytest.raises(ValueError, match="t.png"):
        ds[0]


def test_make_dataset_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset("cifar", image_size=32)
    with pytest.raises(ValueError, match="split"):
        make_dataset("digits", image_size=16, split="valid")
    with pytest.raises(TypeError, match="image_size"):
        make_dataset("digits", image_size=16.0)
    with pytest.raises(ValueError, match="image_size"):
        make_dataset("digits", image_size=0)
    with pytest.raises(ValueError, match="num_images"):
        make_dataset("digits", image_size=16, num_images=5)
    with pytest.raises(ValueError, match="channels"):
        make_dataset("shapes", image_size=16, channels=2)
    with pytest.raises(ValueError, match="digits have 1 channel"):
        make_dataset("digits", image_size=16, channels=3)
    with pytest.raises(TypeError, match="hflip"):
        make_dataset("digits", image_size=16, hflip=1)
    with pytest.raises(IndexError):
        make_dataset("shapes", image_size=8, num_images=4)[4]


# ---------------------------------------------------------------- loader


def collect(loader, n_batches=None):
    out = []
    for i, (x, y) in enumerate(loader.forever() if n_batches else loader):
        out.append((x, y))
        if n_batches and i + 1 == n_batches:
            break
    return out


def test_loader_batches_and_order():
    ds = make_dataset("shapes", image_size=8, num_images=50, hflip=True)
    loader = make_loader(ds, 8, seed=5)
    assert len(loader) == 6 and loader.samples_per_epoch == 48
    batches = collect(loader)
    assert len(batches) == 6 and all(x.shape == (8, 3, 8, 8) and y.shape == (8,) for x, y in batches)
    order = loader.epoch_indices(0)
    assert sorted(order) == sorted(set(order)) and len(order) == 48
    ds.set_epoch(0)
    expected = torch.stack([ds[i][0] for i in order])
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), expected, rtol=0, atol=0)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["index"] == 0
    # The next epoch has another order; the same seed gives the same order; no global RNG use.
    assert loader.epoch_indices(1) != order
    assert make_loader(ds, 8, seed=5).epoch_indices(0) == order
    rng = torch.get_rng_state()
    collect(make_loader(ds, 8, seed=5, num_workers=0))
    assert torch.equal(rng, torch.get_rng_state())
    unshuffled = make_loader(ds, 8, seed=5, shuffle=False, drop_last=False)
    assert unshuffled.epoch_indices(0) == list(range(50)) and len(unshuffled) == 7
    assert [y.shape[0] for _, y in collect(unshuffled)] == [8] * 6 + [2]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_equals_uninterrupted(num_workers):
    ds = make_dataset("digits", image_size=8, hflip=True, seed=1)
    full = collect(make_loader(ds, 100, seed=3), n_batches=20)  # 14 batches per epoch: crosses epochs
    first = make_loader(ds, 100, seed=3)
    part = collect(first, n_batches=9)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["index"] == 900
    resumed = make_loader(ds, 100, seed=3, num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = collect(resumed, n_batches=11)
    assert len(part) + len(rest) == len(full)
    for (xa, ya), (xb, yb) in zip(full, part + rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # make_loader(epoch=, index=) is the same as load_state_dict.
    direct = collect(make_loader(ds, 100, seed=3, epoch=0, index=900), n_batches=2)
    assert torch.equal(direct[1][0], rest[1][0])
    # A state at the end of an epoch rolls over.
    assert make_loader(ds, 100, seed=3, epoch=0, index=1400).state_dict()["epoch"] == 1


def test_loader_state_mismatch_refused():
    ds = make_dataset("shapes", image_size=8, num_images=40)
    state = make_loader(ds, 4, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        make_loader(ds, 4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 5, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="index"):
        make_loader(ds, 4, seed=1).load_state_dict({"epoch": 0})


def test_loader_ddp_sharding():
    ds = make_dataset("shapes", image_size=8, num_images=41)
    ranks = [make_loader(ds, 4, seed=9, rank=r, world_size=2, drop_last=False) for r in range(2)]
    for epoch in (0, 1):
        a, b = (r.epoch_indices(epoch) for r in ranks)
        assert len(a) == len(b) == 20 and not set(a) & set(b)  # disjoint, equal share
        assert len(set(a) | set(b)) == 40  # one image (41 mod 2) skipped per epoch
    labels = [torch.cat([y for _, y in collect(r)]) for r in ranks]
    assert labels[0].shape == labels[1].shape == (20,)
    # Interleaving the ranks gives the one-process order (rank r takes order[r::2]).
    a, b = (r.epoch_indices(0) for r in ranks)
    assert [i for pair in zip(a, b, strict=True) for i in pair] == make_loader(ds, 4, seed=9).epoch_indices(0)[:40]


def test_loader_bad_arguments():
    ds = make_dataset("shapes", image_size=8, num_images=10)
    with pytest.raises(ValueError, match="not enough for one batch"):
        make_loader(ds, 8, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank must be < world_size"):
        make_loader(ds, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 0, seed=0)
    with pytest.raises(TypeError, match="seed"):
        make_loader(ds, 2, seed=None)
