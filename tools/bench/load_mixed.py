#!/usr/bin/env python3
"""Mixed load against a running `frankensplit serve`: good payloads and bad
requests (another model's payload, truncated, random bytes, oversized body),
N requests from C concurrent clients. Checks every answer (200 with the
expected top-1 for good payloads; 409, 400, 413 or 503 for the others) and
samples the server's resident memory from /proc.

Standard library only. Typical use (see BENCHMARKS.md):

    frankensplit encode --model B -o payloads IMAGES...
    frankensplit classify --json --model B IMAGES... > expected.jsonl
    frankensplit serve --model B --listen 127.0.0.1:8080 &
    python3 tools/bench/load_mixed.py --server http://127.0.0.1:8080 \
        --payloads payloads --expected expected.jsonl --server-pid $! \
        --requests 2000 --concurrency 16
"""

import argparse
import json
import os
import pathlib
import random
import statistics
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def post(url, body, timeout=30):
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"content-type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, None
    except (urllib.error.URLError, ConnectionError) as e:
        return 0, {"error": str(e)}


def rss_kib(pid, field):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True)
    ap.add_argument("--payloads", required=True, help="directory of .fsp files from `frankensplit encode`")
    ap.add_argument("--expected", required=True, help="`frankensplit classify --json` output for the same images")
    ap.add_argument("--server-pid", type=int, help="sample this process's memory")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--bad-fraction", type=float, default=0.25)
    ap.add_argument("--max-body", type=int, default=1 << 20, help="the server's --max-body-bytes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    expected = {}
    for line in pathlib.Path(args.expected).read_text().splitlines():
        r = json.loads(line)
        expected[pathlib.Path(r["image"]).stem] = r["top_k"][0]["class"]
    good = []
    for path in sorted(pathlib.Path(args.payloads).glob("*.fsp")):
        if path.stem in expected:
            good.append((path.read_bytes(), expected[path.stem]))
    if not good:
        raise SystemExit("no payload matches an image in --expected")

    rng = random.Random(args.seed)

    def bad_request():
        payload, _ = rng.choice(good)
        kind = rng.choice(["other-model", "truncated", "random", "oversized"])
        if kind == "other-model":
            body = bytearray(payload)
            body[1] ^= 0xFF
            return kind, bytes(body), {409}
        if kind == "truncated":
            return kind, payload[: rng.randrange(1, len(payload) - 1)], {400}
        if kind == "random":
            return kind, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))), {400, 409}
        return kind, b"\xf1" * (args.max_body + 1), {413}

    plan = []
    for _ in range(args.requests):
        if rng.random() < args.bad_fraction:
            plan.append(bad_request())
        else:
            payload, top1 = rng.choice(good)
            plan.append(("good", payload, top1))

    url = args.server.rstrip("/") + "/v1/classify"
    lock = threading.Lock()
    outcome = {"wrong": 0, "unexpected": [], "busy": 0, "latency_ms": [], "good_ok": 0, "bad_ok": 0}
    peak_rss = [0]
    stop = threading.Event()

    def sample_memory():
        while not stop.is_set():
            peak_rss[0] = max(peak_rss[0], rss_kib(args.server_pid, "VmRSS"))
            time.sleep(0.05)

    if args.server_pid:
        rss_before = rss_kib(args.server_pid, "VmRSS")
        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()

    def one(item):
        kind, body, want = item
        start = time.perf_counter()
        status, answer = post(url, body)
        elapsed = (time.perf_counter() - start) * 1e3
        with lock:
            if status == 503:
                outcome["busy"] += 1
            elif kind == "good":
                if status != 200:
                    outcome["unexpected"].append((kind, status, answer))
                elif answer["top_k"][0]["class"] != want:
                    outcome["wrong"] += 1
                else:
                    outcome["good_ok"] += 1
                    outcome["latency_ms"].append(elapsed)
            elif status in want:
                outcome["bad_ok"] += 1
            else:
                outcome["unexpected"].append((kind, status, answer))

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, plan))
    seconds = time.perf_counter() - started
    stop.set()
    health, _ = post(args.server.rstrip("/") + "/v1/classify", good[0][0])

    lat = sorted(outcome["latency_ms"])
    q = lambda p: lat[min(len(lat) - 1, round((len(lat) - 1) * p))] if lat else float("nan")
    report = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "good_answered": outcome["good_ok"],
        "bad_refused_as_expected": outcome["bad_ok"],
        "busy_503": outcome["busy"],
        "wrong_top1": outcome["wrong"],
        "unexpected": len(outcome["unexpected"]),
        "seconds": seconds,
        "requests_per_s": args.requests / seconds,
        "good_p50_ms": q(0.5),
        "good_p99_ms": q(0.99),
        "server_answers_after": health == 200,
    }
    if args.server_pid:
        report["server_rss_before_mib"] = rss_before / 1024
        report["server_peak_rss_mib"] = max(peak_rss[0], rss_kib(args.server_pid, "VmHWM")) / 1024
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:>26}: {v:.2f}" if isinstance(v, float) else f"{k:>26}: {v}")
        for u in outcome["unexpected"][:5]:
            print("unexpected:", u)
    ok = outcome["wrong"] == 0 and not outcome["unexpected"] and health == 200
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
