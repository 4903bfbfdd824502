"""The Bottleneck Attention Module: shapes, and a network that starts as the pretrained one."""

from __future__ import annotations

import pytest

from training.families.bam import BOTTLENECKS, bam_module, insert_bam


def test_bam_shapes_and_identity_at_start():
    import torch

    torch.manual_seed(0)
    module = bam_module(32).eval()
    x = torch.randn(2, 32, 20, 24)
    attention = module.attention(x)
    assert attention.shape == (2, 32, 20, 24)  # channel (N,C,1,1) + spatial (N,1,H,W) broadcast
    assert float(attention.min()) > 0 and float(attention.max()) < 1
    assert torch.equal(module(x), x)  # gate 0: exactly the input
    with torch.no_grad():
        module.gate.fill_(1.0)  # the paper's F * (1 + M(F))
    assert torch.allclose(module(x), x * (1 + attention))


def test_bam_gate_learns():
    import torch

    module = bam_module(16)
    x = torch.randn(4, 16, 12, 12)
    module(x).pow(2).mean().backward()
    assert module.gate.grad is not None and module.gate.grad.abs().item() > 0


def test_inserted_network_equals_the_plain_one_at_start():
    import torch
    import torchvision

    torch.manual_seed(0)
    plain = torchvision.models.mobilenet_v2(weights=None).eval()
    with_bam = torchvision.models.mobilenet_v2(weights=None).eval()
    with_bam.load_state_dict(plain.state_dict())
    insert_bam(with_bam)
    assert len(with_bam.features) == len(plain.features) + len(BOTTLENECKS)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(plain(x), with_bam.eval()(x), atol=1e-6)


@pytest.mark.parametrize("channels", [24, 96])
def test_hidden_width_has_a_floor(channels):
    module = bam_module(channels)
    assert module.channel[1].out_channels == max(channels // 16, 8)
