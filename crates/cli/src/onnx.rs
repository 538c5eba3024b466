//! `frankensplit export-onnx`: a bundle's parts as ONNX graphs (opset 17,
//! ONNX IR 8), so that other runtimes can run the sender and receiver sides;
//! the entropy coder stays in Rust (its strings are CompressAI's, see
//! docs/format.md). The three parts chain: `image → encoder → latent`,
//! `latent → decoder → features`, `features → tail → logits`.
//!
//! - encoder: g_a's Conv/Relu/Add graph;
//! - decoder: g_s on the dequantised latent ŷ, up to the restored backbone
//!   tokens `(batch, tokens, width)`, the layout the tch model hands to the tail;
//! - tail: the backbone's stages after the split point, its norm, the token
//!   mean and the head.
//!
//! The bundle's weights are initializers under their bundle names, with the
//! bytes as stored (linear weights keep PyTorch's `(out, in)` and go through
//! a Transpose that runtimes fold). What the tch model derives at load time
//! is computed here once and stored as constants: each attention's relative
//! position bias gathered into `[heads, N, N]`, each shifted-window mask.
//! Swin's window partition and reverse are Reshape/Transpose, the cyclic
//! shift is Slice + Concat, GELU is the exact erf form, patch merging is
//! strided Slice + Concat. The batch dimension is symbolic (`batch`) in every
//! part: all reshapes keep it as `-1` or `0`.
//!
//! `--check-data FILE` also writes the tch model's own input and output for
//! the part (a seeded batch of two), which `tools/onnx/check_parts.py` runs
//! through ONNX Runtime.

pub mod proto;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use frankensplit_models::layers::Activation;
use frankensplit_models::swin::{relative_position_index, shifted_window_mask, BlockSpec};
use frankensplit_models::Bundle;
use prost::Message;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use tch::nn::Module;
use tch::{Device, Kind, Tensor};

use proto::*;

/// Which side of the split to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// The device's encoder g_a: image `(batch, 3, S, S)` → latent `(batch, C, S/8, S/8)`.
    Encoder,
    /// The server's decoder g_s: dequantised latent → restored features `(batch, tokens, width)`.
    Decoder,
    /// The backbone after the split: restored features → logits `(batch, classes)`.
    Tail,
}

impl Part {
    /// Names of the graph's input and output; consecutive parts share them.
    fn io(self) -> (&'static str, &'static str) {
        match self {
            Part::Encoder => ("image", "latent"),
            Part::Decoder => ("latent", "features"),
            Part::Tail => ("features", "logits"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Part::Encoder => "encoder",
            Part::Decoder => "decoder",
            Part::Tail => "tail",
        }
    }
}

#[derive(Args)]
pub struct ExportArgs {
    /// Model bundle directory.
    #[arg(long, value_parser = crate::builtin::parse_model)]
    model: PathBuf,
    /// Which part: encoder (device), decoder (server, latent → features) or
    /// tail (server, features → logits).
    #[arg(long, value_enum)]
    part: Part,
    /// Output file (.onnx).
    #[arg(short, long)]
    output: PathBuf,
    /// Also write a safetensors file with a seeded random input of the part
    /// (batch 2) and the tch model's output for it, named after the graph's
    /// input and output; tools/onnx/check_parts.py compares ONNX Runtime with it.
    #[arg(long)]
    check_data: Option<PathBuf>,
}

/// Batch of the check data: two samples, so that a graph that mixes samples
/// up in its reshapes cannot pass.
const CHECK_BATCH: i64 = 2;

/// LayerNorm's epsilon everywhere in these models (PyTorch's default).
const LAYER_NORM_EPS: f32 = 1e-5;

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: values.to_vec(),
        r#type: ATTRIBUTE_INTS,
        ..Default::default()
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: Some(value),
        r#type: ATTRIBUTE_INT,
        ..Default::default()
    }
}

fn float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f: Some(value),
        r#type: ATTRIBUTE_FLOAT,
        ..Default::default()
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

fn fixed(n: i64) -> Dimension {
    Dimension {
        dim_value: Some(n),
        dim_param: None,
    }
}

