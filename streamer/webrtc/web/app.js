// The page of `dvp serve`: webcam in, reenacted target out, controls and live figures.
// Signalling is JSON over the WebSocket /ws (docs/protocol.md). Query parameters of the
// page: token=T (passed on to /ws), autostart=1 (start at once), mode=M.
"use strict";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);

// Read by tests and handy in the console: counters and a snapshot of the output picture.
const dvp = window.dvp = {
  state: "idle",
  error: null,
  hello: null,
  framesShown: 0,
  paramsReceived: 0,
  facesSeen: 0,
  lastParams: null,
  lastStats: null,
  // the video receiver's jitterBufferTarget after the page set it (null: not supported)
  jitterBufferTarget: null,
  // mean and standard deviation of the output video's grey level, and its size
  sample() {
    const video = $("remote");
    if (!video.videoWidth) return null;
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(video, 0, 0);
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let sum = 0, sum2 = 0;
    const n = data.length / 4;
    for (let i = 0; i < data.length; i += 4) {
      const g = (data[i] + data[i + 1] + data[i + 2]) / 3;
      sum += g;
      sum2 += g * g;
    }
    const mean = sum / n;
    return { width: canvas.width, height: canvas.height, mean, std: Math.sqrt(Math.max(0, sum2 / n - mean * mean)) };
  },
};

let ws = null;
let pc = null;
let stream = null;
let channel = null;
let controls = {};
let rtt = null;
let jitterMs = null;
let serverLatency = null;
let statsTimer = null;

function setStatus(text) {
  dvp.state = text;
  $("status").textContent = text;
}

function showError(message) {
  dvp.error = message;
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const token = query.get("token");
  return `${scheme}//${location.host}/ws` + (token ? `?token=${encodeURIComponent(token)}` : "");
}

function send(message) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

function waitForIceGathering(peer) {
  // The server (aiortc) takes complete offers: wait until every candidate is in the SDP.
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => {
      if (peer.iceGatheringState === "complete") {
        peer.removeEventListener("icegatheringstatechange", check);
        resolve();
      }
    };
    peer.addEventListener("icegatheringstatechange", check);
    setTimeout(resolve, 5000); // gather what there is after 5 s
  });
}

function openSocket() {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(wsUrl());
    let greeted = false;
    socket.onerror = () => reject(new Error("cannot reach the server's WebSocket (wrong token?)"));
    socket.onclose = (event) => {
      if (!greeted) reject(new Error(dvp.state === "busy" ? "the server is busy" : `connection closed (${event.code})`));
      if (dvp.state !== "busy" && dvp.state !== "stopped") setStatus(`disconnected (${event.code})`);
      teardown(false);
    };
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "hello") greeted = true;
      onMessage(message, resolve);
    };
    ws = socket;
  });
}

async function onMessage(message, onHello) {
  switch (message.type) {
    case "hello":
      dvp.hello = message;
      controls = Object.assign({}, message.controls);
      onHello(message);
      break;
    case "answer":
      await pc.setRemoteDescription({ type: "answer", sdp: message.sdp });
      setStatus("connecting");
      break;
    case "state":
      controls = Object.assign({}, message.controls);
      break;
    case "stats":
      dvp.lastStats = message;
      showStats(message);
      break;
    case "busy":
      setStatus("busy");
      showError("The server is busy (all sessions taken). Try again later.");
      break;
    case "error":
      showError(message.message);
      break;
    case "pong":
      break;
    default:
      break; // newer servers may send more kinds
  }
}

async function start() {
  showError("");
  $("start").disabled = true;
  setStatus("starting camera");
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } },
      audio: true,
    }).catch(() => navigator.mediaDevices.getUserMedia({ video: true, audio: false }));
    $("local").srcObject = stream;
    setStatus("connecting to server");
    const hello = await openSocket();
    pc = new RTCPeerConnection({ iceServers: hello.ice_servers || [] });
    const remote = new MediaStream();
    $("remote").srcObject = remote;
    pc.ontrack = (event) => {
      if (event.track.kind === "video") smallestPlayoutDelay(event.receiver);
      remote.addTrack(event.track);
    };
    pc.onconnectionstatechange = () => {
      if (pc) setStatus(pc.connectionState === "connected" ? "live" : pc.connectionState);
    };
    for (const track of stream.getTracks()) pc.addTrack(track, stream);
    channel = pc.createDataChannel("params", { ordered: false, maxRetransmits: 0 });
    channel.onmessage = (event) => {
      dvp.paramsReceived += 1;
      const params = JSON.parse(event.data);
      if (params.face) dvp.facesSeen += 1;
      dvp.lastParams = params;
      serverLatency = params.latency_ms;
      showParams(params);
    };
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    await waitForIceGathering(pc);
    send({ type: "offer", sdp: pc.localDescription.sdp, mode: $("mode").value });
    $("stop").disabled = false;
    $("neutral").disabled = false;
    $("reset").disabled = false;
    $("edits").disabled = false;
    statsTimer = setInterval(pollStats, 1000);
    countFrames();
  } catch (err) {
    if (dvp.state !== "busy") showError(`Could not start: ${err.message || err}`);
    teardown(true);
  }
}

