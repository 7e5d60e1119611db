"""ddpm_fast.inception (plain-torch FID Inception-v3) against pytorch-fid's InceptionV3 with the same random
weights. pytorch-fid is not in the test extra: the test skips without it, and fails under
DDPM_FAST_FID_ORACLE=1 (set by .ci/run's oracle step, which installs pytorch-fid), as
tests/test_metrics.py's oracle test does."""

from __future__ import annotations

from unittest import mock

import torch

from ddpm_fast.inception import FIDInceptionV3, load_inception


def _randomised() -> FIDInceptionV3:
    """Random weights, with BatchNorm statistics and affines away from the identity."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return net.eval()


def test_inception_net_matches_pytorch_fid(tmp_path):
    from test_metrics import import_pytorch_fid_inception

    fid_inception = import_pytorch_fid_inception()
    state = _randomised().state_dict()
    torch.save(state, tmp_path / "pt_inception.pth")
    ours, _ = load_inception(tmp_path / "pt_inception.pth")
    with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: state):
        theirs = fid_inception.InceptionV3([3]).eval()  # pytorch-fid's own fid_inception_v3 loads our file
        full = fid_inception.fid_inception_v3().eval()
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        pool3, logits = ours(images)
        expected = theirs((images + 1) / 2)[0].flatten(1)  # pytorch-fid takes [0, 1]
        # the unbiased logits: torchvision's fc on pool3 without its bias
        expected_logits = full.fc(expected) - full.fc.bias
    torch.testing.assert_close(pool3, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-4)
