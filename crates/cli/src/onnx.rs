//! `frankensplit export-onnx`: a bundle's parts as ONNX graphs, so that
//! other runtimes can run the sender and receiver sides (the entropy coder
//! stays in Rust: its strings are CompressAI's, see docs/format.md).
//!
//! Only the encoder part is exported so far: g_a's Conv/Relu/Add graph
//! (opset 17), with the bundle's weights as initializers. The decoder
//! (Conv-Swin) and backbone-tail parts are not written yet.
//!
//! The messages below are the fields of ONNX's `onnx.proto` (ONNX IR 8)
//! that such a graph needs, with their tag numbers from that file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use prost::Message;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

/// `AttributeProto.AttributeType.INTS`.
const ATTRIBUTE_INTS: i32 = 7;

#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

/// `TensorProto.DataType.FLOAT`.
const FLOAT: i32 = 1;

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TensorTypeProto>,
}

/// `TypeProto.Tensor`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

/// `TensorShapeProto.Dimension`: a size, or a name for a free one.
#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

/// Which side of the split to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// The device's encoder g_a: image `(batch, 3, S, S)` → latent `(batch, C, S/8, S/8)`.
    Encoder,
    /// The server's decoder g_s (not yet exported).
    Decoder,
    /// The backbone after the split (not yet exported).
    Tail,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Model bundle directory.
    #[arg(long, value_parser = crate::builtin::parse_model)]
    model: PathBuf,
    /// Which part: encoder (decoder and tail are not yet supported).
    #[arg(long, value_enum)]
    part: Part,
    /// Output file (.onnx).
    #[arg(short, long)]
    output: PathBuf,
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: values.to_vec(),
        r#type: ATTRIBUTE_INTS,
    }
}

fn value_info(name: &str, dims: &[Dimension]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: FLOAT,
                shape: Some(TensorShapeProto { dim: dims.to_vec() }),
            }),
        }),
    }
}

fn fixed(n: usize) -> Dimension {
    Dimension {
        dim_value: Some(n as i64),
        dim_param: None,
    }
}

fn named(name: &str) -> Dimension {
    Dimension {
        dim_value: None,
        dim_param: Some(name.into()),
    }
}

/// g_a of the bundle in `dir` as an ONNX model.
pub fn encoder_graph(dir: &Path) -> Result<ModelProto> {
    // Opening checks the fingerprint and every shape of g_a.
    let arch = frankensplit_edge::EdgeModel::open(dir)
        .with_context(|| format!("cannot load model {}", dir.display()))?
        .spec;
    let bytes = std::fs::read(dir.join("weights.safetensors"))?;
    let tensors = SafeTensors::deserialize(&bytes)?;
    let mut graph = GraphProto {
        name: "frankensplit_encoder".into(),
        ..Default::default()
    };
    let conv = |graph: &mut GraphProto, input: &str, name: &str, stride: i64| -> Result<String> {
        let mut inputs = vec![input.to_string()];
        let mut kernel = 0;
        for part in ["weight", "bias"] {
            let key = format!("compressor.g_a.{name}.{part}");
            let view = tensors
                .tensor(&key)
                .with_context(|| format!("the bundle lacks {key}"))?;
            if view.dtype() != Dtype::F32 {
                bail!("{key} is {:?}, expected F32", view.dtype());
            }
            if part == "weight" {
                kernel = view.shape()[2] as i64;
            }
            graph.initializer.push(TensorProto {
                dims: view.shape().iter().map(|&d| d as i64).collect(),
                data_type: FLOAT,
                name: key.clone(),
                raw_data: view.data().to_vec(),
            });
            inputs.push(key);
        }
        let pad = kernel / 2;
        let output = name.to_string();
        graph.node.push(NodeProto {
            input: inputs,
            output: vec![output.clone()],
            name: name.into(),
            op_type: "Conv".into(),
            attribute: vec![
                ints("kernel_shape", &[kernel, kernel]),
                ints("strides", &[stride, stride]),
                ints("pads", &[pad, pad, pad, pad]),
            ],
        });
        Ok(output)
    };
    let unary = |graph: &mut GraphProto, op: &str, input: &str, output: String| -> String {
        graph.node.push(NodeProto {
            input: vec![input.into()],
            output: vec![output.clone()],
            name: output.clone(),
            op_type: op.into(),
            attribute: Vec::new(),
        });
        output
    };
    let mut x = "image".to_string();
    for block in ["rb1", "rb2", "rb3"] {
        let mut h = conv(&mut graph, &x, &format!("{block}.conv1"), 2)?;
        if arch.act_after_conv1 {
            h = unary(&mut graph, "Relu", &h, format!("{block}.act1"));
        }
        let h = conv(&mut graph, &h, &format!("{block}.conv2"), 1)?;
        let h = unary(&mut graph, "Relu", &h, format!("{block}.act"));
        let skip = conv(&mut graph, &x, &format!("{block}.skip"), 2)?;
        let output = if block == "rb3" {
            "latent".to_string()
        } else {
            format!("{block}.out")
        };
        graph.node.push(NodeProto {
            input: vec![h, skip],
            output: vec![output.clone()],
            name: format!("{block}.add"),
            op_type: "Add".into(),
            attribute: Vec::new(),
        });
        x = output;
    }
    let side = arch.input_size;
    graph.input.push(value_info(
        "image",
        &[named("batch"), fixed(3), fixed(side), fixed(side)],
    ));
    graph.output.push(value_info(
        "latent",
        &[
            named("batch"),
            fixed(arch.latent_channels),
            fixed(side / 8),
            fixed(side / 8),
        ],
    ));
    Ok(ModelProto {
        ir_version: 8,
        producer_name: "frankensplit".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
    })
}