// Ask the browser to play the reenacted video as soon as it is decoded: a jitter buffer
// target of 0 ms (the browser then keeps only the delay the network's jitter needs).
// The microphone's audio keeps the browser's default (it smooths speech).
function smallestPlayoutDelay(receiver) {
  if ("jitterBufferTarget" in receiver) {
    receiver.jitterBufferTarget = 0;
    dvp.jitterBufferTarget = receiver.jitterBufferTarget;
  } else if ("playoutDelayHint" in receiver) {
    receiver.playoutDelayHint = 0; // older Chromium: the same, in seconds
  }
}

function countFrames() {
  const video = $("remote");
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
  const onFrame = () => {
    dvp.framesShown += 1;
    if (pc) video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

async function pollStats() {
  if (!pc) return;
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) {
      rtt = s.currentRoundTripTime * 1000;
    }
    if (s.type === "inbound-rtp" && s.kind === "video") {
      if (s.framesPerSecond !== undefined) $("fps").textContent = s.framesPerSecond.toFixed(1);
      if (s.jitterBufferEmittedCount) jitterMs = 1000 * s.jitterBufferDelay / s.jitterBufferEmittedCount;
      if (dvp.framesShown === 0 && s.framesDecoded) dvp.framesShown = s.framesDecoded;
    }
  });
  if (serverLatency !== null) {
    // server time (frame in -> frame out) + network round trip (half each way) + the
    // browser's jitter buffer; capture and encoding on the way in are not visible here
    const net = rtt !== null ? rtt : 0;
    const jb = jitterMs !== null ? jitterMs : 0;
    const total = serverLatency + net + jb;
    $("latency").textContent = `≈ ${total.toFixed(0)} ms (server ${serverLatency.toFixed(0)}, ` +
      `network ${net.toFixed(0)}, jitter buffer ${jb.toFixed(0)})`;
  }
}

function showParams(params) {
  $("face").textContent = params.face ? "yes" : "no (easing to neutral)";
  $("dropped").textContent = String(params.dropped);
  const body = $("stages").querySelector("tbody");
  const rows = Object.entries(params.stage_ms).map(([k, v]) => `<tr><td>${k}</td><td>${v.toFixed(1)}</td></tr>`);
  body.innerHTML = rows.join("");
}

function showStats(stats) {
  if (!$("fps").textContent || $("fps").textContent === "-") $("fps").textContent = stats.fps.toFixed(1);
  const r = stats.retrack;
  if (r && r.frames) {
    const pct = (v) => (v === null ? "-" : `${Math.round(100 * v)} %`);
    const deg = r.rotation_error_deg_median === null ? "-" : `${r.rotation_error_deg_median.toFixed(1)} deg`;
    $("retrack").textContent = `${r.frames} frames: face ${pct(r.faces_found)}, pose in the ` +
      `target's range ${pct(r.retracked_in_range)}, rotation error ${deg} (range ${r.range})`;
  }
}

function teardown(closeSocket) {
  if (statsTimer) clearInterval(statsTimer);
  statsTimer = null;
  if (pc) pc.close();
  pc = null;
  channel = null;
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null;
  if (closeSocket && ws) ws.close();
  $("start").disabled = false;
  $("stop").disabled = true;
  $("neutral").disabled = true;
  $("reset").disabled = true;
  $("edits").disabled = true;
}

function stop() {
  setStatus("stopped");
  teardown(true);
}

function groupNames(group) {
  const names = (dvp.hello && dvp.hello.expression_names) || [];
  if (group === "brow") return names.filter((n) => n.startsWith("brow"));
  if (group === "eye") return names.filter((n) => n.startsWith("eye") && !n.startsWith("eyeLook"));
  if (group === "mouth") return names.filter((n) => n.startsWith("mouth") || n.startsWith("jaw"));
  return [];
}

function onSlider(event) {
  const input = event.target;
  input.nextElementSibling.textContent = input.value;
  const value = parseFloat(input.value);
  const message = { type: "control" };
  if (input.dataset.vec) {
    const key = input.dataset.vec;
    const vec = (controls[key] || []).slice();
    vec[parseInt(input.dataset.i, 10)] = value;
    message[key] = vec;
  } else if (input.dataset.scalar) {
    message[input.dataset.scalar] = value;
  } else if (input.dataset.group) {
    const gains = {};
    for (const name of groupNames(input.dataset.group)) gains[name] = value;
    message.expression_gains = gains;
  }
  if ($("mode").value !== "edit") {
    // the sliders are mode edit's (tracker.transfer applies them there): switch to it
    $("mode").value = "edit";
    message.mode = "edit";
  }
  for (const key of Object.keys(message)) if (key !== "type") controls[key] = message[key];
  send(message);
}

function resetEdits() {
  document.querySelectorAll(".sliders input").forEach((input) => {
    input.value = input.dataset.vec ? 0 : 1;
    input.nextElementSibling.textContent = input.value;
  });
  send({ type: "control", reset: true });
}

$("start").onclick = start;
$("stop").onclick = stop;
$("neutral").onclick = () => send({ type: "control", neutral: true });
$("reset").onclick = resetEdits;
$("mode").onchange = () => send({ type: "control", mode: $("mode").value });
$("mirror").onchange = () => $("local").classList.toggle("mirrored", $("mirror").checked);
$("local").classList.toggle("mirrored", $("mirror").checked);
document.querySelectorAll(".sliders input").forEach((input) => { input.oninput = onSlider; });
if (query.get("mode")) $("mode").value = query.get("mode");
if (query.get("autostart") === "1") start();
