"""The space-time window rule and the training pairs built from it."""

import numpy as np
import pytest
import torch

from generator.dataset import BatchOrder, WindowDataset
from generator.errors import DataError
from generator.synthetic import synthetic_data
from renderer.conditioning import stack_window, window_indices


def test_regular_timestamps_give_the_last_eleven_frames():
    ts = np.arange(30) / 30.0
    assert window_indices(ts, 20, 30.0).tolist() == list(range(10, 21))


def test_before_the_first_frame_the_earliest_repeats():
    ts = np.arange(30) / 30.0
    assert window_indices(ts, 3, 30.0).tolist() == [0] * 8 + [1, 2, 3]
    assert window_indices(ts, 0, 30.0).tolist() == [0] * 11


def test_dropped_frames_do_not_stretch_the_window():
    kept = [k for k in range(40) if k not in (15, 16, 17)]  # three frames dropped
    ts = np.asarray(kept) / 30.0
    t = kept.index(20)
    got = [kept[i] for i in window_indices(ts, t, 30.0)]
    # instants 10..20 frames back; 15, 16, 17 are missing: the frame at or before is 14
    assert got == [10, 11, 12, 13, 14, 14, 14, 14, 18, 19, 20]


def test_the_window_samples_at_the_target_fps_from_a_faster_clock():
    ts = np.arange(120) / 60.0  # 60 fps source, 30 fps target
    assert window_indices(ts, 100, 30.0).tolist() == list(range(80, 101, 2))


def test_float32_timestamps_late_in_a_long_video_stay_on_their_frames():
    ts = (np.arange(18000) / 30.0).astype(np.float32)  # ten minutes
    assert window_indices(ts, 17999, 30.0).tolist() == list(range(17989, 18000))


def test_batches_are_stack_window_of_the_rule():
    data = synthetic_data(frames=24, size=32, dropped=(5, 6))
    dataset = WindowDataset(data, data.train_indices)
    windows, frames = dataset.batch(np.array([0, 7, 12]))
    assert windows.shape == (3, 99, 32, 32) and windows.dtype == torch.float32
    assert frames.shape == (3, 3, 32, 32) and frames.min() >= -1 and frames.max() <= 1
    per_frame = torch.from_numpy(data.conditioning).float() / 255
    for k, i in enumerate([0, 7, 12]):
        want = stack_window(per_frame, window_indices(data.timestamps, i, data.fps))
        torch.testing.assert_close(windows[k], want, atol=0, rtol=0)
    window, frame = dataset[7]
    torch.testing.assert_close(window, windows[1], atol=0, rtol=0)
    assert torch.equal(frame, frames[1])


def test_a_video_shorter_than_the_window_is_refused():
    with pytest.raises(DataError, match=r"^the target has 8 frames, fewer than the window's 11$"):
        synthetic_data(frames=8, size=32)


def test_two_ranks_together_take_the_single_process_batches():
    single = BatchOrder(50, 8, seed=3)
    ranks = [BatchOrder(50, 4, rank=r, world=2, seed=3) for r in range(2)]
    for _ in range(20):  # several epochs
        whole = set(single.next().tolist())
        assert whole == set(ranks[0].next().tolist()) | set(ranks[1].next().tolist())
    assert single.epoch == ranks[0].epoch > 0


def test_batch_order_resumes_from_epoch_and_position():
    straight = BatchOrder(30, 4, seed=1)
    for _ in range(10):
        straight.next()
    resumed = BatchOrder(30, 4, seed=1, epoch=straight.epoch, position=straight.position)
    for _ in range(10):
        assert np.array_equal(straight.next(), resumed.next())