fn batch() -> Dimension {
    Dimension {
        dim_value: None,
        dim_param: Some("batch".into()),
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// One graph under construction: nodes in topological order (each node's
/// output is named after the node), the bundle's weights added as
/// initializers on first use, and small constants shared by value.
struct GraphBuilder<'a> {
    graph: GraphProto,
    weights: &'a SafeTensors<'a>,
    names: HashSet<String>,
    int_constants: HashMap<(bool, Vec<i64>), String>,
    float_constants: HashMap<u32, String>,
}

impl<'a> GraphBuilder<'a> {
    fn new(name: &str, weights: &'a SafeTensors<'a>) -> Self {
        Self {
            graph: GraphProto {
                name: name.into(),
                ..Default::default()
            },
            weights,
            names: HashSet::new(),
            int_constants: HashMap::new(),
            float_constants: HashMap::new(),
        }
    }

    fn claim(&mut self, name: &str) {
        assert!(self.names.insert(name.to_string()), "two values named {name}");
    }

    /// The bundle's float32 tensor `key`: its shape and values.
    fn weight_view(&self, key: &str) -> Result<TensorView<'a>> {
        let view = self.weights.tensor(key).with_context(|| {
            format!("the bundle lacks {key}: export a bundle written by `convert` or `train` with this part's weights")
        })?;
        if view.dtype() != Dtype::F32 {
            bail!(
                "{key} is {:?} in the bundle; the exporter needs F32 weights",
                view.dtype()
            );
        }
        Ok(view)
    }

    fn weight_values(&self, key: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let view = self.weight_view(key)?;
        let values = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((view.shape().to_vec(), values))
    }

    /// The bundle's tensor `key` as an initializer of the same name and bytes.
    fn weight(&mut self, key: &str) -> Result<String> {
        if !self.names.contains(key) {
            let view = self.weight_view(key)?;
            self.claim(key);
            self.graph.initializer.push(TensorProto {
                dims: view.shape().iter().map(|&d| d as i64).collect(),
                data_type: FLOAT,
                name: key.into(),
                raw_data: view.data().to_vec(),
            });
        }
        Ok(key.into())
    }

    /// A float constant the export derives (not a bundle tensor).
    fn derived(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<i64>() as usize, values.len());
        self.claim(name);
        self.graph.initializer.push(TensorProto {
            dims: dims.to_vec(),
            data_type: FLOAT,
            name: name.into(),
            raw_data: f32_bytes(values),
        });
        name.into()
    }

    fn scalar(&mut self, value: f32) -> String {
        if let Some(name) = self.float_constants.get(&value.to_bits()) {
            return name.clone();
        }
        let name = format!("const.f32.{}", self.float_constants.len());
        self.derived(&name, &[], &[value]);
        self.float_constants.insert(value.to_bits(), name.clone());
        name
    }

    /// An int64 constant: a 1-D list, or a scalar when `scalar`.
    fn int64s(&mut self, values: &[i64], scalar: bool) -> String {
        let key = (scalar, values.to_vec());
        if let Some(name) = self.int_constants.get(&key) {
            return name.clone();
        }
        let name = format!("const.i64.{}", self.int_constants.len());
        self.claim(&name);
        self.graph.initializer.push(TensorProto {
            dims: if scalar { Vec::new() } else { vec![values.len() as i64] },
            data_type: INT64,
            name: name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        self.int_constants.insert(key, name.clone());
        name
    }

    fn node(&mut self, name: &str, op: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
        self.claim(name);
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.into()],
            name: name.into(),
            op_type: op.into(),
            attribute,
        });
        name.into()
    }

    /// Renames the value the last node produced (nothing consumes it yet).
    fn rename_last(&mut self, name: &str) {
        self.claim(name);
        let node = self.graph.node.last_mut().expect("a graph with nodes");
        node.output = vec![name.into()];
    }

    fn reshape(&mut self, name: &str, x: &str, shape: &[i64]) -> String {
        let shape = self.int64s(shape, false);
        self.node(name, "Reshape", &[x, &shape], Vec::new())
    }

    fn transpose(&mut self, name: &str, x: &str, perm: &[i64]) -> String {
        self.node(name, "Transpose", &[x], vec![ints("perm", perm)])
    }

    fn slice(&mut self, name: &str, x: &str, starts: &[i64], ends: &[i64], axes: &[i64], steps: &[i64]) -> String {
        let inputs = [
            self.int64s(starts, false),
            self.int64s(ends, false),
            self.int64s(axes, false),
            self.int64s(steps, false),
        ];
        self.node(
            name,
            "Slice",
            &[x, &inputs[0], &inputs[1], &inputs[2], &inputs[3]],
            Vec::new(),
        )
    }

    /// A 2-D convolution `{key}.weight`/`.bias` with "same" padding, as the residual blocks use.
    fn conv(&mut self, x: &str, key: &str, stride: i64) -> Result<String> {
        let weight = self.weight(&format!("{key}.weight"))?;
        let bias = self.weight(&format!("{key}.bias"))?;
        let kernel = self.weight_view(&weight)?.shape()[2] as i64;
        let pad = kernel / 2;
        Ok(self.node(
            key,
            "Conv",
            &[x, &weight, &bias],
            vec![
                ints("kernel_shape", &[kernel, kernel]),
                ints("strides", &[stride, stride]),
                ints("pads", &[pad, pad, pad, pad]),
            ],
        ))
    }

    fn activation(&mut self, name: &str, x: &str, activation: Activation) -> String {
        match activation {
            Activation::Relu => self.node(name, "Relu", &[x], Vec::new()),
            // tch's leaky_relu slope.
            Activation::LeakyRelu => self.node(name, "LeakyRelu", &[x], vec![float("alpha", 0.01)]),
        }
    }

    /// FrankenSplit's `ResidualBlockWithStride` (layers.rs): `act(conv2(act1(conv1(x)))) + skip(x)`.
    fn residual_block(
        &mut self,
        x: &str,
        key: &str,
        stride: i64,
        activation: Activation,
        act_after_conv1: bool,
        skip: bool,
    ) -> Result<String> {
        let mut h = self.conv(x, &format!("{key}.conv1"), stride)?;
        if act_after_conv1 {
            h = self.activation(&format!("{key}.act1"), &h, activation);
        }
        let h = self.conv(&h, &format!("{key}.conv2"), 1)?;
        let h = self.activation(&format!("{key}.act"), &h, activation);
        let skip = if skip {
            self.conv(x, &format!("{key}.skip"), stride)?
        } else {
            x.to_string()
        };
        Ok(self.node(&format!("{key}.add"), "Add", &[&h, &skip], Vec::new()))
    }

    /// `x · Wᵀ (+ b)` with the bundle's `{key}.weight` `(out, in)`.
    fn linear(&mut self, x: &str, key: &str, bias: bool) -> Result<String> {
        let weight = self.weight(&format!("{key}.weight"))?;
        let transposed = self.transpose(&format!("{key}.weight_t"), &weight, &[1, 0]);
        let y = self.node(&format!("{key}.matmul"), "MatMul", &[x, &transposed], Vec::new());
        if !bias {
            return Ok(y);
        }
        let b = self.weight(&format!("{key}.bias"))?;
        Ok(self.node(key, "Add", &[&y, &b], Vec::new()))
    }

    fn layer_norm(&mut self, x: &str, key: &str) -> Result<String> {
        let weight = self.weight(&format!("{key}.weight"))?;
        let bias = self.weight(&format!("{key}.bias"))?;
        Ok(self.node(
            key,
            "LayerNormalization",
            &[x, &weight, &bias],
            vec![int("axis", -1), float("epsilon", LAYER_NORM_EPS)],
        ))
    }

    /// Exact GELU, as tch's `gelu("none")`: `0.5·x·(1 + erf(x/√2))`.
    fn gelu(&mut self, key: &str, x: &str) -> String {
        let sqrt2 = self.scalar(std::f32::consts::SQRT_2);
        let one = self.scalar(1.0);
        let half = self.scalar(0.5);
        let scaled = self.node(&format!("{key}.div"), "Div", &[x, &sqrt2], Vec::new());
        let erf = self.node(&format!("{key}.erf"), "Erf", &[&scaled], Vec::new());
        let shifted = self.node(&format!("{key}.add"), "Add", &[&erf, &one], Vec::new());
        let product = self.node(&format!("{key}.mul"), "Mul", &[x, &shifted], Vec::new());
        self.node(key, "Mul", &[&product, &half], Vec::new())
    }

    /// `(B, C, H, W)` → `(B, H·W, C)`.
    fn tokenize(&mut self, key: &str, x: &str, channels: i64) -> String {
        let flat = self.reshape(&format!("{key}.flatten"), x, &[0, channels, -1]);
        self.transpose(key, &flat, &[0, 2, 1])
    }

    /// `torch.roll(x, [shift, shift], [1, 2])` on `(B, H, W, C)`: each axis
    /// is its two slices swapped.
    fn roll(&mut self, key: &str, x: &str, shift: i64, height: i64, width: i64) -> String {
        let mut x = x.to_string();
        for (axis, size, label) in [(1, height, "rows"), (2, width, "cols")] {
            let k = shift.rem_euclid(size);
            if k == 0 {
                continue;
            }
            let cut = size - k;
            let tail = self.slice(&format!("{key}.{label}.tail"), &x, &[cut], &[size], &[axis], &[1]);
            let head = self.slice(&format!("{key}.{label}.head"), &x, &[0], &[cut], &[axis], &[1]);
            x = self.node(
                &format!("{key}.{label}"),
                "Concat",
                &[&tail, &head],
                vec![int("axis", axis)],
            );
        }
        x
    }

    /// Window attention (swin.rs's `WindowAttention`) on windows `(B·nW, N, C)`,
    /// with the block's shifted-window mask `(nW, N, N)` when it has one.
    fn window_attention(
        &mut self,
        key: &str,
        x: &str,
        spec: &BlockSpec,
        window: i64,
        mask: Option<&str>,
        windows: i64,
    ) -> Result<String> {
        let (c, heads) = (spec.dim, spec.num_heads);
        let n = window * window;
        let qkv = self.linear(x, &format!("{key}.qkv"), spec.qkv_bias)?;
        let qkv = self.reshape(&format!("{key}.qkv.split"), &qkv, &[-1, n, 3, heads, c / heads]);
        let qkv = self.transpose(&format!("{key}.qkv.heads"), &qkv, &[2, 0, 3, 1, 4]);
        let mut qkv_parts = Vec::new();
        for (i, label) in ["q", "k", "v"].iter().enumerate() {
            let index = self.int64s(&[i as i64], true);
            qkv_parts.push(self.node(
                &format!("{key}.{label}"),
                "Gather",
                &[&qkv, &index],
                vec![int("axis", 0)],
            ));
        }
        let scale = self.scalar(((c / heads) as f64).powf(-0.5) as f32);
        let q = self.node(&format!("{key}.q.scaled"), "Mul", &[&qkv_parts[0], &scale], Vec::new());
        let kt = self.transpose(&format!("{key}.k.t"), &qkv_parts[1], &[0, 1, 3, 2]);
        let scores = self.node(&format!("{key}.scores"), "MatMul", &[&q, &kt], Vec::new());
        let bias = self.relative_position_bias(key, heads, window)?;
        let mut scores = self.node(&format!("{key}.scores.biased"), "Add", &[&scores, &bias], Vec::new());
        if let Some(mask) = mask {
            let split = self.reshape(&format!("{key}.scores.windows"), &scores, &[-1, windows, heads, n, n]);
            let masked = self.node(&format!("{key}.scores.masked"), "Add", &[&split, mask], Vec::new());
            scores = self.reshape(&format!("{key}.scores.merged"), &masked, &[-1, heads, n, n]);
        }
        let attn = self.node(&format!("{key}.softmax"), "Softmax", &[&scores], vec![int("axis", -1)]);
        let out = self.node(&format!("{key}.context"), "MatMul", &[&attn, &qkv_parts[2]], Vec::new());
        let out = self.transpose(&format!("{key}.context.t"), &out, &[0, 2, 1, 3]);
        let out = self.reshape(&format!("{key}.context.merged"), &out, &[-1, n, c]);
        self.linear(&out, &format!("{key}.proj"), true)
    }

    /// `{key}.relative_position_bias_table` gathered as the tch model does
    /// at every forward: a `[heads, N, N]` constant.
    fn relative_position_bias(&mut self, key: &str, heads: i64, window: i64) -> Result<String> {
        let table_key = format!("{key}.relative_position_bias_table");
        let (shape, table) = self.weight_values(&table_key)?;
        let rows = ((2 * window - 1) * (2 * window - 1)) as usize;
        if shape != [rows, heads as usize] {
            bail!("{table_key} is {shape:?}, the architecture needs [{rows}, {heads}]");
        }
        let index = Vec::<i64>::try_from(relative_position_index(window).view([-1]))?;
        let n = (window * window) as usize;
        let mut bias = Vec::with_capacity(heads as usize * n * n);
        for h in 0..heads as usize {
            bias.extend(index.iter().map(|&row| table[row as usize * heads as usize + h]));
        }
        Ok(self.derived(
            &format!("{key}.relative_position_bias"),
            &[heads, n as i64, n as i64],
            &bias,
        ))
    }

    /// A Swin block (swin.rs's `SwinBlock`) on tokens `(B, H·W, C)`.
    fn swin_block(&mut self, x: &str, key: &str, spec: BlockSpec) -> Result<String> {
        let (h, w) = spec.resolution;
        let c = spec.dim;
        let (window, shift) = spec.effective_window();
        if h % window != 0 || w % window != 0 {
            bail!("{key}: a {h}×{w} grid does not split into {window}×{window} windows");
        }
        let (rows, cols) = (h / window, w / window);
        let normed = self.layer_norm(x, &format!("{key}.norm1"))?;
        let mut t = self.reshape(&format!("{key}.grid"), &normed, &[-1, h, w, c]);
        if shift > 0 {
            t = self.roll(&format!("{key}.shift"), &t, -shift, h, w);
        }
        let t = self.reshape(
            &format!("{key}.partition.split"),
            &t,
            &[-1, rows, window, cols, window, c],
        );
        let t = self.transpose(&format!("{key}.partition.t"), &t, &[0, 1, 3, 2, 4, 5]);
        let windows = self.reshape(&format!("{key}.partition"), &t, &[-1, window * window, c]);
        let mask = if shift > 0 {
            let values = Vec::<f32>::try_from(shifted_window_mask(h, w, window, shift).view([-1]))?;
            let n = window * window;
            Some(self.derived(&format!("{key}.attn_mask"), &[1, rows * cols, 1, n, n], &values))
        } else {
            None
        };
        let attended = self.window_attention(
            &format!("{key}.attn"),
            &windows,
            &spec,
            window,
            mask.as_deref(),
            rows * cols,
        )?;
        let t = self.reshape(
            &format!("{key}.reverse.split"),
            &attended,
            &[-1, rows, cols, window, window, c],
        );
        let t = self.transpose(&format!("{key}.reverse.t"), &t, &[0, 1, 3, 2, 4, 5]);
        let mut t = self.reshape(&format!("{key}.reverse"), &t, &[-1, h, w, c]);
        if shift > 0 {
            t = self.roll(&format!("{key}.unshift"), &t, shift, h, w);
        }
        let t = self.reshape(&format!("{key}.tokens"), &t, &[-1, h * w, c]);
        let x = self.node(&format!("{key}.residual1"), "Add", &[x, &t], Vec::new());
        let normed = self.layer_norm(&x, &format!("{key}.norm2"))?;
        let hidden = self.linear(&normed, &format!("{key}.mlp.fc1"), true)?;
        let hidden = self.gelu(&format!("{key}.mlp.gelu"), &hidden);
        let mlp = self.linear(&hidden, &format!("{key}.mlp.fc2"), true)?;
        Ok(self.node(&format!("{key}.residual2"), "Add", &[&x, &mlp], Vec::new()))
    }

    /// `depth` blocks of a stage laid out as `spec` (shifts alternate).
    fn swin_stage(&mut self, x: &str, key: &str, spec: BlockSpec, depth: usize) -> Result<String> {
        let mut x = x.to_string();
        for i in 0..depth {
            x = self.swin_block(&x, &format!("{key}.{i}"), spec.in_stage(i, &[]))?;
        }
        Ok(x)
    }

    /// Patch merging (swin.rs's `PatchMerging`) on tokens `(B, H·W, C)`:
    /// the 2×2 neighbours (0,0), (1,0), (0,1), (1,1) concatenated, then norm and reduction.
    fn patch_merging(&mut self, x: &str, key: &str, (h, w): (i64, i64), c: i64) -> Result<String> {
        let grid = self.reshape(&format!("{key}.grid"), x, &[-1, h, w, c]);
        let mut picks = Vec::new();
        for (dy, dx) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            picks.push(self.slice(
                &format!("{key}.pick{dy}{dx}"),
                &grid,
                &[dy, dx],
                &[h, w],
                &[1, 2],
                &[2, 2],
            ));
        }
        let picks: Vec<&str> = picks.iter().map(String::as_str).collect();
        let merged = self.node(&format!("{key}.concat"), "Concat", &picks, vec![int("axis", -1)]);
        let tokens = self.reshape(&format!("{key}.tokens"), &merged, &[0, -1, 4 * c]);
        let normed = self.layer_norm(&tokens, &format!("{key}.norm"))?;
        self.linear(&normed, &format!("{key}.reduction"), false)
    }

    /// The finished model: `input` and `output` declared with their shapes.
    fn finish(mut self, input: (&str, Vec<Dimension>), output: (&str, Vec<Dimension>)) -> ModelProto {
        self.rename_last(output.0);
        self.graph.input.push(value_info(input.0, &input.1));
        self.graph.output.push(value_info(output.0, &output.1));
        ModelProto {
            ir_version: 8,
            producer_name: "frankensplit".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(self.graph),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
        }
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
    let (input, output) = Part::Encoder.io();
    let mut b = GraphBuilder::new("frankensplit_encoder", &tensors);
    b.claim(input);
    let mut x = input.to_string();
    for block in ["rb1", "rb2", "rb3"] {
        x = b.residual_block(
            &x,
            &format!("compressor.g_a.{block}"),
            2,
            Activation::Relu,
            arch.act_after_conv1,
            true,
        )?;
    }
    let side = arch.input_size as i64;
    Ok(b.finish(
        (input, vec![batch(), fixed(3), fixed(side), fixed(side)]),
        (
            output,
            vec![
                batch(),
                fixed(arch.latent_channels as i64),
                fixed(side / 8),
                fixed(side / 8),
            ],
        ),
    ))
}

