"""The generator U-Net and the PatchGAN discriminator: shapes, sizes, dropout, BN folding."""

import pytest
import torch

from generator.config import PRESETS
from generator.discriminator import PatchDiscriminator
from generator.unet import UNet, fold_batchnorm, levels_for, parameter_count


def test_paper_preset_parameter_counts_match_the_paper_sizes():
    with torch.device("meta"):  # no memory, no forward pass
        at_256 = parameter_count(UNet(256, 11, PRESETS["paper"].ngf))
        at_512 = parameter_count(UNet(512, 11, PRESETS["paper"].ngf))
    assert 64.5e6 < at_256 < 65.5e6
    assert 79.3e6 < at_512 < 80.3e6


def test_paper_preset_structure():
    with torch.device("meta"):
        net = UNet(256, 11, 64)
        big = UNet(512, 11, 64)
    assert net.in_channels == 99
    assert len(net.down) == 8 and len(big.down) == 9
    first = net.down[0][0]
    assert (first.in_channels, first.out_channels, first.kernel_size, first.stride) == (
        99, 64, (4, 4), (2, 2))
    up = net.up[0]
    assert isinstance(up[0], torch.nn.ConvTranspose2d) and up[0].kernel_size == (4, 4)
    assert any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in up)
    assert isinstance(net.head[-1], torch.nn.Tanh)


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_and_range(size):
    torch.manual_seed(0)
    net = UNet(size, 11, 8)
    out = net(torch.rand(2, 99, size, size))
    assert out.shape == (2, 3, size, size)
    assert out.abs().max() <= 1.0


def test_tiny_preset_at_256_runs():
    net = UNet(256, 11, PRESETS["tiny"].ngf).eval()
    with torch.inference_mode():
        assert net(torch.rand(1, 99, 256, 256)).shape == (1, 3, 256, 256)


def test_dropout_in_the_first_three_decoder_blocks_only_while_training():
    torch.manual_seed(0)
    net = UNet(32, 11, 8)
    with_dropout = [any(isinstance(m, torch.nn.Dropout) for m in block) for block in net.up]
    assert with_dropout == [True, True, True, False, False]
    x = torch.rand(2, 99, 32, 32)
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))


def test_fold_batchnorm_is_the_same_function():
    torch.manual_seed(0)
    net = UNet(32, 11, 8)
    net.train()
    for _ in range(3):  # give BatchNorm non-trivial running statistics
        net(torch.rand(4, 99, 32, 32))
    net.eval()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 99, 32, 32)
    torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=0)


def test_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match=r"^generator size must be a power of two >= 16, got 96$"):
        levels_for(96)


def test_discriminator_patch_logits():
    d = PatchDiscriminator(8)
    logits = d(torch.rand(2, 9, 64, 64), torch.rand(2, 3, 64, 64) * 2 - 1)
    assert logits.shape == (2, 1, 6, 6)
    with torch.device("meta"):
        assert parameter_count(PatchDiscriminator(64)) == 2_774_849
    assert PatchDiscriminator(64).net(torch.zeros(1, 12, 256, 256)).shape == (1, 1, 30, 30)
