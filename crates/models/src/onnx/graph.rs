//! The graph builder behind [`super`]'s exports: ONNX nodes in topological
//! order, the bundle's weights as initializers under their bundle names,
//! the constants derived from them (relative position biases, shifted-window
//! masks), and the networks' building blocks as ONNX operators: the residual
//! block, LayerNorm, exact GELU, Swin's window attention, block, stage and
//! patch merging. It re-describes `layers.rs` and `swin.rs` op by op, so it
//! changes with them.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use super::proto::*;
use crate::layers::Activation;
use crate::swin::{relative_position_index, shifted_window_mask, BlockSpec};

/// LayerNorm's epsilon everywhere in these models (PyTorch's default).
const LAYER_NORM_EPS: f32 = 1e-5;

pub(super) fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: values.to_vec(),
        r#type: ATTRIBUTE_INTS,
        ..Default::default()
    }
}

pub(super) fn int(name: &str, value: i64) -> AttributeProto {
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

pub(super) fn fixed(n: i64) -> Dimension {
    Dimension {
        dim_value: Some(n),
        dim_param: None,
    }
}

pub(super) fn batch() -> Dimension {
    Dimension {
        dim_value: None,
        dim_param: Some("batch".into()),
    }
}

pub(super) fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// One graph under construction: nodes in topological order (each node's
/// output is named after the node), the bundle's weights added as
/// initializers on first use, and small constants shared by value.
pub(super) struct GraphBuilder<'a> {
    graph: GraphProto,
    weights: &'a SafeTensors<'a>,
    names: HashSet<String>,
    int_constants: HashMap<(bool, Vec<i64>), String>,
    float_constants: HashMap<u32, String>,
}

impl<'a> GraphBuilder<'a> {
    pub(super) fn new(name: &str, weights: &'a SafeTensors<'a>) -> Self {
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

    pub(super) fn claim(&mut self, name: &str) {
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

    pub(super) fn node(&mut self, name: &str, op: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
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

    pub(super) fn reshape(&mut self, name: &str, x: &str, shape: &[i64]) -> String {
        let shape = self.int64s(shape, false);
        self.node(name, "Reshape", &[x, &shape], Vec::new())
    }

    pub(super) fn transpose(&mut self, name: &str, x: &str, perm: &[i64]) -> String {
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
    pub(super) fn residual_block(
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
    pub(super) fn linear(&mut self, x: &str, key: &str, bias: bool) -> Result<String> {
        let weight = self.weight(&format!("{key}.weight"))?;
        let transposed = self.transpose(&format!("{key}.weight_t"), &weight, &[1, 0]);
        let y = self.node(&format!("{key}.matmul"), "MatMul", &[x, &transposed], Vec::new());
        if !bias {
            return Ok(y);
        }
        let b = self.weight(&format!("{key}.bias"))?;
        Ok(self.node(key, "Add", &[&y, &b], Vec::new()))
    }

    pub(super) fn layer_norm(&mut self, x: &str, key: &str) -> Result<String> {
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
    pub(super) fn tokenize(&mut self, key: &str, x: &str, channels: i64) -> String {
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
    pub(super) fn swin_stage(&mut self, x: &str, key: &str, spec: BlockSpec, depth: usize) -> Result<String> {
        let mut x = x.to_string();
        for i in 0..depth {
            x = self.swin_block(&x, &format!("{key}.{i}"), spec.in_stage(i, &[]))?;
        }
        Ok(x)
    }

    /// Patch merging (swin.rs's `PatchMerging`) on tokens `(B, H·W, C)`:
    /// the 2×2 neighbours (0,0), (1,0), (0,1), (1,1) concatenated, then norm and reduction.
    pub(super) fn patch_merging(&mut self, x: &str, key: &str, (h, w): (i64, i64), c: i64) -> Result<String> {
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
    pub(super) fn finish(mut self, input: (&str, Vec<Dimension>), output: (&str, Vec<Dimension>)) -> ModelProto {
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

#[cfg(test)]
mod tests {
    use prost::Message;

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
