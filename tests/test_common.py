"""The eager fast path of the ops (ddpm_fast/ops/_common.py): when the custom op's dispatch may be skipped."""

import pytest
import torch

import ddpm_fast
from ddpm_fast.ops import _common, groupnorm_silu


class _Subclass(torch.Tensor):
    pass


def test_direct_call_ok_takes_plain_tensors_and_parameters_without_autograd():
    x = torch.randn(2, 4)
    weight = torch.nn.Parameter(torch.randn(4))
    assert _common.direct_call_ok(x, None)
    assert not _common.direct_call_ok(x, weight)  # autograd needs the custom op's formula
    with torch.no_grad():
        assert _common.direct_call_ok(x, weight)
    assert not _common.direct_call_ok(x.as_subclass(_Subclass))  # fake / functional tensors are subclasses


def test_module_weights_under_no_grad_skip_the_dispatcher(monkeypatch):
    norm = torch.nn.GroupNorm(2, 4)
    x = torch.randn(2, 4, 5, 5)  # rows of 25 positions: shorter ones train through the reference by default
    expected = ddpm_fast.group_norm_silu(x, 2, norm.weight.detach(), norm.bias.detach(), norm.eps)

    def dispatched(*args, **kwargs):
        raise AssertionError("went through the custom op's dispatch")

    monkeypatch.setattr(groupnorm_silu, "_group_norm_silu_op", dispatched)
    with torch.no_grad():
        y = ddpm_fast.group_norm_silu(x, 2, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(y, expected)
    # with autograd, eager mode records the op's C++ autograd node (cpp backend): no dispatch either
    y = ddpm_fast.group_norm_silu(x, 2, norm.weight, norm.bias, norm.eps)
    assert "GroupNormSiluFunction" in y.grad_fn.name()
    torch.testing.assert_close(y.detach(), expected)
    # while compiling, the custom op is traced (one graph node, the registered formula)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(AssertionError, match="dispatch"):
        ddpm_fast.group_norm_silu(x, 2, norm.weight, norm.bias, norm.eps)
