//! `frankensplit export-onnx`: its flags, and the glue that writes the graph
//! [`frankensplit_models::onnx`] builds for the part asked for and, with
//! `--check-data`, the tch model's input and output for it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use frankensplit_models::{onnx, Bundle};
use prost::Message;
use tch::Device;

/// Which side of the split to export (`--part`; [`onnx::Part`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// The device's encoder g_a: image `(batch, 3, S, S)` → latent `(batch, C, S/8, S/8)`.
    Encoder,
    /// The server's decoder g_s: dequantised latent → restored features `(batch, tokens, width)`.
    Decoder,
    /// The backbone after the split: restored features → logits `(batch, classes)`.
    Tail,
}

impl From<Part> for onnx::Part {
    fn from(part: Part) -> Self {
        match part {
            Part::Encoder => onnx::Part::Encoder,
            Part::Decoder => onnx::Part::Decoder,
            Part::Tail => onnx::Part::Tail,
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

pub fn run(args: ExportArgs) -> Result<()> {
    let part = onnx::Part::from(args.part);
    // Opening checks the fingerprint and that every weight fits the architecture.
    let bundle = Bundle::open(&args.model, Device::Cpu)
        .with_context(|| format!("cannot load model {}", args.model.display()))?;
    let model = match part {
        onnx::Part::Encoder => onnx::encoder_graph(&args.model)?,
        onnx::Part::Decoder => onnx::decoder_graph(&bundle)?,
        onnx::Part::Tail => onnx::tail_graph(&bundle)?,
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
    let (input, output) = onnx::check_data(&bundle, part)?;
    let (input_name, output_name) = part.io();
    onnx::write_check_data(path, part, [(input_name, &input), (output_name, &output)])?;
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
