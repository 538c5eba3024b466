"""The edge encoder and the payload container from Python against the
`frankensplit-edge` binary's payloads, on a built-in model."""

import json
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

import frankensplit


def write_png(path, rgb):
    """An 8-bit RGB PNG (stdlib only: zlib for the IDAT, filter 0 on every row)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def edge_payloads(edge_binary, bundle, images, out):
    """What `frankensplit-edge encode --json` writes for each image, in order."""
    run = subprocess.run(
        [str(edge_binary), "encode", "--json", "--model", str(bundle), "-o", str(out), *map(str, images)],
        check=True,
        capture_output=True,
        text=True,
    )
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [Path(line["image"]).name for line in lines] == [p.name for p in images]
    return [Path(line["payload"]).read_bytes() for line in lines]


def test_payloads_equal_the_edge_binarys(tmp_path, root, bundle, edge_binary):
    rng = np.random.default_rng(11)
    noise = rng.integers(0, 256, size=(90, 130, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, 120 * 96 * 3).reshape(120, 96, 3).astype(np.uint8)
    write_png(tmp_path / "noise.png", noise)
    write_png(tmp_path / "ramp.png", ramp)
    images = [tmp_path / "noise.png", tmp_path / "ramp.png", root / "fixtures/images/gradient_300x250.png"]
    expected = edge_payloads(edge_binary, bundle, images, tmp_path / "out")

    encoder = frankensplit.Encoder(bundle)
    for image, payload in zip(images, expected):
        assert encoder.encode(image) == payload, image.name
        assert encoder.encode(str(image)) == payload
    # The same pixels as an array give the same payload as the file.
    assert encoder.encode(noise) == expected[0]
    assert encoder.encode(ramp) == expected[1]


def test_a_payload_parses_rebuilds_and_decodes(bundle):
    encoder = frankensplit.Encoder(bundle)
    image = np.random.default_rng(2).integers(0, 256, size=(100, 100, 3), dtype=np.uint8)
    payload = encoder.encode(image)
    parsed = frankensplit.Payload.parse(payload)
    assert parsed.fingerprint == encoder.fingerprint
    assert parsed.shape == encoder.latent_shape
    assert frankensplit.Payload.build(parsed.fingerprint, parsed.shape, parsed.string) == payload
    assert frankensplit.Payload(parsed.fingerprint, parsed.shape, parsed.string) == parsed

    c, h, w = parsed.shape
    latent = encoder.encode_latent(image)
    assert latent.shape == (c, h, w)
    eb = frankensplit.EntropyBottleneck.from_bundle(bundle)
    assert eb.compress(latent[None]) == [parsed.string]
    decoded = eb.decompress([parsed.string], (h, w))[0]
    medians = eb.medians[:, None, None]
    np.testing.assert_array_equal(decoded, np.round(latent - medians) + medians)
    np.testing.assert_array_equal(
        encoder.entropy_bottleneck.decompress([parsed.string], (c, h, w))[0], decoded
    )


def test_bad_inputs_raise_and_say_what_to_fix(tmp_path, bundle):
    with pytest.raises(OSError):
        frankensplit.Encoder(tmp_path / "no-such-bundle")
    with pytest.raises(OSError, match="calibrat"):
        frankensplit.Encoder(bundle, int8=True, calibration=tmp_path / "missing.json")
    encoder = frankensplit.Encoder(bundle)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        encoder.encode(np.zeros((10, 10), dtype=np.uint8))
    # 20,000² pixels as a view of 3 bytes: refused before it is copied.
    huge = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (20000, 20000, 3))
    with pytest.raises(ValueError, match="larger than"):
        encoder.encode(huge)
    with pytest.raises(OSError):
        encoder.encode(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(OSError):
        encoder.encode(tmp_path / "junk.png")
    with pytest.raises(ValueError):
        frankensplit.Payload.parse(b"\x00\x01")
    with pytest.raises(ValueError, match="hex"):
        frankensplit.Payload("xyz", (1, 1, 1), b"")
