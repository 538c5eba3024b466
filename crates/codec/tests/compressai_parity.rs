//! Parity with CompressAI, against fixtures made by CompressAI itself
//! (`tools/fixtures/gen_codec_fixtures.py`): quantised CDFs, tables built from
//! a trained EntropyBottleneck, Gaussian tables, and strings byte for byte.

use std::collections::HashMap;
use std::sync::OnceLock;

use frankensplit_codec::{
    decode_with_indexes, encode_with_indexes, gaussian, pmf_to_quantized_cdf, CdfTables, DecodeLimits,
    EntropyBottleneck, FactorizedDensity, GaussianConditional, LatentShape, LikelihoodFormula, ParamTensor,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixture() -> &'static Value {
    static FIXTURE: OnceLock<Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let text = include_str!("fixtures/compressai_codec.json");
        serde_json::from_str(text).expect("fixture is valid JSON")
    })
}

fn ints<T: TryFrom<i64>>(v: &Value) -> Vec<T> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| T::try_from(x.as_i64().expect("integer")).ok().expect("in range"))
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn hex(v: &Value) -> Vec<u8> {
    let s = v.as_str().expect("hex string");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn compressai_tables(v: &Value) -> CdfTables {
    let rows: Vec<Vec<i32>> = v["quantized_cdf"].as_array().unwrap().iter().map(ints).collect();
    let width = rows[0].len();
    let flat: Vec<i32> = rows.concat();
    CdfTables::from_compressai(&flat, width, &ints::<i32>(&v["cdf_length"]), &ints::<i32>(&v["offset"])).unwrap()
}

fn eb_params() -> HashMap<String, ParamTensor> {
    fixture()["entropy_bottleneck"]["params"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            let tensor = ParamTensor {
                shape: ints(&t["shape"]),
                data: floats(&t["data"]),
            };
            (format!("entropy_bottleneck.{name}"), tensor)
        })
        .collect()
}

fn density(params: &HashMap<String, ParamTensor>) -> FactorizedDensity {
    FactorizedDensity::from_state_dict("entropy_bottleneck.", |name| params.get(name).cloned()).unwrap()
}

/// Compares tables row by row so a failure names the first differing row.
fn assert_tables_eq(ours: &CdfTables, theirs: &CdfTables, what: &str) {
    assert_eq!(ours.num_rows(), theirs.num_rows(), "{what}: row count");
    for r in 0..ours.num_rows() {
        assert_eq!(ours.offsets()[r], theirs.offsets()[r], "{what}: offset of row {r}");
        assert_eq!(ours.cdf(r), theirs.cdf(r), "{what}: CDF row {r}");
    }
}

#[test]
fn quantized_cdfs_equal_compressai() {
    for (i, case) in fixture()["pmf_cases"].as_array().unwrap().iter().enumerate() {
        let cdf = pmf_to_quantized_cdf(&floats(&case["pmf"])).unwrap();
        assert_eq!(cdf, ints::<u32>(&case["cdf"]), "pmf case {i}");
    }
}

#[test]
fn raw_coder_strings_equal_compressai() {
    let raw = &fixture()["raw_coder"];
    let tables = compressai_tables(raw);
    for case in raw["cases"].as_array().unwrap() {
        let symbols: Vec<i32> = ints(&case["symbols"]);
        let indexes: Vec<u32> = ints(&case["indexes"]);
        let expected = hex(&case["string"]);
        assert_eq!(encode_with_indexes(&symbols, &indexes, &tables).unwrap(), expected);
        assert_eq!(decode_with_indexes(&expected, &indexes, &tables).unwrap(), symbols);
    }
}

fn float_rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(floats).collect()
}

/// Quantising the very pmfs PyTorch computed in `update()` gives CompressAI's
/// tables exactly, for both pmf formulas.
#[test]
fn quantising_torch_update_pmfs_gives_compressai_tables() {
    let eb = &fixture()["entropy_bottleneck"];
    for (pmfs, tables) in [
        ("pmfs_direct", "tables_direct"),
        ("pmfs_sign_flipped", "tables_sign_flipped"),
    ] {
        let expected = compressai_tables(&eb[tables]);
        let rows = float_rows(&eb[pmfs])
            .iter()
            .map(|p| pmf_to_quantized_cdf(p).unwrap())
            .collect();
        let ours = CdfTables::new(rows, expected.offsets().to_vec()).unwrap();
        assert_tables_eq(&ours, &expected, tables);
    }
}