/// g_s of `bundle` as an ONNX model: the dequantised latent to the restored
/// features `(batch, tokens, width)`, as `Bundle::restore_features` computes them.
pub fn decoder_graph(bundle: &Bundle) -> Result<ModelProto> {
    let bytes = std::fs::read(bundle.dir.join("weights.safetensors"))?;
    let tensors = SafeTensors::deserialize(&bytes)?;
    let c = &bundle.manifest.architecture.compressor;
    let side = c.latent_size();
    let (input, output) = Part::Decoder.io();
    let key = "compressor.g_s";
    let mut b = GraphBuilder::new("frankensplit_decoder", &tensors);
    b.claim(input);
    // A residual block has a skip convolution exactly when its shape changes.
    let embedded = b.residual_block(
        input,
        &format!("{key}.deconv_embed.0"),
        1,
        Activation::LeakyRelu,
        c.act_after_conv1,
        c.latent_channels != c.decoder_dim,
    )?;
    let stage = format!("{key}.hybrid_stages.0");
    let tokens = b.tokenize(&format!("{stage}.tokenize"), &embedded, c.decoder_dim);
    let tokens = b.swin_stage(
        &tokens,
        &format!("{stage}.blocks"),
        BlockSpec::for_decoder(c, c.decoder_dim, c.decoder_heads),
        c.decoder_depth,
    )?;
    let grid = b.transpose(&format!("{stage}.detokenize.t"), &tokens, &[0, 2, 1]);
    let grid = b.reshape(&format!("{stage}.detokenize"), &grid, &[0, c.decoder_dim, side, side]);
    let x = b.node(&format!("{stage}.shortcut"), "Add", &[&grid, &embedded], Vec::new());
    let x = b.residual_block(
        &x,
        &format!("{stage}.conv"),
        1,
        Activation::LeakyRelu,
        c.act_after_conv1,
        c.decoder_dim != c.recon_dim,
    )?;
    let recon = format!("{key}.final_layer");
    let tokens = b.tokenize(&format!("{recon}.tokenize"), &x, c.recon_dim);
    let tokens = b.swin_stage(
        &tokens,
        &format!("{recon}.blocks"),
        BlockSpec::for_decoder(c, c.recon_dim, c.recon_heads),
        c.recon_depth,
    )?;
    let tokens = b.patch_merging(&tokens, &format!("{recon}.sample"), (side, side), c.recon_dim)?;
    b.layer_norm(&tokens, &format!("{recon}.norm"))?;
    let out_side = side / 2;
    Ok(b.finish(
        (input, vec![batch(), fixed(c.latent_channels), fixed(side), fixed(side)]),
        (output, vec![batch(), fixed(out_side * out_side), fixed(c.target_dim)]),
    ))
}

