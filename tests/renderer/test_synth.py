"""The synthetic actor: ground truth, determinism per seed, seeds differ, richer than the
conditioning."""

import numpy as np
import pytest

from renderer.conditioning import ConditioningRenderer, RendererError
from renderer.synth import SynthActor, synthesize
from tracker.face_model import gaze_to_eyelook

S = 48


@pytest.fixture(scope="module")
def clip(face_model):
    return synthesize(face_model, frames=3, size=S, seed=1, supersample=1, texture_size=64)


def test_frames_and_ground_truth(face_model, clip):
    frames, params = clip
    assert frames.shape == (3, S, S, 3) and frames.dtype == np.uint8
    assert params.frames == 3 and params.valid.all()
    assert np.allclose(params.timestamps, np.arange(3) / 25.0)
    assert tuple(params.image_size) == (S, S)
    assert np.allclose(params.principal_point, [S / 2, S / 2])
    assert params.expression.min() >= 0 and params.expression.max() <= 1
    eyelook = params.expression[:, face_model.eyelook_indices]
    assert np.allclose(eyelook, gaze_to_eyelook(params.gaze), atol=1e-6)


def test_same_seed_same_pixels_other_seed_other_actor(face_model, clip):
    frames, params = clip
    again, params2 = synthesize(face_model, frames=3, size=S, seed=1, supersample=1,
                                texture_size=64)
    assert np.array_equal(frames, again)
    assert np.array_equal(params.expression, params2.expression)
    other, params3 = synthesize(face_model, frames=3, size=S, seed=2, supersample=1,
                                texture_size=64)
    assert not np.array_equal(params.identity, params3.identity)
    assert np.abs(frames.astype(int) - other.astype(int)).mean() > 10


def test_motion_talks_blinks_moves_its_eyes_and_head(face_model):
    actor = SynthActor(face_model, seed=0, size=32, texture_size=32, supersample=1)
    p = actor.motion(200, fps=25.0)  # 8 s
    jaw = p.expression[:, face_model.expression_index("jawOpen")]
    blink = p.expression[:, face_model.expression_index("eyeBlink_L")]
    assert jaw.max() > 0.3 and (jaw < 0.05).mean() > 0.2  # speech with pauses
    assert blink.max() > 0.9 and (blink > 0.5).mean() < 0.2  # blinks, eyes mostly open
    assert np.ptp(p.gaze[:, 0, 0]) > 0.2  # gaze shifts
    assert np.ptp(p.rotation[:, 1]) > 0.1 and np.ptp(p.translation[:, 2]) > 0.5
    assert np.allclose(p.sh, actor.sh(p.timestamps), atol=1e-5)
    assert np.allclose(p.sh[0], actor.sh())


def test_actors_have_their_own_focal_length_and_light(face_model):
    """Focal lengths 0.9-2.2 S per actor, the face kept at its size in the frame (the
    distance scales along); the key light's colour and its drift over time vary."""
    from renderer.synth import FOCAL_RANGE

    focal, depth, colour, sh_change = [], [], [], []
    for seed in range(8):
        actor = SynthActor(face_model, seed=seed, size=32, texture_size=16, supersample=1)
        p = actor.motion(250, fps=25.0)
        focal.append(float(p.focal[0]) / 32)
        depth.append(float(p.translation[:, 2].mean()))
        colour.append(actor.look.light_colour)
        sh_change.append(float(np.abs(p.sh - p.sh[:1]).max()))
    focal = np.asarray(focal)
    assert FOCAL_RANGE[0] <= focal.min() and focal.max() <= FOCAL_RANGE[1]
    assert np.ptp(focal) > 0.5
    np.testing.assert_allclose(np.asarray(depth) / focal, 65.0 / 1.6, rtol=0.06)
    assert np.ptp(np.asarray(colour)[:, 0] - np.asarray(colour)[:, 2]) > 0.05
    assert max(sh_change) > 0.01


def test_still_segment_holds_everything(face_model):
    actor = SynthActor(face_model, seed=3, size=32, texture_size=16, supersample=1)
    p = actor.motion(150, fps=25.0, still_seconds=2.0)
    still = actor.still_frames(150, fps=25.0, still_seconds=2.0)
    run = np.nonzero(still)[0]
    assert len(run) == 51 and np.all(np.diff(run) == 1)  # 50 held frames + the one resumed
    for key in ("rotation", "translation", "expression", "gaze", "sh"):
        values = getattr(p, key)[run]
        assert np.array_equal(values, np.broadcast_to(values[0], values.shape)), key
    blink = p.expression[run, face_model.expression_index("eyeBlink_L")]
    assert np.all(blink < 1e-3)
    np.testing.assert_allclose(np.diff(p.timestamps), 0.04, atol=1e-5)
    moving = actor.motion(100, fps=25.0)  # the same motion, resumed after the hold
    np.testing.assert_array_equal(p.rotation[run[-1]:], moving.rotation[run[0]:])
    frames = actor.render(p.select(run[:3]))
    assert np.array_equal(frames[0], frames[2])
    with pytest.raises(RendererError, match="still segment"):
        actor.motion(50, fps=25.0, still_seconds=2.0)


def test_render_is_richer_than_the_conditioning(face_model, clip):
    frames, params = clip
    cond = ConditioningRenderer(face_model, None, S, "cpu")
    mask = cond.masks(params)[:, 0].numpy() > 0
    background = frames[~mask].astype(float)
    assert background.std() > 5  # background, hair and shoulders outside the head mesh
    assert frames[mask].std() > 10


def test_bad_arguments(face_model):
    with pytest.raises(RendererError, match="size must be positive"):
        SynthActor(face_model, size=0)
    actor = SynthActor(face_model, seed=0, size=16, texture_size=16, supersample=1)
    with pytest.raises(RendererError, match="frames must be positive"):
        actor.motion(0)
