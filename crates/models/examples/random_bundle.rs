//! Writes a bundle with freshly initialised weights (compressor and the whole
//! backbone), for timing the pipeline and load-testing the server when no
//! trained model is at hand. Its predictions and rates mean nothing.
//!
//! ```sh
//! cargo run --release -p frankensplit-models --example random_bundle -- OUT_DIR [ARCH.toml] [SEED]
//! ```
//! Without `ARCH.toml`: the reference's compressor in front of `swin_s3_base_224`.

use std::path::PathBuf;

use frankensplit_codec::LikelihoodFormula;
use frankensplit_models::bundle::{write_bundle, BundleContents, TableSource};
use frankensplit_models::{Architecture, Backbone, Compressor};
use tch::nn::VarStore;
use tch::Device;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().ok_or("usage: random_bundle OUT_DIR [ARCH.toml] [SEED]")?);
    let arch = match args.next() {
        Some(path) => Architecture::from_toml(&std::fs::read_to_string(path)?)?,
        None => Architecture::default(),
    };
    let seed: i64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0);
    tch::manual_seed(seed);
    let compressor_vars = VarStore::new(Device::Cpu);
    let compressor = Compressor::new(&compressor_vars.root(), &arch.compressor, arch.blueprint());
    let backbone_vars = VarStore::new(Device::Cpu);
    let stages = arch.backbone.num_stages();
    let _tail = Backbone::new(&backbone_vars.root(), &arch.backbone, arch.split_stage..stages);
    let _head = Backbone::new(&backbone_vars.root(), &arch.backbone, 0..arch.split_stage);
    let formula = LikelihoodFormula::Direct;
    let tables = compressor.entropy_bottleneck.density()?.build_tables(formula)?;
    let fingerprint = write_bundle(
        &out,
        BundleContents {
            architecture: &arch,
            compressor_vars: &compressor_vars,
            backbone_vars: &backbone_vars,
            backbone_head: true,
            tables: &tables,
            likelihood_formula: formula,
            table_source: TableSource::Recomputed,
            labels: Vec::new(),
            source: format!("random initialisation, seed {seed} (for timing only)"),
        },
        false,
    )?;
    println!("wrote {} (model {fingerprint})", out.display());
    Ok(())
}
