"""Training options: learning-rate rule, weak-scaling batch, generator upsampling and input
skip, multi-scale discriminator, feature matching, region weights; resume with them."""

import math

import pytest
import torch

from generator import checkpoint as ckpt
from generator.config import GeneratorConfig
from generator.discriminator import MultiScaleDiscriminator, PatchDiscriminator, make_discriminator
from generator.errors import DataError, PresetError
from generator.synthetic import synthetic_data
from generator.training import Trainer, train
from generator.unet import UNet, fold_batchnorm
from tests.generator.training_testdata import small_config

OPTIONS = {"upsample": "resize", "input_skip": "on", "face_weight": 1.0, "mouth_weight": 2.0,
           "d_scales": 2, "feature_matching": 10.0}



def test_learning_rate_follows_the_square_root_of_the_global_batch():
    paper = GeneratorConfig(preset="paper")
    assert paper.learning_rate(16) == pytest.approx(2e-4)
    assert paper.learning_rate(64) == pytest.approx(4e-4)
    assert GeneratorConfig(preset="tiny", lr=1e-4).learning_rate(1) == pytest.approx(5e-5)
    assert GeneratorConfig(preset="paper", lr_batch=4).learning_rate(64) == pytest.approx(8e-4)


def test_the_preset_batch_is_per_process_unless_the_global_batch_is_set():
    paper = GeneratorConfig(preset="paper")
    assert [paper.global_batch(256, n) for n in (1, 2)] == [64, 128]
    assert [paper.global_batch(512, n) for n in (1, 2)] == [16, 32]
    fixed = GeneratorConfig(preset="paper", batch_size=16)
    assert [fixed.global_batch(256, n) for n in (1, 2)] == [16, 16]


def test_a_bad_switch_and_graph_mode_are_named(data, tmp_path):
    with pytest.raises(PresetError, match=r"^generator.input_skip must be 'on', 'off' or '' "
                       r"\(the preset's\), got 'yes'$"):
        GeneratorConfig(input_skip="yes").preset_values()
    with pytest.raises(DataError, match=r"^unknown generator.train_graph 'always': use auto, "
                       r"on, off$"):
        Trainer(data, small_config(train_graph="always"), tmp_path)
    with pytest.raises(ValueError, match=r"^unknown upsampling 'pixelshuffle': use transpose, "
                       r"resize$"):
        UNet(32, 11, 8, "pixelshuffle")


def test_resize_upsampling_has_no_transposed_convolution_and_folds():
    torch.manual_seed(0)
    net = UNet(32, 11, 8, "resize", input_skip=True)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())
    net.train()
    for _ in range(3):
        net(torch.rand(4, 99, 32, 32))
    net.eval()
    x = torch.rand(2, 99, 32, 32)
    torch.testing.assert_close(fold_batchnorm(net)(x), net(x), atol=1e-5, rtol=0)
    assert net.shape() == {"size": 32, "n_w": 11, "ngf": 8, "upsample": "resize",
                           "input_skip": True}
    assert UNet(32, 11, 8).shape() == {"size": 32, "n_w": 11, "ngf": 8}


def test_the_input_skip_feeds_the_current_frame_to_the_last_convolution():
    torch.manual_seed(0)
    net = UNet(32, 11, 8, input_skip=True).eval()
    conv = net.head[0]
    assert conv.in_channels == 8 + 9
    with torch.no_grad():
        conv.weight[:, :8] = 0.0  # silence the decoder: only the skipped frame is left
    x = torch.rand(2, 99, 32, 32)
    want = torch.tanh(torch.nn.functional.conv2d(x[:, -9:], conv.weight[:, 8:], conv.bias,
                                                 padding=1))
    torch.testing.assert_close(net(x), want, atol=1e-6, rtol=0)


def test_multi_scale_discriminator_features():
    d = make_discriminator(8, 2)
    assert isinstance(d, MultiScaleDiscriminator) and d.shape() == {"ndf": 8, "scales": 2}
    assert isinstance(make_discriminator(8), PatchDiscriminator)
    feats = d.features(torch.rand(2, 9, 64, 64), torch.rand(2, 3, 64, 64))
    assert len(feats) == 2 and [len(f) for f in feats] == [5, 5]
    assert feats[0][-1].shape == (2, 1, 6, 6) and feats[1][-1].shape == (2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"^generator.d_scales must be at least 1, got 0$"):
        make_discriminator(8, 0)


def test_every_option_together_learns_and_resumes_exactly(tmp_path):
    data = synthetic_data(frames=16, size=64)  # the second scale needs 32 px
    config = small_config(**OPTIONS)
    train(data, config, tmp_path / "split", steps=5, progress=False)
    resumed = train(data, config, tmp_path / "split", steps=9, progress=False)
    straight = train(data, config, tmp_path / "straight", steps=9, progress=False)
    assert [h["l1"] for h in resumed.history] == [h["l1"] for h in straight.history[5:]]
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "split"))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "straight"))
    for part in ("generator", "discriminator"):
        assert a[part]["shape"] == b[part]["shape"]
        for key, value in a[part]["state"].items():
            assert torch.equal(value, b[part]["state"][key]), key
    assert a["discriminator"]["shape"] == {"ndf": 8, "scales": 2}
    model = ckpt.load_generator(ckpt.latest_checkpoint(tmp_path / "split"))
    assert model.upsample == "resize" and model.input_skip
    assert all(math.isfinite(h["l1"]) and math.isfinite(h["gan"]) for h in straight.history)


def test_resuming_at_another_global_batch_keeps_the_frames_taken(tmp_path, data, caplog):
    train(data, small_config(batch_size=2), tmp_path, steps=3, progress=False)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    caplog.set_level("WARNING", logger="generator.training")
    trainer = Trainer(data, small_config(batch_size=4), tmp_path)
    assert trainer.order.epoch == state["epoch"]
    assert trainer.order.position == state["batch"] * 2 // 4
    assert trainer.lr == pytest.approx(2e-4)  # tiny: 2e-4 at batch 4
    assert trainer.opt_g.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert "with other training settings" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_captured_step_trains_like_the_eager_one_and_resumes(tmp_path):
    device = torch.device("cuda")
    data = synthetic_data(frames=64, size=64)
    runs = {}
    for mode in ("off", "auto"):
        config = small_config(batch_size=4, train_graph=mode, checkpoint_every=30, **OPTIONS)
        trainer = Trainer(data, config, tmp_path / mode, None, device)
        runs[mode] = trainer.run(60, progress=False)
        assert runs[mode].graph == (mode == "auto")
    for mode, result in runs.items():
        first = sum(h["l1"] for h in result.history[:10])
        assert sum(h["l1"] for h in result.history[-10:]) < 0.8 * first, mode
    # both take the same data and start alike: the first eager steps are the same steps
    assert abs(runs["off"].history[0]["l1"] - runs["auto"].history[0]["l1"]) < 1e-3
    resumed = Trainer(data, small_config(batch_size=4, train_graph="auto", **OPTIONS),
                      tmp_path / "auto", None, device)
    assert resumed.step == 60 and resumed.run(70, progress=False).step == 70
