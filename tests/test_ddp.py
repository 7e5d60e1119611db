"""DistributedDataParallel on CPU: 2 processes on gloo, launched by torchrun, train a few steps of the
tiny U-Net; both ranks must end with identical parameters (and EMA), different from the start, and
rank 0 alone writes the checkpoints."""

import socket
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    from safetensors.torch import save_file
    from ddpm_fast.train import TrainConfig, Trainer

    out = sys.argv[1]
    torch.set_num_threads(1)
    config = TrainConfig(dataset="digits", image_size=16, preset="tiny", class_conditional=True, batch_size=8,
                         steps=3, warmup_steps=2, lr=1e-3, checkpoint_every=2, sample_images=0, progress=False,
                         log_every=1, device="cpu", out=out)
    trainer = Trainer(config)
    assert trainer.dist.world_size == 2 and trainer.micro_batch == 4
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.train()
    rank = trainer.dist.rank
    state = {"model." + k: v.contiguous() for k, v in result.model.state_dict().items()}
    state.update({"ema." + k: v.contiguous() for k, v in result.ema_model.state_dict().items()})
    state.update({"initial." + k: v.contiguous() for k, v in initial.items()})
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    trainer.close()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_hold_identical_parameters(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        str(run),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = load_file(str(run / "rank0.safetensors")), load_file(str(run / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"{k} differs between the ranks"
    assert not torch.equal(rank0["model.conv_in.weight"], rank0["initial.conv_in.weight"])
    # rank 0 wrote the checkpoints (step 2 and the final step 3) and the metrics, once
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_00000002", "step_00000003"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    saved = load_file(str(run / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert torch.equal(saved["conv_in.weight"], rank0["model.conv_in.weight"])
