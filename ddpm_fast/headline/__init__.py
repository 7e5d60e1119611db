"""``ddpm-fast bench --headline``: the speed users feel, in one command and one table.

On one H100/H200 it runs in <= 8 minutes including compilation (items that no longer fit the
time budget are skipped and listed); on the CPU the same rows run at small sizes in under a
minute (the CI smoke test). It prints one table and writes
``benchmarks/results/<device>-<date>-headline.json`` (device, versions, commit, sizes, every
row with its timings, what was skipped and why).

Rows (full sizes; ``Sizes`` in ``run.py`` holds both sets):
  1. sample(): the cifar10 U-Net (random weights, the same in diffusers' UNet2DModel), 256
     images, DDPM 1000 and DDIM 50 steps: ours compiled + CUDA graph under bf16 autocast, vs
     DDPMPipeline / DDIMPipeline with the U-Net in fp16 and fp32. Seconds and images/s.
  2. training step, cifar10, batch 128, bf16: our compiled Trainer vs a train_unconditional-style
     diffusers loop, eager and compiled. Images/s and MFU.
  3. the U-Net alone: forward and forward+backward TFLOP/s and % of peak.
  4. kernels: group_norm_silu vs eager / compiled F.silu(F.group_norm) (and Liger's GroupNorm),
     attention head_dim 64..512 at 256 and 1024 tokens vs SDPA, q_sample / posterior_step per
     call at 256x3x32x32 and back-to-back at 64x3x512x512 vs the eager and compiled reference.

Every number is measured in the run that prints it; the only constants are the datasheet FLOP
peaks (``measure.NOMINAL_BF16_FLOPS``) and the issue's targets the run is checked against.
"""

from .run import FULL, SIZES, SMALL, Sizes, run_headline

__all__ = ["FULL", "SIZES", "SMALL", "Sizes", "run_headline"]
