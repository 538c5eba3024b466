//! End to end against the PyTorch reference (`tools/fixtures/gen_e2e_fixture.py`):
//! a reference-style checkpoint (original key names, full-size compressor,
//! swin_s3_base_224 tail with one block per stage) goes through
//! `frankensplit convert`, then `frankensplit classify --json` on a 256×256
//! PNG must give the reference's logits (1e-4 relative), top-5, and
//! CompressAI's payload bytes.
//!
//! The weights are not committed: both sides draw them from libtorch's
//! generator with the same seed, order and scaling (`draw`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
mod common;

use common::{bin, run};
use frankensplit_models::{Architecture, Backbone, BackboneConfig, Compressor, SwinConfig};
use serde_json::Value;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// One parameter drawn as the fixture script's `draw` does.
fn draw(key: &str, shape: &[i64]) -> Tensor {
    let t = Tensor::randn(shape, (Kind::Float, Device::Cpu));
    if key.ends_with("quantiles") {
        return t * 0.5 + Tensor::from_slice(&[-8.0f32, 0.0, 8.0]);
    }
    if key.contains(".matrices.") {
        let scale = 10f64.powf(1.0 / 5.0);
        return t * 0.05 + (1.0 / scale / shape[1] as f64).exp_m1().ln();
    }
    if key.contains(".biases.") || key.contains(".factors.") {
        return t * 0.3;
    }
    if key.ends_with("relative_position_bias_table") || key.ends_with(".bias") {
        return t * 0.02;
    }
    if key.ends_with(".weight") && shape.len() == 1 {
        return t * 0.1 + 1.0;
    }
    let fan_in: i64 = shape[1..].iter().product();
    t * (1.0 / (fan_in as f64).sqrt())
}

fn architecture(depths: &[i64]) -> Architecture {
    let backbone = SwinConfig {
        depths: depths.to_vec(),
        ..SwinConfig::swin_s3_base_224()
    };
    Architecture {
        backbone: BackboneConfig::Swin(backbone),
        ..Architecture::default()
    }
}

/// The reference checkpoint's state dict, with the duplicated reconstruction layer.
fn reference_state_dict(arch: &Architecture, seed: i64) -> Vec<(String, Tensor)> {
    // libtorch's generator is global and model construction draws from it
    // too: tests running in parallel must not interleave with the draws below.
    static DRAWING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = DRAWING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let compressor_vars = VarStore::new(Device::Cpu);
    let _compressor = Compressor::new(&compressor_vars.root(), &arch.compressor, arch.blueprint());
    let backbone_vars = VarStore::new(Device::Cpu);
    let _tail = Backbone::new(&backbone_vars.root(), &arch.backbone, arch.split_stage..4);
    let mut shapes = BTreeMap::new();
    for (name, t) in compressor_vars.variables() {
        shapes.insert(format!("compression_module.{name}"), t.size());
    }
    for (name, t) in backbone_vars.variables() {
        shapes.insert(format!("backbone.{name}"), t.size());
    }
    tch::manual_seed(seed);
    let mut state: Vec<(String, Tensor)> = shapes.iter().map(|(k, s)| (k.clone(), draw(k, s))).collect();
    let duplicates: Vec<(String, Tensor)> = state
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("compression_module.g_s.final_layer.")
                .map(|r| (format!("reconstruction_layer.{r}"), t.copy()))
        })
        .collect();
    state.extend(duplicates);
    state
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("frankensplit-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn float_list(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn int_list(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn top5_classes(report: &Value) -> Vec<i64> {
    report["top_k"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["class"].as_i64().unwrap())
        .collect()
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("e2e_expected.json")).unwrap()).unwrap()
}

fn int_rows(v: &Value) -> Vec<Vec<i32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap() as i32)
                .collect()
        })
        .collect()
}

/// CompressAI's `update()` buffers from the fixture, as a checkpoint saved after `update()` holds them.
fn update_buffers(expected: &Value) -> Vec<(String, Tensor)> {
    let cdf = int_rows(&expected["quantized_cdf"]);
    let (rows, width) = (cdf.len() as i64, cdf[0].len() as i64);
    let flat: Vec<i32> = cdf.concat();
    let ints = |key: &str| -> Vec<i32> {
        expected[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap() as i32)
            .collect()
    };
    let prefix = "compression_module.entropy_bottleneck.";
    vec![
        (
            format!("{prefix}_quantized_cdf"),
            Tensor::from_slice(&flat).view([rows, width]),
        ),
        (format!("{prefix}_cdf_length"), Tensor::from_slice(&ints("cdf_length"))),
        (format!("{prefix}_offset"), Tensor::from_slice(&ints("offset"))),
    ]
}

