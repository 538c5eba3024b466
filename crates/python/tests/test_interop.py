"""The snippets of docs/interop.md, run as they are written, with only their
path constants pointed at a built-in model, a live `frankensplit serve` on
loopback, and files made here."""

import contextlib
import io
import os
import re
import signal
import subprocess

import numpy as np
import pytest

import frankensplit

from test_edge import write_png


def snippets(root):
    text = (root / "docs" / "interop.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def configured(code, **constants):
    """`code` with each `NAME = "…"` line of `constants` given its value."""
    for name, value in constants.items():
        code, n = re.subn(rf'^{name} = "[^"]*"', f"{name} = {str(value)!r}", code, flags=re.M)
        assert n == 1, f"the snippet has no {name} line"
    return code


def run(code):
    out = io.StringIO()
    namespace = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/interop.md", "exec"), namespace)
    return namespace, out.getvalue()


@pytest.fixture(scope="module")
def server(root, bundle):
    cli = os.environ.get("FRANKENSPLIT_CLI", str(root / "target" / "debug" / "frankensplit"))
    process = subprocess.Popen(
        [cli, "serve", "--model", str(bundle), "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = process.stderr.readline()
        url = next(w for w in banner.split() if w.startswith("http://"))
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def test_a_pytorch_device_posts_raw_strings_to_our_server(tmp_path, root, bundle, server):
    image = tmp_path / "cat.png"
    write_png(image, np.random.default_rng(4).integers(0, 256, size=(120, 160, 3), dtype=np.uint8))
    (code,) = [s for s in snippets(root) if 'SERVER = "' in s]
    namespace, out = run(configured(code, SERVER=server, BUNDLE=bundle, IMAGE=image))
    answer = namespace["answer"]
    assert str(answer["top_k"][0]) in out

    # The same image as our container answers the same.
    payload = frankensplit.Encoder(bundle).encode(image)
    assert frankensplit.Payload.parse(payload).string == namespace["strings"][0]
    import json
    import urllib.request

    request = urllib.request.Request(f"{server}/v1/classify", data=payload, headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request) as response:
        container = json.load(response)
    assert [p["class"] for p in answer["top_k"]] == [p["class"] for p in container["top_k"]]


def test_a_pytorch_server_reads_our_edges_payloads(tmp_path, root, bundle, edge_binary):
    image = tmp_path / "cat.png"
    write_png(image, np.random.default_rng(5).integers(0, 256, size=(100, 90, 3), dtype=np.uint8))
    subprocess.run([str(edge_binary), "encode", "--model", str(bundle), str(image), "-o", str(tmp_path)], check=True, capture_output=True)
    (code,) = [s for s in snippets(root) if 'PAYLOAD = "' in s]
    namespace, out = run(configured(code, BUNDLE=bundle, PAYLOAD=tmp_path / "cat.fsp"))
    encoder = frankensplit.Encoder(bundle)
    latent = encoder.encode_latent(image)
    medians = encoder.entropy_bottleneck.medians[:, None, None]
    np.testing.assert_array_equal(namespace["y_hat"][0], np.round(latent - medians) + medians)
    assert str(namespace["y_hat"].shape) in out

    # Another model's payload is refused by the snippet's fingerprint check.
    other = frankensplit.Payload.parse((tmp_path / "cat.fsp").read_bytes())
    forged = frankensplit.Payload.build("00000000", other.shape, other.string)
    (tmp_path / "other.fsp").write_bytes(forged)
    with pytest.raises(ValueError, match="payload of model 00000000"):
        run(configured(code, BUNDLE=bundle, PAYLOAD=tmp_path / "other.fsp"))