pub fn run(args: ExportArgs) -> Result<()> {
    let model = match args.part {
        Part::Encoder => encoder_graph(&args.model)?,
        Part::Decoder => {
            bail!("--part decoder is not supported yet: only the encoder (the device's side) can be exported")
        }
        Part::Tail => bail!("--part tail is not supported yet: only the encoder (the device's side) can be exported"),
    };
    let bytes = model.encode_to_vec();
    frankensplit_edge::write_atomically(&args.output, &bytes)?;
    let graph = model.graph.as_ref().expect("built with a graph");
    println!(
        "wrote {} ({} bytes): {} nodes, {} initializers, opset 17; check it with tools/onnx/check_encoder.py",
        args.output.display(),
        bytes.len(),
        graph.node.len(),
        graph.initializer.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_follows_onnx_proto_tags() {
        // A field with tag t and wire type w starts with the varint (t << 3) | w.
        let node = NodeProto {
            input: vec!["a".into()],
            output: vec!["b".into()],
            name: "n".into(),
            op_type: "Relu".into(),
            attribute: vec![ints("pads", &[1])],
        };
        let bytes = node.encode_to_vec();
        assert_eq!(&bytes[..3], &[(1 << 3) | 2, 1, b'a']);
        assert_eq!(&bytes[3..6], &[(2 << 3) | 2, 1, b'b']);
        assert_eq!(&bytes[6..9], &[(3 << 3) | 2, 1, b'n']);
        assert_eq!(&bytes[9..15], &[(4 << 3) | 2, 4, b'R', b'e', b'l', b'u']);
        // attribute (tag 5): name (1), ints (8, packed), type (20 = INTS 7).
        let attribute = &bytes[15..];
        assert_eq!(attribute[0], (5 << 3) | 2);
        assert_eq!(&attribute[2..8], &[(1 << 3) | 2, 4, b'p', b'a', b'd', b's']);
        assert_eq!(&attribute[8..11], &[(8 << 3) | 2, 1, 1]);
        // Tag 20 needs two bytes of varint: (20 << 3) | 0 = 160 = 0xa0 0x01.
        assert_eq!(&attribute[11..], &[0xa0, 0x01, 7]);
        assert_eq!(NodeProto::decode(bytes.as_slice()).unwrap(), node);
    }
}
