//! A bundle's parts as ONNX graphs (opset 17, ONNX IR 8), so that other
//! runtimes can run the sender and receiver sides (`frankensplit
//! export-onnx`); the entropy coder stays in Rust (its strings are
//! CompressAI's, see docs/format.md). The three parts chain: `image →
//! encoder → latent`, `latent → decoder → features`, `features → tail →
//! logits`.
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
//! strided Slice + Concat ([`graph`]). The batch dimension is symbolic
//! (`batch`) in every part: all reshapes keep it as `-1` or `0`.
//!
//! [`check_data`] computes the tch model's own input and output for the part
//! (a seeded batch of two) and [`write_check_data`] stores them, for
//! `tools/onnx/check_parts.py` to run through ONNX Runtime.

mod graph;
pub mod proto;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use frankensplit_bundle::{names, VerifiedBundle};
use safetensors::tensor::{Dtype, TensorView};
use tch::nn::Module;
use tch::{Device, Kind, Tensor};

use crate::layers::Activation;
use crate::swin::BlockSpec;
use crate::Bundle;
use graph::{batch, f32_bytes, fixed, int, ints, GraphBuilder};
use proto::ModelProto;

/// Which side of the split to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub fn io(self) -> (&'static str, &'static str) {
        match self {
            Part::Encoder => ("image", "latent"),
            Part::Decoder => ("latent", "features"),
            Part::Tail => ("features", "logits"),
        }
    }

    /// The part's name, as `--part` and the check data's metadata give it.
    pub fn name(self) -> &'static str {
        match self {
            Part::Encoder => "encoder",
            Part::Decoder => "decoder",
            Part::Tail => "tail",
        }
    }
}

/// Batch of the check data: two samples, so that a graph that mixes samples
/// up in its reshapes cannot pass.
const CHECK_BATCH: i64 = 2;

/// The bundle in `dir` as stored, its weights checked against its manifest's
/// fingerprint.
fn verified(dir: &Path) -> Result<VerifiedBundle> {
    VerifiedBundle::open(dir).with_context(|| format!("cannot load model {}", dir.display()))
}

/// g_a of the bundle in `dir` as an ONNX model.
pub fn encoder_graph(dir: &Path) -> Result<ModelProto> {
    let bundle = verified(dir)?;
    let c = &bundle.manifest.architecture.compressor;
    let tensors = bundle.tensors()?;
    let (input, output) = Part::Encoder.io();
    let mut b = GraphBuilder::new("frankensplit_encoder", &tensors);
    b.claim(input);
    let mut x = input.to_string();
    for block in ["rb1", "rb2", "rb3"] {
        x = b.residual_block(
            &x,
            &format!("{}{block}", names::ENCODER),
            2,
            Activation::Relu,
            c.act_after_conv1,
            true,
        )?;
    }
    let side = c.input_size;
    Ok(b.finish(
        (input, vec![batch(), fixed(3), fixed(side), fixed(side)]),
        (
            output,
            vec![batch(), fixed(c.latent_channels), fixed(side / 8), fixed(side / 8)],
        ),
    ))
}

/// g_s of `bundle` as an ONNX model: the dequantised latent to the restored
/// features `(batch, tokens, width)`, as `Bundle::restore_features` computes them.
pub fn decoder_graph(bundle: &Bundle) -> Result<ModelProto> {
    let arch = &bundle.manifest.architecture;
    if arch.blueprint() != crate::DecoderBlueprint::Swin {
        anyhow::bail!(
            "ONNX export covers the Conv-Swin decoder of Swin backbones; this bundle's backbone is a {}",
            arch.backbone.family()
        );
    }
    let stored = verified(&bundle.dir)?;
    let tensors = stored.tensors()?;
    let c = &arch.compressor;
    let side = c.latent_size();
    let (input, output) = Part::Decoder.io();
    let key = format!("{}g_s", names::COMPRESSOR);
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
    let stored = verified(&bundle.dir)?;
    let tensors = stored.tensors()?;
    let arch = &bundle.manifest.architecture;
    let backbone = arch.backbone.as_swin().ok_or_else(|| {
        anyhow::anyhow!(
            "ONNX export covers Swin backbones; this bundle's is a {}",
            arch.backbone.family()
        )
    })?;
    let stages = backbone.num_stages();
    let (input, output) = Part::Tail.io();
    let mut b = GraphBuilder::new("frankensplit_tail", &tensors);
    b.claim(input);
    let mut x = input.to_string();
    for i in arch.split_stage..stages {
        let key = format!("{}layers.{i}", names::BACKBONE);
        let spec = BlockSpec::for_stage(backbone, i);
        x = b.swin_stage(&x, &format!("{key}.blocks"), spec, backbone.depths[i] as usize)?;
        if i + 1 < stages {
            x = b.patch_merging(&x, &format!("{key}.downsample"), spec.resolution, spec.dim)?;
        }
    }
    let x = b.layer_norm(&x, &format!("{}norm", names::BACKBONE))?;
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

/// Writes `path` (atomically): a safetensors file with `tensors` (float32)
/// and `part`, `input` and `output` in its metadata.
pub fn write_check_data(path: &Path, part: Part, tensors: [(&str, &Tensor); 2]) -> Result<()> {
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
    frankensplit_fsio::write_file(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}
