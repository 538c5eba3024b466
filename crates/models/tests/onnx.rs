//! ONNX export on the built-in demo model (`models/demo/`): every part's
//! graph is well formed, carries exactly its part's weights, and, evaluated
//! op by op on libtorch, gives the tch model's output that `check_data`
//! computes and `write_check_data` stores.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use frankensplit_bundle::{MANIFEST, WEIGHTS};
use frankensplit_models::onnx::{self, proto, Part};
use frankensplit_models::Bundle;
use prost::Message;
use safetensors::SafeTensors;
use tch::{Device, Kind, Tensor};

fn demo_weights(file: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/demo")
        .join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The demo bundle (λ 0.64, what `--model demo` names) in `dir`, put
/// together as the CLI unpacks it: the shared backbone's and the
/// compressor's tensors in one weights file, so the manifest's fingerprint holds.
fn demo_bundle(dir: &Path) -> PathBuf {
    let backbone = demo_weights("backbone.safetensors");
    let compressor = demo_weights("l0.64/compressor.safetensors");
    let backbone = SafeTensors::deserialize(&backbone).unwrap();
    let compressor = SafeTensors::deserialize(&compressor).unwrap();
    let tensors: Vec<_> = backbone.tensors().into_iter().chain(compressor.tensors()).collect();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(WEIGHTS), safetensors::serialize(tensors, &None).unwrap()).unwrap();
    std::fs::write(dir.join(MANIFEST), demo_weights("l0.64/model.toml")).unwrap();
    dir.to_path_buf()
}

#[test]
fn the_encoder_graph_holds_g_a_with_its_weights() {
    let work = std::env::temp_dir().join(format!("frankensplit-onnx-{}", std::process::id()));
    let dir = demo_bundle(&work.join("demo"));
    let bytes = onnx::encoder_graph(&dir).unwrap().encode_to_vec();
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

/// A tensor's name, dims and bytes.
type Stored = (Vec<i64>, Vec<u8>);

/// The demo bundle's tensors that `part` must carry: g_a, g_s, or the
/// backbone from the split stage (2) on.
fn part_weights(part: Part) -> BTreeMap<String, Stored> {
    let (file, keep): (&str, fn(&str) -> bool) = match part {
        Part::Encoder => ("l0.64/compressor.safetensors", |k| k.starts_with("compressor.g_a.")),
        Part::Decoder => ("l0.64/compressor.safetensors", |k| k.starts_with("compressor.g_s.")),
        Part::Tail => ("backbone.safetensors", |k| {
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

/// `part` of the bundle in `dir` as a runtime reads it (encoded and decoded
/// again), and the input and output that `check_data` computes, through the
/// file `write_check_data` writes into `work`.
fn export(part: Part, dir: &Path, work: &Path) -> (proto::ModelProto, Tensor, Tensor) {
    let bundle = Bundle::open(dir, Device::Cpu).unwrap();
    let model = match part {
        Part::Encoder => onnx::encoder_graph(dir),
        Part::Decoder => onnx::decoder_graph(&bundle),
        Part::Tail => onnx::tail_graph(&bundle),
    }
    .unwrap();
    let model = proto::ModelProto::decode(model.encode_to_vec().as_slice()).unwrap();
    let (input, output) = onnx::check_data(&bundle, part).unwrap();
    let (input_name, output_name) = part.io();
    let check = work.join(format!("{}.safetensors", part.name()));
    onnx::write_check_data(&check, part, [(input_name, &input), (output_name, &output)]).unwrap();
    let bytes = std::fs::read(&check).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["part"], part.name());
    let mut tensors: HashMap<String, Tensor> = Tensor::read_safetensors(&check).unwrap().into_iter().collect();
    (
        model,
        tensors.remove(&meta["input"]).unwrap(),
        tensors.remove(&meta["output"]).unwrap(),
    )
}

#[test]
fn every_part_reproduces_the_tch_model() {
    let work = std::env::temp_dir().join(format!("frankensplit-onnx-parts-{}", std::process::id()));
    let dir = demo_bundle(&work.join("demo"));
    // The demo model: latent 12×12×12 (decoder window 6 with a shift of 3 on
    // the 12×12 grid), features 36 tokens × 128, ten classes.
    let shapes = [
        (
            Part::Encoder,
            ["batch", "3", "96", "96"].as_slice(),
            ["batch", "12", "12", "12"].as_slice(),
        ),
        (Part::Decoder, &["batch", "12", "12", "12"], &["batch", "36", "128"]),
        (Part::Tail, &["batch", "36", "128"], &["batch", "10"]),
    ];
    let mut io = Vec::new();
    for (part, input_dims, output_dims) in shapes {
        let (model, input, want) = export(part, &dir, &work);
        assert_eq!(model.ir_version, 8);
        assert_eq!(
            (model.opset_import[0].domain.as_str(), model.opset_import[0].version),
            ("", 17)
        );
        let graph = model.graph.unwrap();
        assert_eq!(dims(&graph.input[0]), input_dims, "{part:?} input");
        assert_eq!(dims(&graph.output[0]), output_dims, "{part:?} output");
        check_structure(&graph, &part_weights(part));
        if part == Part::Decoder {
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
                "{part:?}, batch {batch}: differs by {worst} (scale {scale})"
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