/// Our density reproduces PyTorch's `update()` pmfs to float precision, and
/// the recomputed tables equal CompressAI's except where PyTorch's own `f32`
/// rounding decides a near-tie: a differing bin differs by one unit and its
/// probability·2^16 rounds one way for PyTorch and the other way for us.
#[test]
fn recomputed_tables_match_compressai_up_to_float_ties() {
    let eb = &fixture()["entropy_bottleneck"];
    let density = density(&eb_params());
    assert_eq!(density.medians(), floats(&eb["medians"]));
    let mut identical_rows = 0;
    for (formula, pmfs, tables) in [
        (LikelihoodFormula::Direct, "pmfs_direct", "tables_direct"),
        (
            LikelihoodFormula::SignFlipped,
            "pmfs_sign_flipped",
            "tables_sign_flipped",
        ),
    ] {
        let torch_pmfs = float_rows(&eb[pmfs]);
        let expected = compressai_tables(&eb[tables]);
        let (offsets, our_pmfs) = density.update_pmfs(formula).unwrap();
        assert_eq!(offsets, expected.offsets(), "{tables}: offsets");
        for (c, (ours, theirs)) in our_pmfs.iter().zip(&torch_pmfs).enumerate() {
            assert_eq!(ours.len(), theirs.len(), "{tables}: pmf length of channel {c}");
            for (k, (a, b)) in ours.iter().zip(theirs).enumerate() {
                // A few ulps of a sigmoid near 0.5, amplified by the difference of two sigmoids.
                assert!((a - b).abs() <= 2.5e-7, "{tables}: channel {c} bin {k}: {a} vs {b}");
            }
        }
        let ours = density.build_tables(formula).unwrap();
        for c in 0..density.channels() {
            if ours.cdf(c) == expected.cdf(c) {
                identical_rows += 1;
                continue;
            }
            // The rows differ, so the pmfs must round differently before
            // rescaling somewhere, and only where a half-integer lies between
            // our scaled probability and PyTorch's.
            let mut straddles = 0;
            for (k, (&ours, &theirs)) in our_pmfs[c].iter().zip(&torch_pmfs[c]).enumerate() {
                let (ours, theirs) = (ours * 65536.0, theirs * 65536.0);
                if ours.round() != theirs.round() {
                    let boundary = theirs.floor() + 0.5;
                    assert!(
                        (ours.round() - theirs.round()).abs() == 1.0 && (ours - boundary) * (theirs - boundary) <= 0.0,
                        "{tables}: channel {c} bin {k}: {ours} vs {theirs} is no near-tie"
                    );
                    straddles += 1;
                }
            }
            assert!(straddles > 0, "{tables}: channel {c} differs without a near-tie");
        }
    }
    // 96 rows in all (48 channels, two formulas); the fixture has one near-tie row.
    println!("{identical_rows} of 96 recomputed rows identical to CompressAI's");
    assert!(identical_rows >= 94, "only {identical_rows} of 96 rows identical");
}

#[test]
fn both_parameter_namings_load_the_same_density() {
    let params = eb_params();
    let renamed: HashMap<String, ParamTensor> = params
        .iter()
        .map(|(name, t)| {
            let name = ["matrices", "biases", "factors"]
                .iter()
                .zip(["_matrix", "_bias", "_factor"])
                .fold(name.clone(), |n, (new, old)| {
                    (0..8).fold(n, |n, i| n.replace(&format!("{new}.{i}"), &format!("{old}{i}")))
                });
            (name, t.clone())
        })
        .collect();
    assert!(renamed.contains_key("entropy_bottleneck._matrix0"));
    assert!(!renamed.contains_key("entropy_bottleneck.matrices.0"));
    assert_eq!(density(&renamed), density(&params));
}

#[test]
fn cumulative_logits_match_torch() {
    let eb = &fixture()["entropy_bottleneck"];
    let density = density(&eb_params());
    let grid = floats(&eb["logits_grid"]);
    let expected = floats(&eb["logits_cumulative"]);
    for c in 0..density.channels() {
        for (k, &x) in grid.iter().enumerate() {
            let ours = density.logits_cumulative(c, x);
            let theirs = expected[c * grid.len() + k];
            let tolerance = 1e-5 * theirs.abs().max(1.0);
            assert!(
                (ours - theirs).abs() <= tolerance,
                "channel {c}, x = {x}: {ours} vs {theirs}"
            );
        }
    }
}

