#!/usr/bin/env python3
"""Hostile-input soak: the server under a memory cap, hostile requests of
every kind mixed with good ones from several clients, then the CLI on the
same hostile files.

    python3 tools/soak/hostile_soak.py --bin target/release/frankensplit \
        --edge-bin target/release/frankensplit-edge --model runs/scenes/compressor-l0.64/bundle \
        --images data/scenes-test/test --seconds 120 --clients 6 --json soak.json

Checks, and exits non-zero unless all hold:
  * every hostile request is answered with its expected 4xx status;
  * every good request is answered 200 with the top-1 the idle server gave
    for the same input (a 503 is retried after its Retry-After, as a client
    should);
  * the server is alive at the end and its peak RSS (VmHWM) stays under
    the cap given to it with RLIMIT_AS;
  * `convert`, `classify` and `encode` on the hostile files exit with an
    error status, never a signal.

Standard library only: the hostile files are built here byte by byte.
"""

import argparse
import http.client
import json
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path


def png(width, height, row=None):
    """A PNG of `width × height` black RGB pixels (or `row` repeated)."""
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    raw_row = row if row is not None else b"\x00" * (3 * width)
    compressor = zlib.compressobj(9)
    parts = []
    line = b"\x00" + raw_row
    # Stream rows through the compressor: 16,777,215 rows never sit in memory.
    per_block = max(1, min(4096, (4 << 20) // len(line)))
    block = line * per_block
    left = height
    while left:
        n = min(left, per_block)
        parts.append(compressor.compress(block if n == per_block else line * n))
        left -= n
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def pickle_dup_bomb():
    """A pickle whose DUP + APPEND pairs double a list 60 times."""
    body = b"\x80\x02]K\x01a" + b"2a" * 60 + b"."
    return body


def checkpoint_zip(pickle_bytes, storage=b"", storage_declared=None):
    """A torch.save-style zip holding `pickle_bytes` and one storage."""
    out = tempfile.SpooledTemporaryFile()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        if storage:
            z.writestr(zipfile.ZipInfo("archive/data/0"), storage, compress_type=zipfile.ZIP_DEFLATED)
    out.seek(0)
    return out.read()


def tensor_pickle(storage_elements, shape, stride):
    """`{"w": _rebuild_tensor_v2(FloatStorage '0' of storage_elements, 0, shape, stride)}`."""
    def text(s):
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    def long(v):
        return b"\x8a\x08" + struct.pack("<q", v)

    p = b"\x80\x02}" + text("w") + b"ctorch._utils\n_rebuild_tensor_v2\n(("
    p += text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu") + long(storage_elements) + b"tQ"
    p += long(0) + b"(" + b"".join(long(d) for d in shape) + b"t(" + b"".join(long(d) for d in stride) + b"t"
    p += b"\x89}tRs."
    return p


def request(port, path, body, headers=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, response.getheader("Retry-After"), data
    except (BrokenPipeError, ConnectionResetError):
        # A server may answer an oversized upload (413) and close before the
        # body is sent: read the answer it left on the socket.
        return raw_request(port, path, body, headers or {}, timeout)
    finally:
        conn.close()


def raw_request(port, path, body, headers, timeout):
    """POST over a bare socket, reading whatever status line came back even
    when the server closed its side while we were still sending."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        try:
            sock.sendall(head.encode() + body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while b"\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except ConnectionResetError:
            pass
    parts = answer.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError("closed without an answer")
    return int(parts[1]), None, b""


def peak_rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", default="target/release/frankensplit")
    parser.add_argument("--edge-bin", default="target/release/frankensplit-edge")
    parser.add_argument("--model", required=True, help="a bundle directory with the whole backbone (e.g. a training run's bundle/)")
    parser.add_argument("--images", required=True, help="a folder of class folders of PNGs (good inputs)")
    parser.add_argument("--good", type=int, default=40, help="good images to use")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--cap-gib", type=float, default=6.0, help="RLIMIT_AS of the server")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fs-soak-"))
    model = args.model

    images = sorted(Path(args.images).glob("*/*.png"))
    random.Random(0).shuffle(images)
    images = images[: args.good]
    payload_dir = work / "payloads"
    subprocess.run([args.edge_bin, "encode", "--model", model, "-o", str(payload_dir), *map(str, images)],
                   check=True, capture_output=True)
    # encode mirrors the images' paths below their common folder.
    payloads = {p.relative_to(payload_dir).with_suffix(""): p for p in payload_dir.rglob("*.fsp")}
    root = Path(os.path.commonpath([str(i.parent.resolve()) for i in images]))
    good = []
    for image in images:
        good.append(("/v1/classify-image", image.read_bytes(), {}))
        good.append(("/v1/classify", payloads[image.resolve().relative_to(root).with_suffix("")].read_bytes(), {}))

    payload = good[1][1]
    wrong_model = bytearray(payload)
    wrong_model[1] ^= 0xFF
    framed = lambda n: b"".join(struct.pack("<I", len(payload)) + payload for _ in range(n))
    hostile = {
        "png 1x16777215": ("/v1/classify-image", png(1, 16_777_215), {}, {413}),
        "png 16777215x1": ("/v1/classify-image", png(16_777_215, 1), {}, {413}),
        "png 1x4000000": ("/v1/classify-image", png(1, 4_000_000), {}, {413}),
        "png 20000x20000 bomb": ("/v1/classify-image", png(20_000, 20_000), {}, {413}),
        "png truncated": ("/v1/classify-image", good[0][1][: len(good[0][1]) // 2], {}, {400}),
        "random bytes as image": ("/v1/classify-image", os.urandom(4096), {}, {400}),
        "cropped=true wrong size": ("/v1/classify-image?cropped=true", good[0][1], {}, {400}),
        "body over the limit": ("/v1/classify-image", b"\x89PNG" + b"\x00" * (2 << 20), {}, {413}),
        "payload of another model": ("/v1/classify", bytes(wrong_model), {}, {409}),
        "payload truncated": ("/v1/classify", payload[: len(payload) // 2], {}, {400}),
        "random bytes as payload": ("/v1/classify", os.urandom(512), {}, {400}),
        "framed length lies": ("/v1/classify", struct.pack("<I", 1 << 30) + payload,
                               {"Content-Type": "application/vnd.frankensplit.payloads"}, {400}),
        "257 frames": ("/v1/classify", framed(257), {"Content-Type": "application/vnd.frankensplit.payloads"}, {400}),
    }

    cap = int(args.cap_gib * (1 << 30))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [args.bin, "serve", "--model", model, "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "w"),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    for _ in range(600):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit("the server did not start: " + (work / "server.log").read_text())

    # The idle server's answers are the reference for the good requests.
    expected = []
    for path, body, headers in good:
        status, _, data = request(port, path, body, headers)
        assert status == 200, (path, status, data[:200])
        expected.append(json.loads(data)["top_k"][0]["class"])

    counts = {name: {"sent": 0, "expected_status": 0, "other": {}} for name in hostile}
    good_stats = {"sent": 0, "correct": 0, "wrong": 0, "retries_after_503": 0, "failed": 0}
    lock = threading.Lock()
    stop_at = time.time() + args.seconds

    def client(seed):
        rng = random.Random(seed)
        names = list(hostile)
        while time.time() < stop_at:
            if rng.random() < 0.5:
                name = rng.choice(names)
                path, body, headers, want = hostile[name]
                try:
                    status, _, _ = request(port, path, body, headers)
                except OSError as e:
                    status = f"error: {e}"
                with lock:
                    c = counts[name]
                    c["sent"] += 1
                    if status in want:
                        c["expected_status"] += 1
                    else:
                        c["other"][str(status)] = c["other"].get(str(status), 0) + 1
            else:
                i = rng.randrange(len(good))
                path, body, headers = good[i]
                for _attempt in range(20):
                    try:
                        status, retry, data = request(port, path, body, headers)
                    except OSError:
                        status, retry, data = None, None, b""
                    if status == 503:
                        with lock:
                            good_stats["retries_after_503"] += 1
                        time.sleep(float(retry or 1))
                        continue
                    break
                with lock:
                    good_stats["sent"] += 1
                    if status == 200 and json.loads(data)["top_k"][0]["class"] == expected[i]:
                        good_stats["correct"] += 1
                    elif status == 200:
                        good_stats["wrong"] += 1
                    else:
                        good_stats["failed"] += 1

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alive = server.poll() is None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/healthz")
        alive = alive and conn.getresponse().status == 200
    except OSError:
        alive = False
    peak = peak_rss_kib(server.pid) if server.poll() is None else None
    server.terminate()
    server.wait(timeout=30)

    # The CLI on hostile files: an error exit, never a signal.
    files = work / "hostile"
    files.mkdir()
    (files / "tall.png").write_bytes(hostile["png 1x16777215"][1])
    (files / "wide.png").write_bytes(hostile["png 16777215x1"][1])
    (files / "dup-bomb.pt").write_bytes(checkpoint_zip(pickle_dup_bomb()))
    (files / "huge-view.pt").write_bytes(checkpoint_zip(tensor_pickle(4, [1 << 40], [0]), struct.pack("<4f", 0, 1, 2, 3)))
    (files / "inflating-storage.pt").write_bytes(
        checkpoint_zip(tensor_pickle(4, [4], [1]), struct.pack("<4f", 0, 1, 2, 3) + b"\x00" * (256 << 20)))
    cli = {}
    commands = {
        "classify tall.png": [args.bin, "classify", "--model", model, str(files / "tall.png")],
        "classify wide.png": [args.bin, "classify", "--model", model, str(files / "wide.png")],
        "edge encode tall.png": [args.edge_bin, "encode", "--model", model, "-o", str(work / "out"), str(files / "tall.png")],
    }
    for name in ["dup-bomb.pt", "huge-view.pt", "inflating-storage.pt"]:
        commands[f"convert {name}"] = [args.bin, "convert", "--checkpoint", str(files / name), "-o", str(work / "bundle")]
    for name, command in commands.items():
        def capped():
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        done = subprocess.run(command, capture_output=True, text=True, preexec_fn=capped, timeout=300,
                              env={**os.environ, "RUST_BACKTRACE": "0"})
        cli[name] = {"exit": done.returncode, "message": " ".join(done.stderr.split())[:300]}

    summary = {
        "seconds": args.seconds,
        "clients": args.clients,
        "cap_bytes": cap,
        "hostile": counts,
        "good": good_stats,
        "server_alive": alive,
        "server_peak_rss_bytes": peak * 1024 if peak else None,
        "cli": cli,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = (
        alive
        and all(c["sent"] > 0 and c["expected_status"] == c["sent"] for c in counts.values())
        and good_stats["correct"] == good_stats["sent"] > 0
        and peak is not None and peak * 1024 < cap
        and all(0 < c["exit"] < 128 for c in cli.values())
    )
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