/// The backbone after the split of `bundle` as an ONNX model: restored
/// features to logits, as `Bundle::classify_features` computes them.
pub fn tail_graph(bundle: &Bundle) -> Result<ModelProto> {
    let bytes = std::fs::read(bundle.dir.join("weights.safetensors"))?;
    let tensors = SafeTensors::deserialize(&bytes)?;
    let arch = &bundle.manifest.architecture;
    let backbone = &arch.backbone;
    let stages = backbone.num_stages();
    let (input, output) = Part::Tail.io();
    let mut b = GraphBuilder::new("frankensplit_tail", &tensors);
    b.claim(input);
    let mut x = input.to_string();
    for i in arch.split_stage..stages {
        let key = format!("backbone.layers.{i}");
        let spec = BlockSpec::for_stage(backbone, i);
        x = b.swin_stage(&x, &format!("{key}.blocks"), spec, backbone.depths[i] as usize)?;
        if i + 1 < stages {
            x = b.patch_merging(&x, &format!("{key}.downsample"), spec.resolution, spec.dim)?;
        }
    }
    let x = b.layer_norm(&x, "backbone.norm")?;
    let pooled = b.node(
        "backbone.pool",
        "ReduceMean",
        &[&x],
        vec![ints("axes", &[1]), int("keepdims", 0)],
    );
    b.linear(&pooled, "backbone.head", true)?;
    let (tokens, width) = backbone.stage_input_shape(arch.split_stage);
    Ok(b.finish(
        (input, vec![batch(), fixed(tokens), fixed(width)]),
        (output, vec![batch(), fixed(backbone.num_classes)]),
    ))
}

