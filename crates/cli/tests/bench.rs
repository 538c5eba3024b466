//! The split's tooling on the built-in demo model: `bench edge` (both
//! encoders run on the same weights and agree, and the report's arithmetic
//! holds together) and `export-onnx` (every part's graph is well formed,
//! carries exactly its part's weights, and, evaluated op by op on libtorch,
//! gives the tch model's output stored by `--check-data`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;
use safetensors::SafeTensors;
use serde_json::Value;
use tch::{Kind, Tensor};

/// onnx.proto's messages as the exporter writes them.
#[allow(dead_code)]
#[path = "../src/onnx/proto.rs"]
mod proto;

#[test]
fn bench_edge_times_both_encoders_on_the_same_model() {
    let cache = std::env::temp_dir().join(format!("frankensplit-bench-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_frankensplit"))
        .args([
            "bench",
            "edge",
            "--model",
            "demo",
            "--iterations",
            "3",
            "--warmup",
            "1",
            "--json",
        ])
        .env("FRANKENSPLIT_CACHE", &cache)
        .output()
        .expect("frankensplit runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The demo model's g_a: 3 → 16 → 24 → 12 at 96², a 12×12×12 latent;
    // its three blocks output 48², 24² and 12² pixels.
    assert_eq!(report["latent"]["channels"], 12);
    assert_eq!(report["latent"]["height"], 12);
    let (p1, p2, p3) = (48.0 * 48.0, 24.0 * 24.0, 12.0 * 12.0);
    let macs = report["macs"].as_f64().unwrap();
    let expected = (p1 * (27.0 * 16.0 + 144.0 * 16.0 + 3.0 * 16.0))
        + (p2 * (144.0 * 24.0 + 216.0 * 24.0 + 16.0 * 24.0))
        + (p3 * (216.0 * 12.0 + 108.0 * 12.0 + 24.0 * 12.0));
    assert_eq!(macs, expected);
    // The first block (3 → 16, 3×3 pair) folds into one 7×7 convolution:
    // 147·16 instead of 27·16 + 144·16 per output pixel.
    let folded = macs - p1 * (27.0 * 16.0 + 144.0 * 16.0 - 147.0 * 16.0);
    // Winograd computes the others' conv2 (24 → 24 at 24², 12 → 12 at 12²)
    // with 16 products per 2×2 outputs instead of 36.
    let winograd = folded - (p2 * 9.0 - p2 / 4.0 * 16.0) * 24.0 * 24.0 - (p3 * 9.0 - p3 / 4.0 * 16.0) * 12.0 * 12.0;
    let peak = report["peak_gflops"].as_f64().unwrap();
    let methods = report["encoder"].as_array().unwrap();
    // int8: the folded block, and every convolution's row of taps read in
    // groups of 4 (zero weights past it): 7·3 → 24, a 3-channel skip → 4.
    let int8 = p1 * (7.0 * 24.0 * 16.0 + 4.0 * 16.0)
        + p2 * (48.0 * 3.0 * 24.0 + 72.0 * 3.0 * 24.0 + 16.0 * 24.0)
        + p3 * (72.0 * 3.0 * 12.0 + 36.0 * 3.0 * 12.0 + 24.0 * 12.0);
    assert_eq!(methods.len(), 5);
    for method in methods {
        let name = method["name"].as_str().unwrap();
        let difference = method["max_abs_difference"].as_f64().unwrap();
        if name.contains("int8") {
            assert_eq!(method["macs"].as_f64().unwrap(), int8, "{name}");
            // Within a few of the latent's 256 levels (its values reach ≈ 13).
            assert!(difference > 0.0 && difference < 0.5, "{name}: {difference}");
            continue;
        }
        let executed = if name.contains("Winograd") {
            winograd
        } else if name.contains("folded") {
            folded
        } else {
            macs
        };
        assert_eq!(method["macs"].as_f64().unwrap(), executed, "{name}");
        assert!(difference < 1e-4, "{name}");
        let ms = method["ms"].as_f64().unwrap();
        let gflops = method["gflops"].as_f64().unwrap();
        assert!(ms > 0.0 && (gflops - 2.0 * executed / ms / 1e6).abs() < 1e-6 * gflops);
        assert!((method["fraction_of_peak"].as_f64().unwrap() - gflops / peak).abs() < 1e-9);
    }
    assert!(report["string_bytes"].as_u64().unwrap() > 8);
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn export_onnx_writes_the_encoder_with_its_weights() {
    let work = std::env::temp_dir().join(format!("frankensplit-onnx-{}", std::process::id()));
    let run = |part: &str, output: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_frankensplit"))
            .args([
                "export-onnx",
                "--model",
                "demo",
                "--part",
                part,
                "-o",
                output.to_str().unwrap(),
            ])
            .env("FRANKENSPLIT_CACHE", work.join("cache"))
            .output()
            .expect("frankensplit runs")
    };
    let file = work.join("encoder.onnx");
    let out = run("encoder", &file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&file).unwrap();
    // g_a of the demo model: 3 → 16 → 24 → 12, three 3×3 pairs and 1×1 skips.
    let weights = 4
        * (16 * 3 * 9
            + 16 * 16 * 9
            + 16 * 3
            + 3 * 16
            + 24 * 16 * 9
            + 24 * 24 * 9
            + 24 * 16
            + 3 * 24
            + 12 * 24 * 9
            + 12 * 12 * 9
            + 12 * 24
            + 3 * 12);
    assert!(
        bytes.len() > weights && bytes.len() < weights + 4096,
        "{} bytes",
        bytes.len()
    );
    let text = String::from_utf8_lossy(&bytes);
    for name in [
        "compressor.g_a.rb1.conv1.weight",
        "compressor.g_a.rb3.skip.bias",
        "Conv",
        "Relu",
        "Add",
        "latent",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    let _ = std::fs::remove_dir_all(&work);
}

fn demo_weights(file: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/demo")
        .join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A tensor's name, dims and bytes.
type Stored = (Vec<i64>, Vec<u8>);

/// The demo bundle's tensors that `part` must carry: g_a, g_s, or the
/// backbone from the split stage (2) on.
fn part_weights(part: &str) -> BTreeMap<String, Stored> {
    let (file, keep): (&str, fn(&str) -> bool) = match part {
        "encoder" => ("l0.64/compressor.safetensors", |k| k.starts_with("compressor.g_a.")),
        "decoder" => ("l0.64/compressor.safetensors", |k| k.starts_with("compressor.g_s.")),
        _ => ("backbone.safetensors", |k| {
            !k.starts_with("backbone.patch_embed.")
                && !k.starts_with("backbone.layers.0.")
                && !k.starts_with("backbone.layers.1.")
        }),
    };
    let bytes = demo_weights(file);
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensors()
        .into_iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, v)| (k, (v.shape().iter().map(|&d| d as i64).collect(), v.data().to_vec())))
        .collect()
}

fn dims(info: &proto::ValueInfoProto) -> Vec<String> {
    let shape = info
        .r#type
        .as_ref()
        .unwrap()
        .tensor_type
        .as_ref()
        .unwrap()
        .shape
        .as_ref()
        .unwrap();
    shape
        .dim
        .iter()
        .map(|d| match (&d.dim_value, &d.dim_param) {
            (Some(v), None) => v.to_string(),
            (None, Some(p)) => p.clone(),
            other => panic!("dimension {other:?}"),
        })
        .collect()
}

/// Checks that the graph is in topological order with each value defined
/// once, that it carries exactly the part's bundle tensors (same bytes) plus
/// the constants derived from them, and that every initializer is used.
fn check_structure(graph: &proto::GraphProto, weights: &BTreeMap<String, Stored>) {
    let mut defined: HashSet<&str> = HashSet::new();
    for value in graph.input.iter().map(|i| i.name.as_str()) {
        assert!(defined.insert(value), "{value} defined twice");
    }
    for t in &graph.initializer {
        assert!(defined.insert(&t.name), "{} defined twice", t.name);
    }
    let mut used: HashSet<&str> = HashSet::new();
    for node in &graph.node {
        for input in &node.input {
            assert!(
                defined.contains(input.as_str()),
                "{} reads {input} before it exists",
                node.name
            );
            used.insert(input);
        }
        for output in &node.output {
            assert!(defined.insert(output), "{output} defined twice");
        }
    }
    for output in &graph.output {
        assert!(
            defined.contains(output.name.as_str()),
            "no node computes {}",
            output.name
        );
    }
    let initializers: HashMap<&str, &proto::TensorProto> =
        graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    for (key, (shape, bytes)) in weights {
        if let Some(block) = key.strip_suffix(".attn.relative_position_bias_table") {
            // (2w − 1)² rows, one column per head, gathered into [heads, w², w²].
            let w = ((shape[0] as f64).sqrt() as i64 + 1) / 2;
            let bias = initializers[format!("{block}.attn.relative_position_bias").as_str()];
            assert_eq!(bias.dims, [shape[1], w * w, w * w], "{key}");
            assert!(
                !initializers.contains_key(key.as_str()),
                "{key} is stored as well as gathered"
            );
            continue;
        }
        let t = initializers
            .get(key.as_str())
            .unwrap_or_else(|| panic!("{key} is not an initializer"));
        assert_eq!((&t.dims, t.data_type), (shape, proto::FLOAT), "{key}");
        assert!(&t.raw_data == bytes, "{key} holds other values than the bundle");
    }
    for t in &graph.initializer {
        assert!(used.contains(t.name.as_str()), "initializer {} is unused", t.name);
        let gathered_from = |name: &str| {
            name.strip_suffix(".attn.relative_position_bias")
                .map(|block| format!("{block}.attn.relative_position_bias_table"))
        };
        if weights.contains_key(&t.name) || gathered_from(&t.name).is_some_and(|k| weights.contains_key(&k)) {
            continue;
        }
        if t.name.ends_with(".attn_mask") {
            assert_eq!((t.dims.len(), t.dims[0], t.dims[2]), (5, 1, 1), "{}", t.name);
        } else {
            assert!(
                t.raw_data.len() <= 64,
                "{} ({} bytes) is neither a weight nor a small constant",
                t.name,
                t.raw_data.len()
            );
        }
    }
}

fn attribute<'a>(node: &'a proto::NodeProto, name: &str) -> &'a proto::AttributeProto {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .unwrap_or_else(|| panic!("{} has no {name}", node.name))
}

