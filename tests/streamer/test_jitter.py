"""The frame assembler of the project's aiortc receivers (streamer/webrtc/jitter.py) against
packet sequences: completion on the marker bit, the timestamp rule for a missing marker,
out-of-order, duplicated and late packets, sequence wrap-around, loss with and without
retransmission, keyframe waits; then real VP8 and H.264 frames through loss and a decoder."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
from aiortc.codecs import depayload, get_decoder
from aiortc.codecs.vpx import VpxPayloadDescriptor
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from streamer.webrtc.encoders import LowLatencyH264Encoder, LowLatencyVp8Encoder, suited_bitrate
from streamer.webrtc.jitter import FrameAssembler, is_keyframe

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
H264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102)
CODECS = {96: VP8, 102: H264}
TIME_BASE = fractions.Fraction(1, 90000)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def vp8_packet(seq: int, ts: int, marker: bool = False, start: bool | None = None,
               key: bool = False, body: bytes | None = None) -> RtpPacket:
    """A VP8 packet: descriptor (S set on a frame's first packet) and a payload whose first
    byte says key frame (P bit 0) or not; `body` defaults to the sequence number."""
    first = start if start is not None else False
    data = body if body is not None else \
        bytes([0x00 if key else 0x01]) + (seq % 65536).to_bytes(2, "big")
    payload = bytes(VpxPayloadDescriptor(partition_start=int(first), partition_id=0)) + data
    packet = RtpPacket(payload_type=96, marker=int(marker), sequence_number=seq % 65536,
                       timestamp=ts, payload=payload)
    packet._data = depayload(VP8, payload)  # type: ignore[attr-defined]
    return packet


def frame_packets(first_seq: int, ts: int, count: int, key: bool = False) -> list[RtpPacket]:
    return [vp8_packet(first_seq + i, ts, marker=i == count - 1, start=i == 0,
                       key=key and i == 0) for i in range(count)]


def assembler(clock: Clock | None = None) -> FrameAssembler:
    return FrameAssembler(capacity=128, codecs=CODECS, clock=clock or Clock())


def feed(buffer: FrameAssembler, packets: list[RtpPacket]) -> list[tuple[bool, list[int]]]:
    """Add packets one by one; per packet (PLI asked, timestamps of the frames it completed)."""
    out = []
    for packet in packets:
        pli, frame = buffer.add(packet)
        frames = ([frame] if frame is not None else []) + buffer.take_ready()
        out.append((pli, [f.timestamp for f in frames]))
    return out


def test_a_frame_completes_on_its_marker_not_on_the_next_frame() -> None:
    packets = frame_packets(10, 3000, 3, key=True)
    buffer = assembler()
    results = feed(buffer, packets)
    assert results == [(False, []), (False, []), (False, [3000])]
    stock = JitterBuffer(capacity=128, is_video=True)  # aiortc: waits for the next frame
    assert [stock.add(p)[1] for p in packets] == [None, None, None]
    buffer2 = assembler()
    buffer2.add(packets[0]), buffer2.add(packets[1])
    _, frame = buffer2.add(packets[2])
    assert frame is not None and frame.data == b"".join(p._data for p in packets)
    assert frame.keyframe is True and frame.payload_type == 96
    assert buffer.stats.by_marker == 1 and buffer.stats.by_timestamp == 0


def test_without_a_marker_the_next_timestamp_completes_the_frame() -> None:
    first = frame_packets(10, 3000, 2, key=True)
    first[-1].marker = 0  # a sender that does not set it
    second = frame_packets(12, 6000, 1)
    results = feed(assembler(), first + second)
    assert results == [(False, []), (False, []), (False, [3000, 6000])]


def test_out_of_order_and_duplicated_packets() -> None:
    a, b, c, d = frame_packets(10, 3000, 4, key=True)
    buffer = assembler()
    results = []
    for packet in [a, c, b, c, d]:  # c before b, and c twice
        pli, frame = buffer.add(packet)
        results.append((pli, frame))
    assert [r[1] for r in results[:4]] == [None] * 4
    frame = results[4][1]
    assert frame is not None and frame.data == b"".join(p._data for p in (a, b, c, d))
    # the marker packet before the middle one: complete when the middle one comes
    a2, b2, c2 = frame_packets(14, 6000, 3)
    assert feed(buffer, [a2, c2, b2]) == [(False, []), (False, []), (False, [6000])]
    # a duplicate of a frame already out is a late packet: dropped
    assert feed(buffer, [c2, a]) == [(False, []), (False, [])]
    assert buffer.stats.frames == 2 and not any(r[0] for r in results)


def test_sequence_numbers_wrap_around() -> None:
    packets = frame_packets(65534, 3000, 2, key=True) + frame_packets(65536, 6000, 2)
    assert [p.sequence_number for p in packets] == [65534, 65535, 0, 1]
    results = feed(assembler(), packets)
    assert results == [(False, []), (False, [3000]), (False, []), (False, [6000])]


def test_a_retransmission_releases_every_frame_behind_the_gap() -> None:
    key = frame_packets(10, 3000, 2, key=True)
    b1, b2 = frame_packets(12, 6000, 2)
    c = frame_packets(14, 9000, 1)
    d = frame_packets(15, 12000, 1)
    buffer = assembler()
    results = feed(buffer, key + [b2] + c + d + [b1])  # b1 lost, then retransmitted
    assert results[-1] == (False, [6000, 9000, 12000])
    assert all(not r[1] for r in results[2:-1])
    assert buffer.stats.holes_skipped == 0 and buffer.stats.frames == 4


def test_a_gap_not_filled_in_time_is_given_up_and_a_keyframe_awaited() -> None:
    clock = Clock()
    buffer = assembler(clock)
    feed(buffer, frame_packets(10, 3000, 2, key=True))
    b = frame_packets(12, 6000, 2)
    assert feed(buffer, b[1:]) == [(False, [])]  # b's first packet is lost for good
    clock.now += 0.1
    assert feed(buffer, frame_packets(14, 9000, 1)) == [(False, [])]  # within the wait
    clock.now += 0.2  # past HOLE_WAIT_S: given up; 9000 is no keyframe: held back, PLI
    assert feed(buffer, frame_packets(15, 12000, 1)) == [(True, [])]
    assert buffer.stats.holes_skipped == 1 and buffer.stats.held_for_keyframe == 2
    clock.now += 0.1  # another delta frame: held, no new PLI before KEYFRAME_RETRY_S
    assert feed(buffer, frame_packets(16, 15000, 1)) == [(False, [])]
    clock.now += 0.3  # still none: the request is repeated
    assert feed(buffer, frame_packets(17, 18000, 1)) == [(True, [])]
    # the keyframe comes: it and what follows go out again
    assert feed(buffer, frame_packets(18, 21000, 3, key=True) + frame_packets(21, 24000, 1)) \
        == [(False, []), (False, []), (False, [21000]), (False, [24000])]
    assert buffer.stats.keyframe_requests == 2 and buffer.stats.held_for_keyframe == 4


def test_a_late_retransmission_after_the_gap_was_given_up_is_dropped() -> None:
    clock = Clock()
    buffer = assembler(clock)
    feed(buffer, frame_packets(10, 3000, 1, key=True))
    lost = frame_packets(11, 6000, 1)
    feed(buffer, frame_packets(12, 9000, 1))
    clock.now += 0.3
    feed(buffer, frame_packets(13, 12000, 1, key=True))
    assert buffer.stats.holes_skipped == 1
    assert feed(buffer, lost) == [(False, [])]


def test_the_stream_must_start_with_a_keyframe() -> None:
    buffer = assembler()
    # the keyframe's packets were lost before the first one arrived
    assert feed(buffer, frame_packets(20, 3000, 1)) == [(True, [])]
    assert feed(buffer, frame_packets(21, 6000, 2, key=True)) == [(False, []), (False, [6000])]


def test_padding_packets_make_no_frame() -> None:
    buffer = assembler()
    feed(buffer, frame_packets(10, 3000, 1, key=True))
    padding = RtpPacket(payload_type=96, sequence_number=11, timestamp=3000)
    padding._data = b""  # type: ignore[attr-defined]  (as aiortc's receiver sets it)
    assert feed(buffer, [padding] + frame_packets(12, 6000, 1)) == [(False, []),
                                                                    (False, [6000])]
    assert buffer.stats.frames == 2


def test_a_jump_back_in_sequence_numbers_restarts_as_aiortc_does() -> None:
    buffer = assembler()
    feed(buffer, frame_packets(1000, 3000, 1, key=True))
    results = feed(buffer, frame_packets(500, 6000, 1))  # 500 behind: a restart, PLI
    assert results == [(True, [])]  # and its delta frame is held back for a keyframe
    assert feed(buffer, frame_packets(501, 9000, 1, key=True)) == [(False, [9000])]


def test_overflow_drops_whole_frames_and_awaits_a_keyframe() -> None:
    clock = Clock()
    buffer = assembler(clock)
    feed(buffer, frame_packets(10, 3000, 1, key=True))
    feed(buffer, frame_packets(12, 9000, 1))  # 11 never comes
    # past the 128-packet ring: aiortc drops 11 to make room and asks for a keyframe; the
    # delta frame 9000 behind the gap is held back
    results = feed(buffer, frame_packets(11 + 128, 12000, 1))
    assert results == [(True, [])] and buffer.stats.held_for_keyframe == 1
    clock.now += 0.4  # the new gap (13 to 138) is given up; the keyframe after it goes out
    assert feed(buffer, frame_packets(11 + 129, 15000, 1, key=True)) == [(True, [15000])]


def test_keyframe_detection() -> None:
    key = frame_packets(10, 3000, 2, key=True)
    assert is_keyframe("VP8", key) is True
    assert is_keyframe("VP8", frame_packets(10, 3000, 2)) is False
    assert is_keyframe("VP8", key[1:]) is False  # its first packet is missing
    assert is_keyframe("opus", key) is None


# ---- real encoded video through loss --------------------------------------------------------
def moving_frames(count: int, size: int = 160) -> list[av.VideoFrame]:
    """A panning texture with a moving disk (keyframes of several packets; a frame decoded
    on a wrong reference is far from its source)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    noise = rng.normal(0, 12, (size, size, 3))
    frames = []
    for i in range(count):
        waves = 128 + 60 * np.sin((xx + 4 * i) / 7.0)[..., None] \
            * np.cos(yy[..., None] / 5.0 + np.arange(3))
        rgb = np.clip(waves + noise, 0, 255).astype(np.uint8)
        rgb[((xx - 30 - 2 * i) ** 2 + (yy - size // 2) ** 2) < 300] = (255, 200, 40)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = i * 3000, TIME_BASE
        frames.append(frame)
    return frames


def rtp_packets(payloads: list[bytes], seq: int, ts: int, codec: RTCRtpCodecParameters
                ) -> list[RtpPacket]:
    """Packets as aiortc's sender makes them (marker on the last), depayloaded as its
    receiver does."""
    packets = []
    for i, payload in enumerate(payloads):
        packet = RtpPacket(payload_type=codec.payloadType, marker=int(i == len(payloads) - 1),
                           sequence_number=(seq + i) % 65536, timestamp=ts, payload=payload)
        packet._data = depayload(codec, payload)  # type: ignore[attr-defined]
        packets.append(packet)
    return packets


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.mark.parametrize("codec, encoder_class",
                         [(VP8, LowLatencyVp8Encoder), (H264, LowLatencyH264Encoder)],
                         ids=["vp8", "h264"])
def test_real_video_through_loss_decodes_and_recovers(codec: RTCRtpCodecParameters,
                                                      encoder_class: type) -> None:
    """60 frames from the project's encoder, as packets crossing the sequence number wrap.
    Packets 4, 40 and 70 are lost and retransmitted five packets later; packets 15 and 50
    are lost for good. The assembler's PLI makes the next frame a keyframe (as aiortc's
    sender does). Every frame given to the decoder decodes to its own picture (no frame
    built on a missing reference), and decoding resumes after each loss."""
    clock = Clock()
    buffer = FrameAssembler(capacity=512, codecs={codec.payloadType: codec}, clock=clock)
    encoder, decoder = encoder_class(), get_decoder(codec)
    sources = moving_frames(60)
    originals = [f.to_ndarray(format="rgb24") for f in sources]
    retransmitted, lost = {4, 40, 70}, {15, 50}
    seq, counter, force_key = 65520, 0, False
    pending: dict[int, RtpPacket] = {}  # packet counter at which it comes back -> packet
    decoded: list[tuple[int, np.ndarray]] = []
    for frame in sources:
        payloads, ts = encoder.encode(frame, force_keyframe=force_key)
        force_key = False
        packets = rtp_packets(payloads, seq, ts, codec)
        seq += len(packets)
        clock.now += 1 / 30
        for packet in packets:
            counter += 1
            arriving = [] if counter in retransmitted | lost else [packet]
            if counter in retransmitted:
                pending[counter + 5] = packet
            if counter in pending:
                arriving.append(pending.pop(counter))
            for item in arriving:
                pli, out = buffer.add(item)
                force_key = force_key or pli
                for got in ([out] if out is not None else []) + buffer.take_ready():
                    for image in decoder.decode(got):  # aiortc's decoder; raises if broken
                        decoded.append((round(image.pts / 3000),
                                        image.to_ndarray(format="rgb24")))
    assert counter > 80, "expected frames of several packets"
    assert buffer.stats.holes_skipped == 2 and buffer.stats.keyframe_requests >= 2
    indices = [i for i, _ in decoded]
    assert indices == sorted(indices) and indices[-1] == 59
    assert len(decoded) >= 30, f"only {len(decoded)} of 60 frames decoded"
    worst = min(psnr(image, originals[i]) for i, image in decoded)
    assert worst > 20.0, f"a decoded frame is not its source (PSNR {worst:.1f} dB)"


def test_h264_keyframe_detection_on_real_frames() -> None:
    encoder = LowLatencyH264Encoder()
    kinds = []
    for i, frame in enumerate(moving_frames(4)):
        payloads, ts = encoder.encode(frame, force_keyframe=i == 2)
        kinds.append(is_keyframe("H264", rtp_packets(payloads, 0, ts, H264)))
    assert kinds == [True, False, True, False]


def test_vp8_encoder_keyframe_on_request_and_bitrate_for_size() -> None:
    encoder = LowLatencyVp8Encoder()
    kinds = []
    for i, frame in enumerate(moving_frames(4)):
        payloads, ts = encoder.encode(frame, force_keyframe=i == 2)
        kinds.append(is_keyframe("VP8", rtp_packets(payloads, 0, ts, VP8)))
    assert kinds == [True, False, True, False]
    assert encoder.codec.bit_rate == 300_000  # the floor, at 160 x 160


def test_bitrate_follows_the_size_and_steps_down_with_the_estimate() -> None:
    assert suited_bitrate(512, 512) == 786_432
    assert suited_bitrate(1920, 1080) == 4_000_000
    encoder = LowLatencyVp8Encoder()
    frame = av.VideoFrame(512, 512, "yuv420p")
    frame.pts, frame.time_base = 0, TIME_BASE
    encoder.encode(frame)
    assert encoder.codec.bit_rate == 786_432
    codec = encoder.codec
    encoder.target_bitrate = 700_000  # a small swing of the estimate: same encoder
    encoder.encode(frame)
    assert encoder.codec is codec
    encoder.target_bitrate = 450_000  # a real drop: one step down, reopened
    encoder.encode(frame)
    assert encoder.codec is not codec and encoder.codec.bit_rate == 393_216
    encoder.target_bitrate = 50_000_000  # never above the suited bitrate
    assert encoder.target_bitrate == 786_432


def test_a_gap_holding_frames_back_is_asked_for_again() -> None:
    clock = Clock()
    buffer = assembler(clock)
    feed(buffer, frame_packets(65534, 3000, 1, key=True))
    feed(buffer, frame_packets(65536 + 1, 9000, 2))  # 65535 and 0 lost
    assert buffer.renack() == []  # just noticed: aiortc's own NACK goes first
    clock.now += 0.06
    feed(buffer, frame_packets(65536 + 3, 12000, 1))
    assert buffer.renack() == [0, 65535] and buffer.ssrc == 0
    assert buffer.renack() == []  # not again before NACK_RETRY_S
    clock.now += 0.06
    feed(buffer, [vp8_packet(65535, 6000, marker=True, start=True)])  # one came back
    assert buffer.renack() == []  # the frames moved on: the wait starts again at 0
    clock.now += 0.06
    feed(buffer, frame_packets(65536 + 4, 15000, 1))
    assert buffer.renack() == [0]
    assert feed(buffer, [vp8_packet(0, 7500, marker=True, start=True)]) == [
        (False, [7500, 9000, 12000, 15000])]
    assert buffer.renack() == [] and buffer.stats.nack_retries == 2