fn open_bundle(dir: &Path) -> Result<Bundle> {
    Bundle::open(dir, Device::Cpu).with_context(|| format!("cannot load model {}", dir.display()))
}

/// The tch model's input and output for `part` on a seeded batch of random
/// images, through the server's own path: g_a, real entropy coding and
/// decoding, `restore_features`, `classify_features`.
pub fn check_data(bundle: &Bundle, part: Part) -> Result<(Tensor, Tensor)> {
    tch::manual_seed(0);
    let size = bundle.manifest.architecture.compressor.input_size;
    let images = Tensor::randn([CHECK_BATCH, 3, size, size], (Kind::Float, Device::Cpu));
    let latents = tch::no_grad(|| bundle.compressor.g_a.forward(&images));
    if part == Part::Encoder {
        return Ok((images, latents));
    }
    let decoder = &bundle.payload;
    let mut dequantized = Vec::new();
    for i in 0..CHECK_BATCH {
        let image = Vec::<f32>::try_from(images.get(i).reshape([-1]))?;
        dequantized.push(decoder.decompress(&bundle.compress(&image)?)?);
    }
    let features = bundle.restore_features(&dequantized)?;
    if part == Part::Decoder {
        let shape = bundle.latent_shape();
        let side = i64::from(shape.height);
        let latent =
            Tensor::from_slice(&dequantized.concat()).view([CHECK_BATCH, i64::from(shape.channels), side, side]);
        return Ok((latent, features));
    }
    let logits = bundle.classify_features(&features);
    Ok((features, logits))
}