#[test]
fn entropy_bottleneck_strings_equal_compressai() {
    let eb_fixture = &fixture()["entropy_bottleneck"];
    let eb = EntropyBottleneck::from_tables(
        compressai_tables(&eb_fixture["tables_direct"]),
        floats(&eb_fixture["medians"]),
    )
    .unwrap();
    {
        for case in eb_fixture["latents"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let dims: Vec<u32> = ints(&case["shape"]);
            let shape = LatentShape::new(dims[0], dims[1], dims[2]);
            let latent = floats(&case["latent"]);
            let symbols: Vec<i32> = ints(&case["symbols"]);
            let string = hex(&case["string"]);
            assert_eq!(eb.quantize(&latent, shape).unwrap(), symbols, "{name}: symbols");
            assert_eq!(eb.compress(&latent, shape).unwrap(), string, "{name}: string");
            let limits = DecodeLimits::default();
            assert_eq!(
                eb.decompress_symbols(&string, shape, limits).unwrap(),
                symbols,
                "{name}: decoded symbols"
            );
            assert_eq!(
                eb.decompress(&string, shape, limits).unwrap(),
                floats(&case["decoded"]),
                "{name}: dequantised"
            );
        }
    }
}

#[test]
fn escape_and_tie_cases_are_exercised() {
    let eb = &fixture()["entropy_bottleneck"];
    let tables = compressai_tables(&eb["tables_direct"]);
    let mut escapes = 0;
    let mut ties = 0;
    let medians = floats(&eb["medians"]);
    for case in eb["latents"].as_array().unwrap() {
        let dims: Vec<usize> = ints(&case["shape"]);
        let plane = dims[1] * dims[2];
        let latent = floats(&case["latent"]);
        for (i, &s) in ints::<i32>(&case["symbols"]).iter().enumerate() {
            let c = i / plane;
            let value = i64::from(s) - i64::from(tables.offsets()[c]);
            escapes += usize::from(value < 0 || value >= tables.cdf(c).len() as i64 - 2);
            ties += usize::from((latent[i] - medians[c]).fract().abs() == 0.5);
        }
    }
    assert!(escapes >= 12, "only {escapes} escaped symbols in the fixture");
    assert!(ties >= 48, "only {ties} exact ties in the fixture");
}

#[test]
fn gaussian_conditional_equals_compressai() {
    let gc_fixture = &fixture()["gaussian_conditional"];
    let table = floats(&gc_fixture["scale_table"]);
    let ours_default = gaussian::default_scale_table();
    let max_ulps = table
        .iter()
        .zip(&ours_default)
        .map(|(a, b)| (a.to_bits() as i64 - b.to_bits() as i64).abs())
        .max()
        .unwrap();
    assert!(
        max_ulps <= 2,
        "default scale table differs from torch's by {max_ulps} ulps"
    );

    let gc = GaussianConditional::new(
        table,
        gc_fixture["scale_bound"].as_f64().unwrap() as f32,
        gc_fixture["tail_mass"].as_f64().unwrap(),
    )
    .unwrap();
    let expected = &gc_fixture["tables"];
    let (padded, width, lengths, offsets) = gc.tables().to_compressai();
    assert_eq!(width, expected["width"].as_u64().unwrap() as usize);
    assert_eq!(lengths, ints::<i32>(&expected["cdf_length"]));
    assert_eq!(offsets, ints::<i32>(&expected["offset"]));
    let narrow: Vec<Vec<u32>> = expected["narrow_rows"].as_array().unwrap().iter().map(ints).collect();
    for (r, row) in narrow.iter().enumerate() {
        assert_eq!(gc.tables().cdf(r), row.as_slice(), "row {r}");
    }
    let bytes: Vec<u8> = padded.iter().flat_map(|v| v.to_le_bytes()).collect();
    let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, expected["padded_sha256"].as_str().unwrap(), "wide rows differ");

    let scales = floats(&gc_fixture["scales"]);
    let means = floats(&gc_fixture["means"]);
    let values = floats(&gc_fixture["values"]);
    let indexes = gc.build_indexes(&scales);
    assert_eq!(indexes, ints::<u32>(&gc_fixture["indexes"]));
    let string = hex(&gc_fixture["string"]);
    assert_eq!(gc.compress(&values, &indexes, Some(&means)).unwrap(), string);
    let decoded = gc
        .decompress(&string, &indexes, Some(&means), DecodeLimits::default())
        .unwrap();
    assert_eq!(decoded, floats(&gc_fixture["decoded"]));
}
