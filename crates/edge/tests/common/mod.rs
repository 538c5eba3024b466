//! What the edge crate's integration tests share: bundles with random
//! weights, written by the libtorch model (a test-only dependency).

use std::path::{Path, PathBuf};

use frankensplit_codec::LikelihoodFormula;
use frankensplit_models::bundle::{write_bundle, BundleContents, TableSource};
use frankensplit_models::{Architecture, Backbone, BackboneConfig, Compressor};
use tch::nn::VarStore;
use tch::Device;

/// The workspace's fixtures, shared by several crates' tests.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The small test architecture: 3 → 8 → 12 → 6 at 64², no activation
/// between a residual block's convolutions.
pub fn small_architecture() -> Architecture {
    Architecture::from_toml(&std::fs::read_to_string(fixtures().join("models/small_arch.toml")).unwrap()).unwrap()
}

/// The reference's encoder (3 → 48 → 64 → 48, 224² input) in front of the
/// small backbone: the first block folds, the others take Winograd.
#[allow(dead_code)] // not every test binary uses it
pub fn reference_encoder_architecture() -> Architecture {
    let mut full = small_architecture();
    full.compressor.input_size = 224;
    full.compressor.encoder_hidden = [48, 64];
    full.compressor.latent_channels = 48;
    let BackboneConfig::Swin(swin) = &mut full.backbone else {
        panic!("the small architecture is a Swin");
    };
    swin.img_size = 224;
    swin.window_sizes = vec![7, 7, 7, 7];
    full.compressor.target_dim = swin.stage_input_shape(full.split_stage).1;
    full
}

/// A bundle of `arch` with weights drawn from `seed`.
pub fn random_bundle(dir: &Path, arch: &Architecture, seed: i64) {
    tch::manual_seed(seed);
    let compressor_vars = VarStore::new(Device::Cpu);
    let compressor = Compressor::new(&compressor_vars.root(), &arch.compressor, arch.blueprint());
    let backbone_vars = VarStore::new(Device::Cpu);
    let stages = arch.backbone.num_stages();
    let _tail = Backbone::new(&backbone_vars.root(), &arch.backbone, arch.split_stage..stages);
    // Medians away from zero, so that rounding against them is exercised.
    tch::no_grad(|| {
        let quantiles = &compressor_vars.variables()["entropy_bottleneck.quantiles"];
        let _ = quantiles
            .shallow_clone()
            .g_add_(&(tch::Tensor::rand_like(quantiles) - 0.5));
    });
    let tables = compressor
        .entropy_bottleneck
        .density()
        .unwrap()
        .build_tables(LikelihoodFormula::Direct)
        .unwrap();
    write_bundle(
        dir,
        BundleContents {
            architecture: arch,
            compressor_vars: &compressor_vars,
            backbone_vars: &backbone_vars,
            backbone_head: false,
            tables: &tables,
            likelihood_formula: LikelihoodFormula::Direct,
            table_source: TableSource::Recomputed,
            labels: Vec::new(),
            source: format!("edge parity test, seed {seed}"),
        },
        false,
    )
    .unwrap();
}