/// Draws the reference model, writes it as a checkpoint (with CompressAI's
/// `update()` buffers when asked) and converts it; returns the work
/// directory, the bundle and `convert`'s output.
fn convert_reference(
    expected: &Value,
    name: &str,
    with_update_buffers: bool,
    extra: &[&str],
) -> (PathBuf, PathBuf, String) {
    let arch = architecture(&int_list(&expected["tail_depths"]));
    let work = temp_dir(name);
    let mut state = reference_state_dict(&arch, expected["seed"].as_i64().unwrap());
    if with_update_buffers {
        state.extend(update_buffers(expected));
    }
    let checkpoint = work.join("reference.safetensors");
    Tensor::write_safetensors(&state, &checkpoint).unwrap();
    let arch_file = work.join("arch.toml");
    std::fs::write(&arch_file, toml::to_string(&arch).unwrap()).unwrap();
    let bundle = work.join("bundle");
    let mut args = vec![
        "convert",
        "--checkpoint",
        path_str(&checkpoint),
        "--arch",
        path_str(&arch_file),
        "-o",
        path_str(&bundle),
    ];
    args.extend_from_slice(extra);
    let output = run(&args);
    (work, bundle, output)
}

#[test]
fn converted_reference_checkpoint_classifies_like_pytorch() {
    let expected = expected();
    let (work, bundle, converted) = convert_reference(&expected, "convert", true, &[]);
    assert!(converted.contains("entropy tables Checkpoint"), "{converted}");
    let payloads = work.join("payloads");
    let image = fixtures().join("e2e_input.png");
    let out = run(&[
        "classify",
        "--json",
        "--model",
        path_str(&bundle),
        "--save-payloads",
        path_str(&payloads),
        path_str(&image),
    ]);
    let report: Value = serde_json::from_str(out.trim()).unwrap();

    let (ours, theirs) = (float_list(&report["logits"]), float_list(&expected["logits"]));
    let err = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt()
        / theirs.iter().map(|b| b * b).sum::<f64>().sqrt();
    println!("logits relative L2 error {err:e}");
    assert!(err <= 1e-4, "logits differ: relative L2 {err:e}");
    assert_eq!(top5_classes(&report), int_list(&expected["top5"]));

    let payload = std::fs::read(payloads.join("e2e_input.fsp")).unwrap();
    let parsed = frankensplit_codec::Payload::parse(&payload).unwrap();
    let string: String = parsed.string.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(payload.len() - parsed.string.len(), 8, "container overhead");
    assert_eq!(
        string,
        expected["string"].as_str().unwrap(),
        "payload differs from CompressAI's string"
    );

    let info: Value = serde_json::from_str(run(&["info", "--json", "--model", path_str(&bundle)]).trim()).unwrap();
    let params: BTreeMap<String, i64> = info["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_i64().unwrap()))
        .collect();
    assert_eq!(params["encoder (g_a)"], 141_696);
    assert_eq!(params["compression module"], 2_203_598);
    let _ = std::fs::remove_dir_all(&work);
}

/// Without `update()` buffers the tables are rebuilt from the density; they
/// equal CompressAI's except at float near-ties (see docs/format.md), and the
/// prediction is unchanged because the symbols are.
#[test]
fn recomputed_tables_match_compressai_but_for_near_ties() {
    let expected = expected();
    let (work, bundle, converted) =
        convert_reference(&expected, "recompute", false, &["--likelihood-formula", "direct"]);
    assert!(converted.contains("entropy tables Recomputed"), "{converted}");

    let weights: BTreeMap<String, Tensor> = Tensor::read_safetensors(bundle.join("weights.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let ours = &weights["entropy_tables.quantized_cdf"];
    let lengths = Vec::<i32>::try_from(&weights["entropy_tables.cdf_length"]).unwrap();
    let theirs = int_rows(&expected["quantized_cdf"]);
    let identical = (0..theirs.len())
        .filter(|&r| {
            let n = lengths[r] as usize;
            Vec::<i32>::try_from(ours.get(r as i64).narrow(0, 0, n as i64)).unwrap() == theirs[r][..n]
        })
        .count();
    println!("{identical} of {} recomputed rows equal CompressAI's", theirs.len());
    assert!(
        identical + 2 >= theirs.len(),
        "only {identical} of {} rows equal",
        theirs.len()
    );

    let out = run(&[
        "classify",
        "--json",
        "--model",
        path_str(&bundle),
        path_str(&fixtures().join("e2e_input.png")),
    ]);
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(top5_classes(&report), int_list(&expected["top5"]));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn conversion_errors_name_what_to_fix() {
    let work = temp_dir("errors");
    let arch_file = work.join("arch.toml");
    std::fs::write(&arch_file, toml::to_string(&architecture(&[2, 2, 1, 1])).unwrap()).unwrap();
    let bundle = work.join("bundle");
    let convert = |checkpoint: &Path| {
        bin()
            .args([
                "convert",
                "--checkpoint",
                path_str(checkpoint),
                "--arch",
                path_str(&arch_file),
                "-o",
                path_str(&bundle),
            ])
            .output()
            .unwrap()
    };
    // A checkpoint of another architecture (the small fixture config) is refused with the mismatching keys.
    let small = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/reference_checkpoint.pt");
    let out = convert(&small);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("wrong shape") && stderr.contains("g_a.rb1.conv1.weight"),
        "{stderr}"
    );
    assert!(!bundle.exists(), "a failed conversion left a bundle behind");
    // Not a checkpoint at all.
    let junk = work.join("junk.pt");
    std::fs::write(&junk, b"junk").unwrap();
    let out = convert(&junk);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a PyTorch zip checkpoint"));
    let _ = std::fs::remove_dir_all(&work);
}

/// A checkpoint without `backbone.*` plus timm weights of the whole backbone
/// (here in timm ≥ 0.9's layout) gives the same bundle weights as a checkpoint
/// that carries the backbone tail itself.
#[test]
fn backbone_from_separate_timm_weights() {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models");
    let arch = models.join("small_arch.toml");
    let work = temp_dir("backbone");
    let full = work.join("full");
    run(&[
        "convert",
        "--checkpoint",
        path_str(&models.join("reference_checkpoint.pt")),
        "--arch",
        path_str(&arch),
        "-o",
        path_str(&full),
    ]);

    let state: Vec<(String, Tensor)> =
        frankensplit_models::convert::read_state_dict(&models.join("reference_checkpoint.pt"), Default::default())
            .unwrap()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("backbone."))
            .collect();
    let headless = work.join("headless.safetensors");
    Tensor::write_safetensors(&state, &headless).unwrap();
    let timm: Vec<(String, Tensor)> = Tensor::read_safetensors(models.join("swin_timm10.safetensors"))
        .unwrap()
        .into_iter()
        .filter_map(|(k, t)| k.strip_prefix("weights.").map(|k| (k.to_string(), t)))
        .collect();
    let timm_file = work.join("timm10.safetensors");
    Tensor::write_safetensors(&timm, &timm_file).unwrap();

    let missing = bin()
        .args([
            "convert",
            "--checkpoint",
            path_str(&headless),
            "--arch",
            path_str(&arch),
            "-o",
            path_str(&work.join("x")),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--backbone-weights"));

    let convert_with_timm = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "convert",
            "--checkpoint",
            path_str(&headless),
            "--backbone-weights",
            path_str(&timm_file),
            "--arch",
            path_str(&arch),
            "-o",
            path_str(out),
        ];
        args.extend_from_slice(extra);
        run(&args);
    };
    let split = work.join("split");
    convert_with_timm(&["--tail-only"], &split);
    let whole = work.join("whole");
    convert_with_timm(&[], &whole);
    let load = |dir: &Path| -> BTreeMap<String, Tensor> {
        Tensor::read_safetensors(dir.join("weights.safetensors"))
            .unwrap()
            .into_iter()
            .collect()
    };
    let (a, b) = (load(&full), load(&split));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "{k} differs");
    }
    // Without --tail-only the stages before the split come along, for image classification.
    let c = load(&whole);
    let extra: Vec<&String> = c.keys().filter(|k| !a.contains_key(*k)).collect();
    assert!(a.keys().all(|k| c[k].equal(&a[k])));
    assert!(extra.iter().any(|k| k.starts_with("backbone.patch_embed.")));
    assert!(
        extra.iter().all(
            |k| ["backbone.patch_embed.", "backbone.layers.0.", "backbone.layers.1."]
                .iter()
                .any(|p| k.starts_with(p))
        ),
        "{extra:?}"
    );
    let _ = std::fs::remove_dir_all(&work);
}
