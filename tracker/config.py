"""Settings of the tracker stage (section `tracker` of the YAML config)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrackerConfig:
    """Tracker settings; every field can be set with `--set tracker.NAME=VALUE`.

    Cost units (see tracker/fitting.py): landmark residuals are in "normalised pixels",
    pixels of a face whose landmarks have an RMS radius of 60 px (a face about 200 px wide),
    so the weights below do not depend on the image size.
    """

    #: Landmark backend: `auto` (the torch port of MediaPipe's models on CUDA, MediaPipe
    #: itself on the CPU, where it is the faster), `mediapipe` (the mediapipe package, CPU)
    #: or `torch` (tracker/landmarks_torch.py, CPU or CUDA).
    landmarks: str = "auto"
    #: The torch backend's networks in float16 on CUDA (float32 on the CPU always). Off: on
    #: an H200 float32 was the faster (live 1.99 vs 2.22 ms, batch 64 4,332 vs 2,859
    #: frames/s) and the closer to MediaPipe (mean 0.03-0.12 % vs 0.10-0.26 % of the
    #: inter-ocular distance).
    landmarks_half: bool = False
    #: The torch backend's stages through torch.compile (inductor): fused kernels; each new
    #: batch size and frame size then waits for a compile (minutes the first time a
    #: machine sees it, seconds from inductor's on-disk cache after that).
    landmarks_compile: bool = False
    #: Offline tracking (dvp track, dvp prepare) with the torch backend: the video is cut
    #: into chunks of `landmarks_chunk` frames, each tracked from its own start (detection
    #: on its first frame), up to `landmarks_streams` chunks side by side per batched call
    #: and at most `landmarks_buffer_mb` MiB of frames held (landmarks_chunk 0: one stream,
    #: frame by frame, as MediaPipe runs).
    landmarks_chunk: int = 100
    landmarks_streams: int = 64
    landmarks_buffer_mb: int = 2048
    #: MediaPipe minimum detection / tracking confidence.
    min_detection_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    #: Faces MediaPipe looks for; the largest is followed (then the same one by overlap).
    max_faces: int = 4
    #: Levenberg-Marquardt iterations per frame when warm-started / cold-started.
    iterations_warm: int = 3
    iterations_cold: int = 12
    #: On CUDA, replay the warm per-frame fit from a captured CUDA graph.
    cuda_graphs: bool = True
    #: Iterations of the joint identity and focal-length fit over the keyframes.
    iterations_calibration: int = 30
    #: Robust (Huber) loss threshold on landmark reprojection, normalised pixels.
    huber_px: float = 3.0
    #: Weight of MediaPipe's face-oval (silhouette) landmarks in the fit, the others 1.
    contour_weight: float = 1.0
    #: Weights of the priors: identity N(0,1) (per coefficient^2), expression ridge (per
    #: coefficient^2), expression sparsity (L1, per unit), expression temporal smoothness
    #: (per coefficient^2 of change from the previous frame).
    identity_weight: float = 10.0
    expression_weight: float = 1.0
    expression_sparsity: float = 2.0
    temporal_weight: float = 10.0
    #: Per-coefficient factors on the sparsity weight, 'name:factor': lips part mostly by
    #: the jaw (jawOpen cheaper than mouthLowerDown), and mouthClose (lips together with the
    #: jaw open) only when the lips say so.
    expression_sparsity_factors: list[str] = field(
        default_factory=lambda: ["jawOpen:0.3", "mouthClose:3"])
    #: Temporal smoothness of the head pose: per degree^2 of rotation and per cm^2 of
    #: translation change from the previous frame (0: none; the One-Euro filter smooths).
    pose_temporal_weight: float = 0.0
    #: Focal length: the starting guess as a multiple of the image's larger side, and the
    #: weight of its log-normal prior during calibration (per log-unit^2).
    focal_guess: float = 1.2
    focal_weight: float = 50.0
    #: Number of keyframes over which identity and focal length are fitted, then frozen.
    keyframes: int = 24
    #: Seconds of live video used to calibrate identity and focal length, and whether the
    #: live calibration (about a second of CPU) runs in a background thread.
    calibration_seconds: float = 2.0
    calibrate_in_background: bool = True
    #: A warm-started frame whose median landmark residual exceeds this (normalised px), or
    #: whose landmark box overlaps the previous one by less than `cut_iou`, restarts from
    #: the regressor (a lost track or a cut).
    restart_residual: float = 4.0
    cut_iou: float = 0.3
    #: Gaze priors: toward looking ahead (per rad^2), coupling of the two eyes' yaw and
    #: pitch (per rad^2 of difference), hold of the previous gaze for a closed eye.
    gaze_prior_weight: float = 20.0
    gaze_coupling_yaw: float = 200.0
    gaze_coupling_pitch: float = 2000.0
    gaze_hold_weight: float = 5000.0
    #: One-Euro filter (tracker/smoothing.py) on pose, expression and gaze: minimum cutoff
    #: (Hz), speed coefficient (Hz per unit of speed; a unit is 1 rad/s of head rotation,
    #: 20 cm/s of translation, 4 coefficients/s of expression, 3 rad/s of gaze), derivative
    #: cutoff (Hz). A minimum cutoff of at least fps / (2 pi) keeps the lag at rest within
    #: one frame (5 Hz: 32 ms).
    smoothing: bool = True
    smoothing_min_cutoff: float = 5.0
    smoothing_beta: float = 20.0
    smoothing_d_cutoff: float = 1.0
    #: Regressor (tracker/regressor.py): training samples, epochs and seed.
    regressor_samples: int = 60000
    regressor_epochs: int = 30
    regressor_seed: int = 0


@dataclass
class TransferConfig:
    """How a source's motion is put on the target (section `transfer`; tracker/transfer.py,
    tracker/ranges.py, docs/tracker.md "Pose ranges")."""

    #: `adapt`: the source's motion from its neutral is scaled into the target's observed
    #: range (per axis of head rotation and translation, narrow expression coefficients,
    #: gaze) and softly limited at the target's extremes; `raw`: as tracked, unchanged.
    range: str = "adapt"
    #: Expression coefficients whose target range ([1st, 99th] percentile) spans less than
    #: this are adapted like the pose; wider ones pass as in `raw`.
    expression_narrow: float = 0.8
    #: The soft limit is the identity up to this fraction of the way from the neutral to the
    #: target's extreme, then bends smoothly (tanh) toward the extreme, never past it.
    soft_knee: float = 0.8
    #: Live: the source's spread is the [1st, 99th] percentile over the last
    #: `spread_seconds` of its frames, recomputed every second once `spread_min_seconds`
    #: are seen (before that only the soft limit acts); the scales follow it with this time
    #: constant (seconds), so they never jump.
    spread_seconds: float = 60.0
    spread_min_seconds: float = 5.0
    spread_smoothing_seconds: float = 2.0
    #: A source frame counts as a resting face for the neutral when the face looks at the
    #: camera within `neutral_frontal_deg`, jawOpen is below `neutral_jaw_open`, both
    #: eyeBlink below `neutral_blink`, and it is still: the head turns slower than
    #: `neutral_rotation_speed_dps` deg/s, moves slower than `neutral_translation_speed_cms`
    #: cm/s, and no expression coefficient changes faster than `neutral_expression_speed`
    #: per second. Live, the neutral is taken from the first `neutral_seconds` of such
    #: frames (or the best frames of the first `neutral_timeout_seconds`).
    neutral_frontal_deg: float = 15.0
    neutral_jaw_open: float = 0.15
    neutral_blink: float = 0.5
    neutral_rotation_speed_dps: float = 20.0
    neutral_translation_speed_cms: float = 5.0
    neutral_expression_speed: float = 1.5
    neutral_seconds: float = 0.5
    neutral_timeout_seconds: float = 10.0
