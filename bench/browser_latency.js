// Injected by bench/browser_latency.py into dvp serve's page before its own script runs.
// The page's "webcam" becomes a canvas stream (captureStream, a frame requested after each
// draw) showing the face frames the bench loads, each with its frame id stamped into the
// pixels in streamer/video/stamp.py's format (16 black/white blocks, 12-bit id + 4-bit
// check, top left). The remote (reenacted or echoed) video is watched with
// requestVideoFrameCallback: each frame's stamp is read back and timed against the moment
// that id was drawn (performance.now() on both ends, one clock). The frame's
// presentationTime (handed to the compositor) is the last moment the page can see; its
// expectedDisplayTime is a vsync estimate that headless Chromium may put before it.
(() => {
  "use strict";
  const ID_MODULO = 4096;
  const bench = (window.__bench = {
    frames: [],
    drawn: new Map(), // id -> performance.now() when drawn
    // per presented frame: [drawn, receiveTime, presentationTime, expectedDisplayTime,
    // callback time, frame width]
    results: [],
    unreadable: 0, // presented frames whose stamp did not read back
    stale: 0, // stamps read back of no frame drawn in this run
    sent: 0,
    running: true,
  });
  let resolveReady;
  const ready = new Promise((resolve) => { resolveReady = resolve; });

  bench.load = async (jpegs, width, height, fps) => {
    for (const b64 of jpegs) {
      const blob = await (await fetch("data:image/jpeg;base64," + b64)).blob();
      bench.frames.push(await createImageBitmap(blob));
    }
    Object.assign(bench, { width, height, fps });
    resolveReady();
    return bench.frames.length;
  };

  // -- the stamp (streamer/video/stamp.py) --
  const blockSize = (width) => Math.max(4, Math.min(16, Math.floor(width / 10)));
  function bits(id) {
    const value = id % ID_MODULO;
    const check = (value ^ (value >> 4) ^ (value >> 8) ^ 0xa) & 0xf;
    const word = (value << 4) | check;
    const out = [];
    for (let i = 0; i < 16; i++) out.push((word >> (15 - i)) & 1);
    return out;
  }
  function writeStamp(ctx, width, id) {
    const b = blockSize(width);
    bits(id).forEach((bit, i) => {
      ctx.fillStyle = bit ? "#ffffff" : "#000000";
      ctx.fillRect((i % 8) * b, Math.floor(i / 8) * b, b, b);
    });
  }
  function readStamp(data, rowWidth, b) {
    // data: RGBA rows `rowWidth` px wide from the frame's top left; b: the block side in
    // this frame's pixels (fractional when the frame was scaled); a block is 1 when its
    // inner part is light
    const inner = Math.max(1, Math.floor(b / 4));
    const got = [];
    for (let i = 0; i < 16; i++) {
      const x0 = Math.round((i % 8) * b + inner), y0 = Math.round(Math.floor(i / 8) * b + inner);
      const x1 = Math.round(((i % 8) + 1) * b - inner), y1 = Math.round((Math.floor(i / 8) + 1) * b - inner);
      let sum = 0, n = 0;
      for (let y = y0; y < y1; y++) {
        for (let x = x0; x < x1; x++) {
          const k = 4 * (y * rowWidth + x);
          sum += data[k] + data[k + 1] + data[k + 2];
          n += 3;
        }
      }
      got.push(n && sum / n > 127.5 ? 1 : 0);
    }
    let word = 0;
    for (const bit of got) word = (word << 1) | bit;
    const value = word >> 4;
    return bits(value).every((bit, i) => bit === got[i]) ? value : null;
  }

  // -- the webcam: a canvas stream --
  navigator.mediaDevices.getUserMedia = async () => {
    await ready;
    const canvas = document.createElement("canvas");
    canvas.width = bench.width;
    canvas.height = bench.height;
    const ctx = canvas.getContext("2d");
    const stream = canvas.captureStream(0);
    const track = stream.getVideoTracks()[0];
    const start = performance.now();
    const draw = () => {
      if (!bench.running) return;
      const i = bench.sent;
      ctx.drawImage(bench.frames[i % bench.frames.length], 0, 0, bench.width, bench.height);
      writeStamp(ctx, bench.width, i);
      bench.drawn.set(i % ID_MODULO, performance.now());
      track.requestFrame();
      bench.sent = i + 1;
      const due = start + (bench.sent * 1000) / bench.fps;
      setTimeout(draw, Math.max(0, due - performance.now()));
    };
    draw();
    return stream;
  };

  // -- the remote video: read each presented frame's stamp --
  bench.watch = () => {
    const video = document.getElementById("remote");
    const probe = document.createElement("canvas");
    const pctx = probe.getContext("2d", { willReadFrequently: true });
    const onFrame = (now, meta) => {
      // the stamp as written for this frame's width (a reenacted frame: the server wrote
      // it), or the page's, scaled (an echo the browser's encoder sent at a lower size)
      const sizes = [blockSize(meta.width), (blockSize(bench.width) * meta.width) / bench.width];
      const side = Math.ceil(2 * Math.max(...sizes));
      if (probe.width !== 4 * side || probe.height !== side) {
        probe.width = 4 * side;
        probe.height = side;
      }
      pctx.drawImage(video, 0, 0, 4 * side, side, 0, 0, 4 * side, side);
      const data = pctx.getImageData(0, 0, 4 * side, side).data;
      let id = null;
      for (const b of sizes) {
        id = readStamp(data, 4 * side, b);
        if (id !== null) break;
      }
      const drawn = id === null ? undefined : bench.drawn.get(id);
      if (id === null) {
        bench.unreadable += 1;
      } else if (drawn === undefined || drawn > meta.presentationTime) {
        bench.stale += 1;
      } else {
        bench.results.push([drawn, meta.receiveTime === undefined ? null : meta.receiveTime,
          meta.presentationTime, meta.expectedDisplayTime, now, meta.width]);
      }
      if (bench.running) video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  };

  // -- the page's WebRTC figures (its `pc`), video only --
  bench.stats = async () => {
    // eslint-disable-next-line no-undef
    const report = await pc.getStats();
    const out = { outbound: null, inbound: null, rtt_ms: null };
    const pick = (s, keys) => Object.fromEntries(keys.filter((k) => s[k] !== undefined).map((k) => [k, s[k]]));
    report.forEach((s) => {
      if (s.type === "outbound-rtp" && s.kind === "video") {
        out.outbound = pick(s, ["framesEncoded", "totalEncodeTime", "totalPacketSendDelay",
          "packetsSent", "retransmittedPacketsSent", "keyFramesEncoded", "nackCount", "pliCount",
          "frameWidth", "frameHeight", "framesPerSecond", "encoderImplementation",
          "qualityLimitationReason", "qualityLimitationResolutionChanges", "targetBitrate"]);
      } else if (s.type === "inbound-rtp" && s.kind === "video") {
        out.inbound = pick(s, ["framesReceived", "framesDecoded", "framesDropped",
          "keyFramesDecoded", "totalDecodeTime", "jitterBufferDelay", "jitterBufferEmittedCount",
          "jitterBufferTargetDelay", "jitterBufferMinimumDelay", "totalProcessingDelay",
          "totalAssemblyTime", "framesAssembledFromMultiplePackets", "freezeCount",
          "totalFreezesDuration", "packetsLost", "packetsReceived", "nackCount", "pliCount",
          "frameWidth", "frameHeight", "decoderImplementation"]);
      } else if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) {
        out.rtt_ms = 1000 * s.currentRoundTripTime;
      }
    });
    return out;
  };
})();