/// A safetensors file with `tensors` (float32) and `part`, `input` and
/// `output` in its metadata.
fn write_check_data(path: &Path, part: Part, tensors: [(&str, &Tensor); 2]) -> Result<()> {
    let mut data = Vec::new();
    for (name, t) in tensors {
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let values = Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1]))?;
        data.push((name, shape, f32_bytes(&values)));
    }
    let views = data
        .iter()
        .map(|(name, shape, bytes)| Ok((*name, TensorView::new(Dtype::F32, shape.clone(), bytes)?)))
        .collect::<Result<Vec<_>>>()?;
    let (input, output) = part.io();
    let metadata = HashMap::from([
        ("part".to_string(), part.name().to_string()),
        ("input".to_string(), input.to_string()),
        ("output".to_string(), output.to_string()),
    ]);
    let bytes = safetensors::serialize(views, &Some(metadata))?;
    frankensplit_edge::write_atomically(path, &bytes)?;
    Ok(())
}

pub fn run(args: ExportArgs) -> Result<()> {
    // Opening checks the fingerprint and that every weight fits the architecture.
    let bundle = open_bundle(&args.model)?;
    let model = match args.part {
        Part::Encoder => encoder_graph(&args.model)?,
        Part::Decoder => decoder_graph(&bundle)?,
        Part::Tail => tail_graph(&bundle)?,
    };
    let bytes = model.encode_to_vec();
    frankensplit_edge::write_atomically(&args.output, &bytes)?;
    let graph = model.graph.as_ref().expect("built with a graph");
    println!(
        "wrote {} ({} bytes): {} nodes, {} initializers, opset 17",
        args.output.display(),
        bytes.len(),
        graph.node.len(),
        graph.initializer.len()
    );
    let Some(path) = &args.check_data else {
        println!("check it with --check-data FILE and tools/onnx/check_parts.py (or tools/onnx/check_encoder.py for the encoder)");
        return Ok(());
    };
    let (input, output) = check_data(&bundle, args.part)?;
    let (input_name, output_name) = args.part.io();
    write_check_data(path, args.part, [(input_name, &input), (output_name, &output)])?;
    println!(
        "wrote {}: {input_name} {:?} and the tch model's {output_name} {:?}; check with tools/onnx/check_parts.py {} {}",
        path.display(),
        input.size(),
        output.size(),
        args.output.display(),
        path.display()
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

    #[test]
    fn scalar_attributes_are_written_even_when_zero() {
        // onnx.proto is proto2: `i: 0` must be present (tag 3, varint), or a
        // reader sees an attribute without a value.
        let bytes = int("axis", 0).encode_to_vec();
        assert_eq!(&bytes[..6], &[(1 << 3) | 2, 4, b'a', b'x', b'i', b's']);
        assert_eq!(&bytes[6..8], &[3 << 3, 0]);
        assert_eq!(&bytes[8..], &[0xa0, 0x01, 2]);
        // f (tag 2) is a little-endian fixed32 (wire type 5).
        let bytes = float("alpha", 0.01).encode_to_vec();
        assert_eq!(bytes[7], (2 << 3) | 5);
        assert_eq!(&bytes[8..12], &0.01f32.to_le_bytes());
        assert_eq!(&bytes[12..], &[0xa0, 0x01, 1]);
    }

    #[test]
    fn roll_swaps_the_slices_as_torch_roll_does() {
        let empty: Vec<(&str, TensorView)> = Vec::new();
        let bytes = safetensors::serialize(empty, &None).unwrap();
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        let mut b = GraphBuilder::new("roll", &tensors);
        b.roll("r", "x", -2, 5, 4);
        let first = |name: &str| {
            let t = b.graph.initializer.iter().find(|t| t.name == name).unwrap();
            i64::from_le_bytes(t.raw_data[..8].try_into().unwrap())
        };
        let slices: Vec<(&str, i64, i64)> = b
            .graph
            .node
            .iter()
            .filter(|n| n.op_type == "Slice")
            .map(|n| (n.name.as_str(), first(&n.input[1]), first(&n.input[2])))
            .collect();
        // torch.roll by −2: rows 2..5 then 0..2 of 5; columns 2..4 then 0..2 of 4.
        assert_eq!(
            slices,
            [
                ("r.rows.tail", 2, 5),
                ("r.rows.head", 0, 2),
                ("r.cols.tail", 2, 4),
                ("r.cols.head", 0, 2)
            ]
        );
        assert_eq!(b.graph.node.last().unwrap().input, ["r.cols.tail", "r.cols.head"]);
    }
}
