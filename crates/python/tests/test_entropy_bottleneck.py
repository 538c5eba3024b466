"""The coder against CompressAI 1.2.8's own tables, strings and decoded
latents (crates/codec/tests/fixtures/compressai_codec.json, made by
tools/fixtures/gen_codec_fixtures.py with CompressAI; no torch here)."""

import json

import numpy as np
import pytest

import frankensplit


@pytest.fixture(scope="module")
def reference(root):
    with open(root / "crates/codec/tests/fixtures/compressai_codec.json") as f:
        return json.load(f)["entropy_bottleneck"]


def state_dict(reference, legacy=False):
    """The bottleneck's parameters as numpy arrays, in CompressAI's new or old naming."""
    out = {}
    for name, t in reference["params"].items():
        if legacy:
            kind, _, i = name.partition(".")
            old = {"matrices": "_matrix", "biases": "_bias", "factors": "_factor"}.get(kind)
            name = f"{old}{i}" if old else name
        out["entropy_bottleneck." + name] = np.array(t["data"], dtype=np.float32).reshape(t["shape"])
    return out


def padded(tables):
    return np.array(tables["quantized_cdf"], dtype=np.int32)


def assert_tables(eb, tables, near_ties=0):
    """Tables equal CompressAI's; up to `near_ties` rows may differ by one
    count where float rounding straddles a half-integer (the fixture has one
    such row per formula when tables are rebuilt from the density; the Rust
    parity test, crates/codec/tests/compressai_parity.rs, checks why)."""
    cdf, lengths, offsets = eb.tables()
    np.testing.assert_array_equal(lengths, tables["cdf_length"])
    np.testing.assert_array_equal(offsets, tables["offset"])
    differing = 0
    for c, n in enumerate(tables["cdf_length"]):
        ours, theirs = cdf[c, :n], np.array(tables["quantized_cdf"][c][:n])
        if not np.array_equal(ours, theirs):
            differing += 1
            assert np.abs(ours - theirs).max() == 1, f"row {c}"
    assert differing <= near_ties, f"{differing} rows differ"


def test_tables_from_the_density_are_compressais_for_both_formulas_and_namings(reference):
    new = frankensplit.EntropyBottleneck.from_state_dict(state_dict(reference))
    assert new.channels == reference["channels"]
    assert_tables(new, reference["tables_direct"], near_ties=1)
    np.testing.assert_array_equal(new.medians, np.array(reference["medians"], dtype=np.float32))

    # Old names mean CompressAI <= 1.2.6 checkpoints: sign-flipped by default, either on request.
    old = state_dict(reference, legacy=True)
    assert "entropy_bottleneck._matrix0" in old
    assert_tables(frankensplit.EntropyBottleneck.from_state_dict(old), reference["tables_sign_flipped"], 1)
    assert_tables(
        frankensplit.EntropyBottleneck.from_state_dict(old, formula="direct"), reference["tables_direct"], 1
    )
    assert_tables(
        frankensplit.EntropyBottleneck.from_state_dict(state_dict(reference), formula="sign-flipped"),
        reference["tables_sign_flipped"],
        1,
    )


def with_tables(reference, tables):
    """The state dict as a CompressAI model holds it after `update()`: with `tables`."""
    sd = state_dict(reference)
    sd["entropy_bottleneck._quantized_cdf"] = padded(tables)
    sd["entropy_bottleneck._cdf_length"] = np.array(tables["cdf_length"], dtype=np.int32)
    sd["entropy_bottleneck._offset"] = np.array(tables["offset"], dtype=np.int32)
    return sd


def test_tables_a_state_dict_holds_are_used_as_they_are(reference):
    tables = reference["tables_sign_flipped"]
    sd = with_tables(reference, tables)
    assert_tables(frankensplit.EntropyBottleneck.from_state_dict(sd), tables)
    # An explicit formula rebuilds them.
    assert_tables(
        frankensplit.EntropyBottleneck.from_state_dict(sd, formula="direct"), reference["tables_direct"], 1
    )
    eb = frankensplit.EntropyBottleneck.from_tables(
        padded(tables), tables["cdf_length"], tables["offset"], reference["medians"]
    )
    assert_tables(eb, tables)


def coder(reference):
    """The coder of CompressAI's own tables (`update()`'s, held in the state dict)."""
    return frankensplit.EntropyBottleneck.from_state_dict(with_tables(reference, reference["tables_direct"]))


@pytest.mark.parametrize("case", range(4))
def test_strings_symbols_and_latents_are_compressais(reference, case):
    eb = coder(reference)
    latent = reference["latents"][case]
    c, h, w = latent["shape"]
    y = np.array(latent["latent"], dtype=np.float32).reshape(1, c, h, w)
    strings = eb.compress(y)
    assert len(strings) == 1 and strings[0].hex() == latent["string"], latent["name"]

    reference_string = bytes.fromhex(latent["string"])
    decoded = eb.decompress([reference_string], (h, w))
    assert decoded.shape == (1, c, h, w) and decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded.ravel(), np.array(latent["decoded"], dtype=np.float32))
    symbols = eb.decompress_symbols([reference_string], (c, h, w))
    assert symbols.dtype == np.int32
    np.testing.assert_array_equal(symbols.ravel(), latent["symbols"])


def test_a_batch_is_coded_as_its_latents_one_by_one(reference):
    eb = coder(reference)
    rng = np.random.default_rng(3)
    y = (rng.laplace(size=(16, eb.channels, 7, 9)) * 3).astype(np.float32) + eb.medians[None, :, None, None]
    y[5, 2, 3, 4] = 400.0  # far outside the tables: an escape
    strings = eb.compress(y)
    assert len(strings) == 16
    for i in range(16):
        assert eb.compress(y[i : i + 1]) == [strings[i]]
    decoded = eb.decompress(strings, (7, 9))
    medians = eb.medians[None, :, None, None]
    np.testing.assert_array_equal(decoded, np.round(y - medians) + medians)
    # float64 and non-contiguous input are converted as numpy converts them.
    np.testing.assert_array_equal(eb.compress(y.astype(np.float64)[:, :, :, :]), strings)
    assert eb.compress(np.zeros((0, eb.channels, 2, 2), dtype=np.float32)) == []


def test_bad_input_raises_value_error_and_never_crashes(reference):
    eb = coder(reference)
    good = eb.compress(np.zeros((1, eb.channels, 4, 4), dtype=np.float32))[0]
    with pytest.raises(ValueError, match="string 0"):
        eb.decompress([b"\x01\x02"], (4, 4))
    with pytest.raises(ValueError, match="channels"):
        eb.decompress([good], (3, 4, 4))
    with pytest.raises(ValueError):
        eb.decompress([good], (1 << 20, 1 << 20))  # over the decoder's bound: refused before allocating
    with pytest.raises(ValueError):
        eb.decompress([good], (0, 4))
    with pytest.raises(ValueError, match="4-D"):
        eb.compress(np.zeros((eb.channels, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        eb.compress(np.full((1, eb.channels, 1, 1), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="quantiles"):
        frankensplit.EntropyBottleneck.from_state_dict({"x": np.zeros(3)})
    with pytest.raises(ValueError, match="formula"):
        frankensplit.EntropyBottleneck.from_state_dict(state_dict(reference), formula="fancy")
    with pytest.raises(ValueError, match="mapping"):
        frankensplit.EntropyBottleneck.from_state_dict([1, 2])