fn float_tensor(t: &proto::TensorProto) -> Tensor {
    let values: Vec<f32> = t
        .raw_data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Tensor::from_slice(&values).view(t.dims.as_slice())
}

fn int_values(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.reshape([-1])).unwrap()
}

/// Runs the graph on libtorch, op by op, following ONNX's definitions of
/// the operators the exporter writes.
fn evaluate(graph: &proto::GraphProto, input: &Tensor) -> Tensor {
    let mut values: HashMap<String, Tensor> = HashMap::new();
    values.insert(graph.input[0].name.clone(), input.shallow_clone());
    for t in &graph.initializer {
        let value = match t.data_type {
            proto::FLOAT => float_tensor(t),
            proto::INT64 => {
                let ints: Vec<i64> = t
                    .raw_data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                Tensor::from_slice(&ints).view(t.dims.as_slice())
            }
            other => panic!("{}: data type {other}", t.name),
        };
        values.insert(t.name.clone(), value);
    }
    for node in &graph.node {
        let x: Vec<&Tensor> = node.input.iter().map(|i| &values[i]).collect();
        let axis = |name: &str| attribute(node, name).i.unwrap();
        let y = match node.op_type.as_str() {
            "Conv" => {
                let pads = &attribute(node, "pads").ints;
                let strides = &attribute(node, "strides").ints;
                x[0].conv2d(x[1], Some(x[2]), strides.as_slice(), [pads[0], pads[1]], [1, 1], 1)
            }
            "Relu" => x[0].relu(),
            "LeakyRelu" => {
                let alpha = f64::from(attribute(node, "alpha").f.unwrap());
                x[0].maximum(&(x[0] * alpha))
            }
            "Add" => x[0] + x[1],
            "Mul" => x[0] * x[1],
            "Div" => x[0] / x[1],
            "Erf" => x[0].erf(),
            "MatMul" => x[0].matmul(x[1]),
            "Transpose" => x[0].permute(attribute(node, "perm").ints.as_slice()),
            "Reshape" => {
                let size = x[0].size();
                let shape: Vec<i64> = int_values(x[1])
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| if d == 0 { size[i] } else { d })
                    .collect();
                x[0].reshape(shape.as_slice())
            }
            "Slice" => {
                let (starts, ends, axes, steps) =
                    (int_values(x[1]), int_values(x[2]), int_values(x[3]), int_values(x[4]));
                (0..starts.len()).fold(x[0].shallow_clone(), |t, i| {
                    t.slice(axes[i], starts[i], ends[i], steps[i])
                })
            }
            "Concat" => Tensor::cat(&x, axis("axis")),
            "Gather" => x[0].select(axis("axis"), x[1].int64_value(&[])),
            "Softmax" => x[0].softmax(axis("axis"), Kind::Float),
            "LayerNormalization" => {
                let width = *x[0].size().last().unwrap();
                let eps = f64::from(attribute(node, "epsilon").f.unwrap());
                assert_eq!(axis("axis"), -1);
                x[0].layer_norm([width], Some(x[1]), Some(x[2]), eps, false)
            }
            "ReduceMean" => x[0].mean_dim(
                attribute(node, "axes").ints.as_slice(),
                axis("keepdims") != 0,
                Kind::Float,
            ),
            other => panic!("{}: operator {other} is not known to this test", node.name),
        };
        values.insert(node.output[0].clone(), y);
    }
    values.remove(&graph.output[0].name).unwrap()
}

