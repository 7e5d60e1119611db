"""ddpm_fast.evaluate / ddpm-fast eval / fid-stats: the FID and IS maths on accumulated sums, images as a
function of (seed, index), 2 gloo processes == 1 process, a killed run resumed, shard files refused
when damaged or mismatched, the in-training FID, and clear errors for bad inputs.

Everything runs on a tiny class-conditional U-Net at 8x8 (trained 1 step) and the digits classifier
at 8x8 (cached once per module); the Inception network only with random weights on a few images."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast import cli
from ddpm_fast.eval_shards import FeatureAccumulator, ShardError, ShardFile, shard_path
from ddpm_fast.evaluation import KILL_AFTER_FLUSH_ENV, image_seed, quantize_8bit, sample_images
from ddpm_fast.fid_stats import StatsError, load_stats, save_stats
from ddpm_fast.inception import INCEPTION_ENV, INCEPTION_FILE, FIDInceptionV3
from ddpm_fast.metrics import feature_statistics, frechet_distance

ROOT = Path(__file__).resolve().parents[1]
EVAL = {"num_samples": 12, "batch_size": 4, "metric": "classifier_fid", "steps": 3, "progress": False}


def scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's calculate_frechet_distance, transcribed (the oracle when pytorch-fid is absent)."""
    linalg = pytest.importorskip("scipy.linalg")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # (pytorch-fid passes disp=False, deprecated in scipy)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny run directory and a classifier cache shared by the module (also by its subprocesses)."""
    from ddpm_fast.train import TrainConfig, Trainer

    tmp = tmp_path_factory.mktemp("eval")
    cache = tmp / "cache"
    old = os.environ.get("DDPM_FAST_CACHE_DIR")
    os.environ["DDPM_FAST_CACHE_DIR"] = str(cache)
    config = TrainConfig(
        dataset="digits", image_size=8, preset="tiny", class_conditional=True, batch_size=8, steps=1,
        warmup_steps=1, lr=1e-3, sample_images=0, progress=False, device="cpu", out=str(tmp / "run"),
        checkpoint_every=0,
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.train()
    trainer.close()
    yield {"run": tmp / "run", "tmp": tmp, "cache": cache}
    if old is None:
        os.environ.pop("DDPM_FAST_CACHE_DIR", None)
    else:
        os.environ["DDPM_FAST_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def uninterrupted(env):
    return ddpm_fast.evaluate(env["run"], out=env["tmp"] / "full", flush_every_s=0, **EVAL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(env) -> dict:
    return {**os.environ, "DDPM_FAST_CACHE_DIR": str(env["cache"]), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------- maths


def test_fid_of_a_set_against_its_own_statistics_is_zero(tmp_path):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(500, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 32, generator=g).double() + 3
    acc = FeatureAccumulator(32, 0, 500, device=torch.device("cpu"))
    for lo in range(0, 500, 64):  # batches: the sums add up
        acc.add(feats[lo : lo + 64].float(), None, torch.arange(lo, min(lo + 64, 500)))
    mu, sigma = acc.mean_cov()
    ref_mu, ref_sigma = feature_statistics(feats.float())
    torch.testing.assert_close(mu, ref_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sigma, ref_sigma, rtol=1e-10, atol=1e-10)
    save_stats(tmp_path / "s.npz", mu, sigma)
    loaded = load_stats(tmp_path / "s.npz", dim=32)
    assert torch.equal(loaded[0], mu) and torch.equal(loaded[1], sigma)
    assert abs(frechet_distance(mu, sigma, *loaded)) < 1e-6
    # pytorch-fid's own formula (scipy sqrtm) on the same statistics, 1e-6 relative
    other = torch.randn(300, 32, generator=g, dtype=torch.float64) * 1.3
    mu2, sigma2 = feature_statistics(other)
    ours = frechet_distance(mu, sigma, mu2, sigma2)
    assert ours == pytest.approx(scipy_frechet(mu.numpy(), sigma.numpy(), mu2.numpy(), sigma2.numpy()), rel=1e-6)


def test_two_known_gaussians_give_the_closed_form():
    d = 6
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert frechet_distance(mu1, a.diag(), mu2, b.diag()) == pytest.approx(expected, rel=1e-12)
    # a rotated pair (non-diagonal, same eigenbasis): the distance is rotation invariant
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    rotated = frechet_distance(q @ mu1, q @ a.diag() @ q.T, q @ mu2, q @ b.diag() @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-10)
    # s I against any B: tr(sI) + tr(B) - 2 sqrt(s) tr(B^(1/2))
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    big_b = m @ m.T + 0.1 * torch.eye(d, dtype=torch.float64)
    s = 2.5
    root_trace = torch.linalg.eigvalsh(big_b).sqrt().sum()
    expected = float(s * d + torch.trace(big_b) - 2 * s**0.5 * root_trace)
    zero = torch.zeros(d, dtype=torch.float64)
    assert frechet_distance(zero, s * torch.eye(d, dtype=torch.float64), zero, big_b) == pytest.approx(
        expected, rel=1e-10
    )


def test_inception_score_from_sums_matches_the_original_formula():
    g = torch.Generator().manual_seed(2)
    n, k, splits = 103, 7, 4
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    acc = FeatureAccumulator(2, k, n, is_splits=splits, device=torch.device("cpu"))
    order = torch.randperm(n, generator=g)  # the order images arrive in does not matter
    for lo in range(0, n, 10):
        idx = order[lo : lo + 10]
        acc.add(torch.zeros(len(idx), 2), logits[idx], idx)
    # Salimans et al.'s inception_score: contiguous splits, mean and std of exp(E KL(p(y|x) || p(y)))
    preds = torch.softmax(logits, 1).numpy()
    scores = []
    for s in range(splits):
        part = preds[(s * n) // splits : ((s + 1) * n) // splits]
        py = part.mean(0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
    mean, std = acc.inception_score()
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-9)


# ---------------------------------------------------------------- images by index


def test_same_images_per_index_for_any_batch_size(env):
    model, config = ddpm_fast.load_for_sampling(env["run"])
    for scheduler in ("dpmsolver++", "euler_ancestral"):  # deterministic after x_T, and noise every step
        kw = {"scheduler": scheduler, "steps": 3, "seed": 5}
        whole = sample_images(model, config, range(7), **kw)
        parts = torch.cat(
            [sample_images(model, config, range(0, 3), **kw), sample_images(model, config, [3, 4, 5, 6], **kw)]
        )
        alone = sample_images(model, config, [5], **kw)
        assert torch.equal(whole, parts) and torch.equal(whole[5:6], alone)
        assert not torch.equal(whole, sample_images(model, config, range(7), **{**kw, "seed": 6}))
    assert torch.equal(whole, quantize_8bit(whole))  # 8-bit levels, as saved images would be
    assert image_seed(0, 1) != image_seed(0, 2) and image_seed(0, 1) == image_seed(0, 1)


# ---------------------------------------------------------------- the command


def test_evaluate_writes_result_and_stats(env, uninterrupted):
    out = env["tmp"] / "full"
    saved = json.loads((out / "result.json").read_text())
    assert saved["classifier_fid"] == pytest.approx(uninterrupted["classifier_fid"])
    assert saved["settings"]["num_samples"] == 12 and saved["settings"]["scheduler"] == "dpmsolver++"
    assert saved["num_images"] == 12 and saved["classifier_is"] >= 1.0
    mu, sigma = load_stats(out / "samples.npz", dim=64)
    # the same statistics from sample_images + the classifier directly
    from ddpm_fast.metrics import train_classifier

    model, config = ddpm_fast.load_for_sampling(env["run"])
    images = sample_images(model, config, range(12), steps=3)
    classifier = train_classifier("digits", 8, 0, cache_dir=env["cache"])
    with torch.no_grad():
        ref_mu, ref_sigma = feature_statistics(classifier.features(images))
    torch.testing.assert_close(mu, ref_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sigma, ref_sigma, rtol=1e-4, atol=1e-5)
    # a rerun of the same command finds everything done and gives the same figures
    again = ddpm_fast.evaluate(env["run"], out=out, **EVAL)
    assert again["sampled_now"] == 0 and again["classifier_fid"] == uninterrupted["classifier_fid"]


WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import ddpm_fast

    torch.set_num_threads(1)
    ddpm_fast.evaluate(sys.argv[1], out=sys.argv[2], num_samples=12, batch_size=4, metric="classifier_fid", steps=3,
                       progress=False, save_images=True, flush_every_s=0)
    """
)


def test_two_gloo_processes_give_the_statistics_of_one(env, uninterrupted, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    one, two = tmp_path / "one", tmp_path / "two"
    run = [sys.executable, str(script), str(env["run"])]
    proc = subprocess.run([*run, str(one)], capture_output=True, text=True, timeout=300, env=subprocess_env(env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(env["run"]), str(two)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (two / "shards").iterdir()) == [
        "sample-rank000-of-002.pt",
        "sample-rank001-of-002.pt",
    ]
    (mu1, s1), (mu2, s2) = load_stats(one / "samples.npz"), load_stats(two / "samples.npz")
    torch.testing.assert_close(mu2, mu1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s1, rtol=1e-10, atol=1e-10)
    r1, r2 = (json.loads((d / "result.json").read_text()) for d in (one, two))
    # 12 samples of 64 features: a rank-deficient covariance, whose ~1e-14 eigenvalues' square roots
    # (~1e-7) carry the sums' last-bit differences into the FID; the statistics themselves agree to 1e-10
    assert r2["classifier_fid"] == pytest.approx(r1["classifier_fid"], rel=1e-7)
    assert r2["settings"]["world_size"] == 2 and r2["num_images"] == 12
    # the same images per index, and the same as in this process
    names = sorted(p.name for p in (one / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(12)] == sorted(p.name for p in (two / "images").iterdir())
    assert all((one / "images" / n).read_bytes() == (two / "images" / n).read_bytes() for n in names)
    # this process runs 2 threads, the workers 1: the convolutions' low bits may differ
    assert r1["classifier_fid"] == pytest.approx(uninterrupted["classifier_fid"], rel=1e-6)


def test_a_killed_run_resumes_to_the_same_fid(env, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ddpm_fast", "eval", "--checkpoint", str(env["run"]), "--out", str(out),
           "--num-samples", "12", "--batch-size", "4", "--metric", "classifier_fid", "--steps", "3",
           "--flush-every-s", "0", "--no-progress"]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**subprocess_env(env), KILL_AFTER_FLUSH_ENV: "1"}
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (out / "result.json").exists()
    shard = torch.load(shard_path(out, "sample", 0, 1), weights_only=True)
    assert shard["done"] == [[0, 4]] and int(shard["state"]["count"]) == 4
    resumed = ddpm_fast.evaluate(env["run"], out=out, flush_every_s=0, **EVAL)  # the same command again
    assert resumed["sampled_now"] == 8 and resumed["num_images"] == 12
    assert resumed["classifier_fid"] == pytest.approx(uninterrupted["classifier_fid"], rel=1e-12)
    assert resumed["classifier_is"] == pytest.approx(uninterrupted["classifier_is"], rel=1e-12)


def test_mismatched_or_damaged_shards_are_refused(env, uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(env["tmp"] / "full", out)
    path = shard_path(out, "sample", 0, 1)
    with pytest.raises(ShardError, match=r"other settings(.|\n)*steps: 3 in the file, 4 now") as e:
        ddpm_fast.evaluate(env["run"], out=out, **{**EVAL, "steps": 4})
    assert e.value.path == path and str(path) in str(e.value)
    with pytest.raises(ShardError, match=r"other settings(.|\n)*model"):  # another checkpoint: the raw weights
        ddpm_fast.evaluate(env["run"], out=out, weights="raw", **EVAL)
    # sums edited behind the checksum's back
    saved = torch.load(path, weights_only=True)
    saved["state"]["sum"][0] += 1.0
    torch.save(saved, path)
    with pytest.raises(ShardError, match="checksum"):
        ddpm_fast.evaluate(env["run"], out=out, **EVAL)
    path.write_bytes(path.read_bytes()[:1000])  # cut short
    with pytest.raises(ShardError, match="damaged") as e:
        ddpm_fast.evaluate(env["run"], out=out, **EVAL)
    assert str(path) in str(e.value)
    path.unlink()
    other = shard_path(out, "sample", 1, 2)
    other.write_bytes(b"")
    with pytest.raises(ShardError, match="another number of processes"):
        ddpm_fast.evaluate(env["run"], out=out, **EVAL)
    other.unlink()
    # with the damaged file removed, its images are sampled again: the same result
    assert ddpm_fast.evaluate(env["run"], out=out, **EVAL)["classifier_fid"] == uninterrupted["classifier_fid"]


def test_shard_file_round_trip(tmp_path):
    state = {"count": torch.tensor(3), "sum": torch.arange(4.0, dtype=torch.float64)}
    shard = ShardFile(tmp_path / "s.pt", {"a": 1, "b": [1, 2]})
    shard.save([[4, 8], [0, 4], [12, 16]], state)
    fresh = {k: torch.zeros_like(v) for k, v in state.items()}
    assert ShardFile(tmp_path / "s.pt", {"b": [1, 2], "a": 1}).load(fresh) == [[0, 8], [12, 16]]
    assert all(torch.equal(fresh[k], state[k]) for k in state)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert ShardFile(tmp_path / "none.pt", {}).load(fresh) == []


# ---------------------------------------------------------------- fid-stats, Inception, bits/dim


def test_fid_stats_command_and_classifier_fid_against_them(env, uninterrupted, capsys):
    out = env["tmp"] / "digits8.npz"
    code = cli.main(["fid-stats", "--dataset", "digits", "--image-size", "8", "--metric", "classifier_fid",
                     "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0 and "sigma (64, 64) from 360 images" in capsys.readouterr().out
    with np.load(out) as data:  # pytorch-fid's format
        assert data["mu"].dtype == np.float64 and data["mu"].shape == (64,) and data["sigma"].shape == (64, 64)
    # the same reference as the default (the held-out split): the same FID
    again = ddpm_fast.evaluate(env["run"], out=env["tmp"] / "with_ref", ref_stats=out, **EVAL)
    assert again["classifier_fid"] == pytest.approx(uninterrupted["classifier_fid"], rel=1e-9)


def test_inception_network_layout_and_random_weights(env, tmp_path, monkeypatch):
    net = FIDInceptionV3()
    # torchvision's Inception3(num_classes=1008, aux_logits=False): 23,850,960 parameters, its names
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    keys = net.state_dict().keys()
    assert {"Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "fc.weight", "fc.bias"} <= keys
    assert "Mixed_5b.branch5x5_1.bn.num_batches_tracked" in keys and not any(k.startswith("AuxLogits") for k in keys)
    torch.manual_seed(0)
    weights = tmp_path / INCEPTION_FILE
    torch.save(FIDInceptionV3().state_dict(), weights)
    monkeypatch.setenv(INCEPTION_ENV, str(weights))
    result = ddpm_fast.evaluate(env["run"], out=tmp_path / "is", **{**EVAL, "metric": "is", "num_samples": 3})
    assert result["inception_score"] >= 1.0 and result["settings"]["metric"] == "is"
    assert load_stats(tmp_path / "is" / "samples.npz", dim=2048)[0].shape == (2048,)


def test_bits_per_dim_terms_are_summed_by_index(env, tmp_path):
    from ddpm_fast.data import make_dataset
    from ddpm_fast.likelihood import bpd_terms
    from ddpm_fast.schedule import Schedule

    kw = {**EVAL, "num_samples": 2, "batch_size": 2}
    result = ddpm_fast.evaluate(env["run"], out=tmp_path / "nll", nll=True, nll_t_stride=500, nll_num_images=5,
                                nll_batch_size=2, flush_every_s=0, **kw)  # fmt: skip
    nll = result["nll"]
    assert nll["num_images"] == 5 and nll["timesteps_evaluated"] == 2 and nll["split"] == "test"
    model, config = ddpm_fast.load_for_sampling(env["run"])
    data = make_dataset("digits", image_size=8, split="test")
    schedule = Schedule.from_config(config)
    rows = []
    for k, lo in enumerate(range(0, 5, 2)):
        x, y = (torch.stack(t) for t in zip(*[data[i] for i in range(lo, min(lo + 2, 5))], strict=True))
        g = torch.Generator().manual_seed(image_seed(0, k, "nll"))
        rows.append(bpd_terms(model, quantize_8bit(x), schedule, t_stride=500, prediction_type=config.prediction_type,
                              variance_type=config.variance_type, class_labels=y, generator=g))  # fmt: skip
    mean = torch.cat(rows).mean(0)
    assert nll["bpd"] == pytest.approx(float(mean.sum()), rel=1e-10)
    assert nll["prior"] == pytest.approx(float(mean[0]), rel=1e-10)
    assert (tmp_path / "nll" / "shards" / "nll-rank000-of-001.pt").is_file()


# ---------------------------------------------------------------- training


def test_trainer_logs_the_in_training_fid(env, tmp_path):
    import shutil

    from ddpm_fast.train import TrainConfig, train

    run = tmp_path / "run"
    shutil.copytree(env["cache"], run / "eval_cache")  # the run's classifier cache, trained once by the module
    train(TrainConfig(dataset="digits", image_size=8, preset="tiny", batch_size=8, steps=3, warmup_steps=1,
                      sample_images=0, progress=False, device="cpu", out=str(run), checkpoint_every=0, log_every=10,
                      eval_every=2, eval_samples=8, eval_steps=2))  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "classifier_fid" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps, and at the end
    assert all(r["classifier_fid"] > 0 and r["eval_samples"] == 8 for r in evals)
    assert (run / "eval_cache").is_dir()
    with pytest.raises(ValueError, match="classifier FID exists for digits and shapes only"):
        TrainConfig(dataset="folder", data_dir=str(tmp_path), eval_every=10)
    with pytest.raises(ValueError, match="eval-ref-stats"):
        TrainConfig(eval_every=10, eval_inception_weights="w.pth")


def test_in_training_fid_takes_scheduler_options(env, tmp_path):
    """--eval-scheduler-option: the logged FID is the one of the sampler with those options (recomputed
    on the run's final EMA weights), not the plain sampler's, and the record names the options."""
    import shutil

    from ddpm_fast.evaluation import TrainingEval
    from ddpm_fast.train import TrainConfig, _Distributed, train

    run = tmp_path / "run"
    shutil.copytree(env["cache"], run / "eval_cache")
    options = {"solver_order": 1, "use_karras_sigmas": True}
    config = TrainConfig(dataset="digits", image_size=8, preset="tiny", batch_size=8, steps=2, warmup_steps=1,
                         sample_images=0, progress=False, device="cpu", out=str(run), checkpoint_every=0,
                         log_every=10, eval_every=2, eval_samples=8, eval_steps=2,
                         eval_scheduler_options=options)  # fmt: skip
    train(config)
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["step"] == 2 and record["eval_scheduler_options"] == options
    model, scheduler_config = ddpm_fast.load_for_sampling(run)

    def fid(cfg):
        return TrainingEval(cfg, run, torch.device("cpu"), (1, 8, 8), _Distributed("cpu"))(model, scheduler_config, 2)

    again = fid(config)
    assert again["classifier_fid"] == record["classifier_fid"]
    plain = fid(dataclasses.replace(config, eval_scheduler_options=None))
    assert plain["classifier_fid"] != record["classifier_fid"] and "eval_scheduler_options" not in plain


# ---------------------------------------------------------------- bad inputs


def test_scheduler_options_join_the_settings(env, uninterrupted, tmp_path, capsys):
    """Sampler options change the images, join the settings a resume checks and name the default
    output directory; bad ones fail before any sampling, from the API and the command line."""
    import shutil

    model, config = ddpm_fast.load_for_sampling(env["run"])
    options = {"use_karras_sigmas": True, "solver_order": 3}
    plain = sample_images(model, config, range(3), steps=3)
    assert not torch.equal(plain, sample_images(model, config, range(3), steps=3, scheduler_options=options))
    result = ddpm_fast.evaluate(env["run"], scheduler_options=options, flush_every_s=0, **EVAL)
    assert result["settings"]["scheduler_options"] == {"solver_order": 3, "use_karras_sigmas": True}
    out = env["run"] / "eval" / "classifier_fid-ema-dpmsolver++-3-n12-seed0"
    assert (out.parent / f"{out.name}-opts{result_digest(options)}" / "result.json").is_file()
    assert result["classifier_fid"] != uninterrupted["classifier_fid"]
    copy = tmp_path / "copy"  # the run without options: its shards are refused with them
    shutil.copytree(env["tmp"] / "full", copy)
    with pytest.raises(ShardError, match=r"scheduler_options: None in the file, \{'solver_order': 3"):
        ddpm_fast.evaluate(env["run"], out=copy, scheduler_options=options, **EVAL)
    with pytest.raises(ValueError, match="'beta_end' belongs to the noise schedule"):
        ddpm_fast.evaluate(env["run"], out=tmp_path / "bad", scheduler_options={"beta_end": 0.1}, **EVAL)
    assert not (tmp_path / "bad").exists()
    args = ["eval", "--checkpoint", str(env["run"]), "--metric", "classifier_fid", "--out", str(tmp_path / "bad")]
    assert cli.main([*args, "--scheduler-option", "solver_order=4"]) == 2
    assert "solver_order must be 1, 2 or 3, got 4" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def result_digest(options) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(dict(sorted(options.items())), sort_keys=True).encode()).hexdigest()[:8]


def test_bad_inputs_give_clear_errors(env, tmp_path, monkeypatch, capsys):
    run = env["run"]
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=f"{INCEPTION_FILE}(.|\n)*--inception-weights(.|\n)*{INCEPTION_ENV}"):
        ddpm_fast.evaluate(run, out=tmp_path / "a", **{**EVAL, "metric": "is"})
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*not found(.|\n)*pt_inception-2015-12-05"):
        ddpm_fast.evaluate(
            run, out=tmp_path / "a", inception_weights=tmp_path / "missing.pth", **{**EVAL, "metric": "is"}
        )
    with pytest.raises(ValueError, match="needs reference statistics"):
        ddpm_fast.evaluate(run, out=tmp_path / "a", **{**EVAL, "metric": "fid"})
    np.savez(tmp_path / "nomu.npz", mean=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(StatsError, match=r"nomu\.npz holds no mu") as e:
        ddpm_fast.evaluate(run, out=tmp_path / "a", ref_stats=tmp_path / "nomu.npz", **EVAL)
    assert e.value.path == tmp_path / "nomu.npz"
    np.savez(tmp_path / "dim.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(StatsError, match=r"dim\.npz holds 2048-dimensional statistics, but the features here are 64"):
        ddpm_fast.evaluate(run, out=tmp_path / "a", ref_stats=tmp_path / "dim.npz", **EVAL)
    np.savez(tmp_path / "shape.npz", mu=np.zeros(64), sigma=np.eye(63))
    with pytest.raises(StatsError, match=r"sigma \(D, D\)"):
        load_stats(tmp_path / "shape.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(StatsError, match=r"junk\.npz is not a readable npz"):
        load_stats(tmp_path / "junk.npz")
    with pytest.raises(StatsError, match="not found"):
        ddpm_fast.evaluate(run, out=tmp_path / "a", ref_stats=tmp_path / "none.npz", **EVAL)
    with pytest.raises(ValueError, match="num_samples must be an int >= 2, got 0"):
        ddpm_fast.evaluate(run, out=tmp_path / "a", **{**EVAL, "num_samples": 0})
    with pytest.raises(FileNotFoundError, match="expected a run directory"):
        ddpm_fast.evaluate(tmp_path, **EVAL)
    with pytest.raises(ValueError, match="unknown metric"):
        ddpm_fast.evaluate(run, **{**EVAL, "metric": "kid"})
    # the command line: exit status 2 and the message
    assert cli.main(["eval", "--checkpoint", str(run), "--num-samples", "0", "--metric", "classifier_fid"]) == 2
    assert "num_samples must be an int >= 2, got 0" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(tmp_path), "--metric", "classifier_fid"]) == 2
    assert "expected a run directory" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(run), "--weights", "both", "--out", str(tmp_path / "b")]) == 2
    assert "leave --out unset" in capsys.readouterr().err
    assert cli.main(["fid-stats", "--dataset", "folder", "--out", str(tmp_path / "x.npz")]) == 2
    assert "--data-dir" in capsys.readouterr().err
