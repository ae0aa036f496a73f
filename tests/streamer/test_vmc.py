"""The avatar feed: OSC encoding and decoding, ARKit names, VMC head pose axes, UDP."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest

from streamer.vmc import osc
from streamer.vmc.feed import (
    ARKIT_NAMES,
    VmcError,
    VmcSender,
    arkit_name,
    ict_to_arkit,
    parse_address,
    quaternion_xyzw,
    relative_head_pose,
    unity_head_pose,
)
from tracker.rotation import axis_angle_to_matrix_np


def test_osc_message_bytes_follow_the_spec() -> None:
    data = osc.encode_message("/VMC/Ext/Blend/Val", "jawOpen", 0.5)
    assert data == (b"/VMC/Ext/Blend/Val\0\0" + b",sf\0" + b"jawOpen\0"
                    + struct.pack(">f", 0.5))
    assert osc.encode_message("/abc") == b"/abc\0\0\0\0,\0\0\0"  # "/abc" + 4 NULs, "," + 3
    assert osc.encode_message("/a", 1, True, False) == b"/a\0\0,iTF\0\0\0\0" + \
        struct.pack(">i", 1)


def test_osc_round_trip_of_messages_and_bundles() -> None:
    messages = [osc.encode_message("/VMC/Ext/OK", 1, 3, 0, 1),
                osc.encode_message("/VMC/Ext/T", 1.25),
                osc.encode_message("/VMC/Ext/Bone/Pos", "Head", 0.0, 0.1, -0.2, 0.0, 0.0, 0.0,
                                   1.0),
                osc.encode_message("/VMC/Ext/Blend/Apply")]
    inner = osc.encode_bundle(messages[2:])
    packet = osc.encode_bundle([*messages[:2], inner], timetag=42)
    decoded = osc.decode(packet)
    assert isinstance(decoded, osc.Bundle) and decoded.timetag == 42
    flat = osc.flatten(decoded)
    assert [m.address for m in flat] == ["/VMC/Ext/OK", "/VMC/Ext/T", "/VMC/Ext/Bone/Pos",
                                         "/VMC/Ext/Blend/Apply"]
    assert flat[0].args == (1, 3, 0, 1)
    assert flat[1].args == (1.25,)
    assert flat[2].args[0] == "Head" and flat[2].args[2] == pytest.approx(0.1)
    assert flat[3].args == ()


def test_osc_rejects_what_it_cannot_carry() -> None:
    with pytest.raises(osc.OscError, match="OSC addresses start with '/'"):
        osc.encode_message("VMC")
    with pytest.raises(osc.OscError, match="must be ASCII"):
        osc.encode_message("/a", "é")
    with pytest.raises(osc.OscError, match="does not fit in 32 bits"):
        osc.encode_message("/a", 2**31)
    with pytest.raises(osc.OscError, match="must be int, float, str or bool"):
        osc.encode_message("/a", [1])
    with pytest.raises(osc.OscError, match="multiple of 4 bytes"):
        osc.decode(b"/ab")
    with pytest.raises(osc.OscError, match="overruns the packet"):
        osc.decode(b"#bundle\0" + b"\0" * 8 + struct.pack(">i", 64) + b"/a\0\0")


def test_pack_bundles_keeps_datagrams_small() -> None:
    msgs = [osc.encode_message("/VMC/Ext/Blend/Val", name, 0.5) for name in ARKIT_NAMES]
    bundles = osc.pack_bundles(msgs, max_bytes=1400)
    assert all(len(b) <= 1400 for b in bundles) and len(bundles) > 1
    assert [m.args[0] for b in bundles for m in osc.flatten(osc.decode(b))] == \
        list(ARKIT_NAMES)


def test_arkit_names_from_ict(names: list[str]) -> None:
    assert len(ARKIT_NAMES) == 52 and len(set(ARKIT_NAMES)) == 52
    assert arkit_name("eyeBlink_L") == "eyeBlinkLeft"
    assert arkit_name("mouthSmile_R") == "mouthSmileRight"
    assert arkit_name("jawOpen") == "jawOpen"
    values = np.linspace(0.0, 1.0, len(names), dtype=np.float32)
    arkit = ict_to_arkit(values, names)
    assert list(arkit) == list(ARKIT_NAMES)
    by_name = dict(zip(names, values.tolist()))
    assert arkit["eyeBlinkLeft"] == pytest.approx(by_name["eyeBlink_L"])
    assert arkit["jawLeft"] == pytest.approx(by_name["jawLeft"])
    assert arkit["mouthRight"] == pytest.approx(by_name["mouthRight"])
    assert arkit["browInnerUp"] == pytest.approx(
        (by_name["browInnerUp_L"] + by_name["browInnerUp_R"]) / 2)
    assert arkit["cheekPuff"] == pytest.approx(
        (by_name["cheekPuff_L"] + by_name["cheekPuff_R"]) / 2)
    assert arkit["tongueOut"] == 0.0
    # every ICT coefficient lands somewhere
    used = {n for n in names if arkit_name(n) in arkit} | {
        "browInnerUp_L", "browInnerUp_R", "cheekPuff_L", "cheekPuff_R"}
    assert used == set(names)
    with pytest.raises(ValueError, match="lack"):
        ict_to_arkit(values[:10], names[:10])


def test_head_pose_in_unity_axes() -> None:
    # the subject turns to their left: in OpenCV axes the face's forward (0, 0, -1) turns
    # toward +x (the subject's left); the avatar's forward (0, 0, 1) must turn toward its
    # left, -x in Unity
    yaw = np.deg2rad(30.0)
    rot = axis_angle_to_matrix_np(np.array([0.0, -yaw, 0.0]))  # about -y (y points down)
    np.testing.assert_allclose(rot @ [0, 0, -1], [np.sin(yaw), 0, -np.cos(yaw)], atol=1e-12)
    position, q = unity_head_pose(rot, np.array([2.0, -3.0, 10.0]))
    x, y, z, w = q
    r_unity = np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    np.testing.assert_allclose(r_unity @ [0, 0, 1], [-np.sin(yaw), 0, np.cos(yaw)], atol=1e-9)
    # moving 2 cm to the subject's left, 3 cm up, 10 cm away from the camera
    np.testing.assert_allclose(position, [-0.02, 0.03, -0.10])
    # nodding down (chin toward the chest): OpenCV pitch about +x turns forward toward +y
    # (down in the image); in Unity forward turns toward -y
    down = axis_angle_to_matrix_np(np.array([np.deg2rad(20.0), 0.0, 0.0]))
    assert (down @ [0, 0, -1])[1] > 0
    _, q = unity_head_pose(down, np.zeros(3))
    x, y, z, w = q
    forward_y = 2 * (y * z - x * w)  # row y of R @ (0, 0, 1)
    assert forward_y < 0
    np.testing.assert_allclose(np.linalg.norm(q), 1.0)
    assert quaternion_xyzw(np.eye(3)).tolist() == [0, 0, 0, 1]


def test_relative_pose_removes_the_neutral() -> None:
    neutral = np.array([0.1, -0.2, 0.05])
    rot, offset = relative_head_pose(neutral, np.array([1.0, 2.0, 50.0]), neutral,
                                     np.array([1.0, 2.0, 50.0]))
    np.testing.assert_allclose(rot, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(offset, 0.0)


def test_vmc_sender_over_udp(names: list[str]) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    sender = VmcSender(*receiver.getsockname())
    expression = np.zeros(len(names), np.float32)
    expression[names.index("jawOpen")] = 0.75
    sender.send(expression, names, np.eye(3), np.zeros(3), tracking=True)
    messages: list[osc.Message] = []
    while not messages or messages[-1].address != "/VMC/Ext/Blend/Apply":
        messages += osc.flatten(osc.decode(receiver.recv(65536)))
    sender.close()
    receiver.close()
    addresses = [m.address for m in messages]
    assert addresses[:4] == ["/VMC/Ext/OK", "/VMC/Ext/T", "/VMC/Ext/Root/Pos",
                             "/VMC/Ext/Bone/Pos"]
    assert messages[0].args == (1, 3, 0, 1)
    assert messages[3].args == ("Head", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    blends = {m.args[0]: m.args[1] for m in messages if m.address == "/VMC/Ext/Blend/Val"}
    assert list(blends) == list(ARKIT_NAMES)
    assert blends["jawOpen"] == pytest.approx(0.75)


def test_vmc_address_parsing() -> None:
    assert parse_address("127.0.0.1:39539") == ("127.0.0.1", 39539)
    assert parse_address("[::1]:39539") == ("::1", 39539)
    for bad in ("localhost", ":39539", "host:0", "host:port", "host:70000"):
        with pytest.raises(VmcError, match="--vmc expects HOST:PORT"):
            parse_address(bad)