fn export(part: &str, work: &Path) -> (proto::ModelProto, Tensor, Tensor) {
    let file = work.join(format!("{part}.onnx"));
    let check = work.join(format!("{part}.safetensors"));
    let out = Command::new(env!("CARGO_BIN_EXE_frankensplit"))
        .args(["export-onnx", "--model", "demo", "--part", part, "-o"])
        .args([&file, Path::new("--check-data"), &check])
        .env("FRANKENSPLIT_CACHE", work.join("cache"))
        .output()
        .expect("frankensplit runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let model = proto::ModelProto::decode(std::fs::read(&file).unwrap().as_slice()).unwrap();
    let bytes = std::fs::read(&check).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["part"], part);
    let mut tensors: HashMap<String, Tensor> = Tensor::read_safetensors(&check).unwrap().into_iter().collect();
    (
        model,
        tensors.remove(&meta["input"]).unwrap(),
        tensors.remove(&meta["output"]).unwrap(),
    )
}

#[test]
fn export_onnx_parts_reproduce_the_tch_model() {
    let work = std::env::temp_dir().join(format!("frankensplit-onnx-parts-{}", std::process::id()));
    // The demo model: latent 12×12×12 (decoder window 6 with a shift of 3 on
    // the 12×12 grid), features 36 tokens × 128, ten classes.
    let shapes = [
        (
            "encoder",
            ["batch", "3", "96", "96"].as_slice(),
            ["batch", "12", "12", "12"].as_slice(),
        ),
        ("decoder", &["batch", "12", "12", "12"], &["batch", "36", "128"]),
        ("tail", &["batch", "36", "128"], &["batch", "10"]),
    ];
    let mut io = Vec::new();
    for (part, input_dims, output_dims) in shapes {
        let (model, input, want) = export(part, &work);
        assert_eq!(model.ir_version, 8);
        assert_eq!(
            (model.opset_import[0].domain.as_str(), model.opset_import[0].version),
            ("", 17)
        );
        let graph = model.graph.unwrap();
        assert_eq!(dims(&graph.input[0]), input_dims, "{part} input");
        assert_eq!(dims(&graph.output[0]), output_dims, "{part} output");
        check_structure(&graph, &part_weights(part));
        if part == "decoder" {
            assert_eq!(
                graph
                    .initializer
                    .iter()
                    .filter(|t| t.name.ends_with(".attn_mask"))
                    .count(),
                2
            );
        }
        assert_eq!(input.size()[0], 2);
        let scale = want.abs().max().double_value(&[]);
        for batch in [2, 1] {
            let got = tch::no_grad(|| evaluate(&graph, &input.narrow(0, 0, batch)));
            let worst = (got - want.narrow(0, 0, batch)).abs().max().double_value(&[]);
            assert!(
                worst <= 1e-4 * scale,
                "{part}, batch {batch}: differs by {worst} (scale {scale})"
            );
        }
        io.push((graph.input[0].name.clone(), graph.output[0].name.clone(), input, want));
    }
    // The parts chain: each graph's output is the next one's input, and the
    // check data follows the server's path (the decoder's input is the
    // entropy-decoded latent, the tail's input the decoder's output).
    for pair in io.windows(2) {
        assert_eq!(pair[0].1, pair[1].0);
    }
    assert!(io[1].3.equal(&io[2].2));
    let _ = std::fs::remove_dir_all(&work);
}
