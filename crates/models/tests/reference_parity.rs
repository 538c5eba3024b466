//! Parity with the PyTorch reference on small random-weight configs, against
//! fixtures from `tools/fixtures/gen_model_fixtures.py` (timm 0.6 and 1.0,
//! CompressAI 1.2.8, the reference's modules rebuilt in PyTorch). Every
//! module loads its weights under the original key names; outputs must match
//! within 1e-4 relative L2 on the CPU backend.

use std::collections::BTreeMap;
use std::path::PathBuf;

use frankensplit_models::compressor::{Compressor, CompressorConfig, DecoderBlueprint, SwinReconLayer};
use frankensplit_models::convert::{convert, ConvertOptions};
use frankensplit_models::layers::{Activation, ResidualBlockWithStride};
use frankensplit_models::swin::{BlockSpec, SwinBlock, SwinConfig, SwinTransformer};
use frankensplit_models::weights::{load_into, select, SwinLayout};
use frankensplit_models::{Architecture, Bundle};
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

/// The workspace's fixtures/models, which other crates' tests read too.
fn shared_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models")
}

fn fixture(name: &str) -> BTreeMap<String, Tensor> {
    let path = shared_fixtures().join(format!("{name}.safetensors"));
    Tensor::read_safetensors(&path).unwrap().into_iter().collect()
}

/// A fixture only this crate reads (tests/fixtures).
fn own_fixture(name: &str) -> BTreeMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.safetensors"));
    Tensor::read_safetensors(&path).unwrap().into_iter().collect()
}

/// The fixture's weights under `prefix`, renamed as a checkpoint would be.
fn weights(f: &BTreeMap<String, Tensor>, prefix: &str) -> BTreeMap<String, Tensor> {
    select(f.iter().map(|(k, t)| (k.clone(), t.shallow_clone())), prefix, None)
}

fn assert_close(ours: &Tensor, theirs: &Tensor, what: &str) {
    assert_eq!(ours.size(), theirs.size(), "{what}: shape");
    let ours = ours.to_kind(Kind::Double);
    let theirs = theirs.to_kind(Kind::Double);
    let err = (&ours - &theirs).norm().double_value(&[]) / theirs.norm().double_value(&[]).max(1e-30);
    assert!(err <= 1e-4, "{what}: relative L2 error {err:e}");
}

fn small_compressor() -> CompressorConfig {
    CompressorConfig {
        input_size: 64,
        encoder_hidden: [8, 12],
        latent_channels: 6,
        decoder_dim: 16,
        decoder_heads: 2,
        recon_dim: 24,
        recon_heads: 2,
        target_dim: 32,
        window: 4,
        ..CompressorConfig::default()
    }
}

fn small_swin() -> SwinConfig {
    SwinConfig {
        img_size: 64,
        patch_size: 4,
        in_chans: 3,
        num_classes: 10,
        embed_dim: 8,
        depths: vec![2, 2, 2, 2],
        num_heads: vec![1, 2, 2, 4],
        window_sizes: vec![4, 4, 4, 2],
        mlp_ratio: 4.0,
        qkv_bias: true,
        drop_path_rate: 0.0,
    }
}

#[test]
fn residual_blocks_match_the_reference() {
    let f = own_fixture("residual_block");
    for (name, (i, o, stride, act, act1)) in [
        ("down_relu", (5, 7, 2, Activation::Relu, false)),
        ("same_leaky", (6, 6, 1, Activation::LeakyRelu, false)),
        ("up_channels_leaky", (6, 9, 1, Activation::LeakyRelu, false)),
        ("act_after_conv1", (5, 7, 2, Activation::Relu, true)),
    ] {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let block = ResidualBlockWithStride::new(&vs.root(), i, o, stride, act, act1);
        load_into(&mut vs, weights(&f, &format!("{name}.weights."))).unwrap();
        let out = tch::no_grad(|| block.forward(&f[&format!("{name}.input")]));
        assert_close(&out, &f[&format!("{name}.output")], name);
    }
}

#[test]
fn the_missing_activation_after_conv1_matters() {
    // Loading the quirk-free weights into a block with the activation gives a different output.
    let f = own_fixture("residual_block");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let block = ResidualBlockWithStride::new(&vs.root(), 5, 7, 2, Activation::Relu, true);
    load_into(&mut vs, weights(&f, "down_relu.weights.")).unwrap();
    let out = tch::no_grad(|| block.forward(&f["down_relu.input"]));
    let diff = (&out - &f["down_relu.output"]).abs().max().double_value(&[]);
    assert!(diff > 1e-3, "activation placement made no difference ({diff})");
}

#[test]
fn swin_blocks_match_timm_with_and_without_shift() {
    let f = own_fixture("swin_block");
    for shift in [0, 1] {
        let spec = BlockSpec {
            dim: 16,
            resolution: (8, 8),
            num_heads: 2,
            window: 4,
            shift: if shift == 1 { 2 } else { 0 },
            mlp_ratio: 4.0,
            qkv_bias: true,
            drop_path: 0.0,
        };
        let mut vs = nn::VarStore::new(Device::Cpu);
        let block = SwinBlock::new(&vs.root(), spec);
        load_into(&mut vs, weights(&f, &format!("shift{shift}.weights."))).unwrap();
        let out = tch::no_grad(|| block.forward_t(&f[&format!("shift{shift}.input")], false));
        assert_close(&out, &f[&format!("shift{shift}.output")], &format!("shift {shift}"));
    }
}

#[test]
fn compressor_matches_the_reference_modules_and_compressai() {
    let f = fixture("compressor");
    let config = small_compressor();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let compressor = Compressor::new(&vs.root(), &config, DecoderBlueprint::Swin);
    // The fixture keeps CompressAI <= 1.2.6 names (`_matrix0`, ...) as released checkpoints do.
    assert!(f.contains_key("weights.entropy_bottleneck._matrix0"));
    load_into(&mut vs, weights(&f, "weights.")).unwrap();
    tch::no_grad(|| {
        let latent = compressor.g_a.forward(&f["input"]);
        assert_close(&latent, &f["latent"], "encoder g_a");
        let (y_hat, likelihoods) = compressor.entropy_bottleneck.forward_t(&latent, false);
        assert_close(&y_hat, &f["latent_hat"], "rounded latent");
        assert_close(&likelihoods, &f["likelihoods"], "EB likelihoods");
        assert_close(
            &compressor.entropy_bottleneck.aux_loss().view([1]),
            &f["aux_loss"],
            "aux loss",
        );
        let features = compressor.g_s.forward_t(&f["latent_hat"], false);
        assert_close(&features, &f["features"], "decoder g_s");
        let out = compressor.forward_t(&f["input"], false);
        assert_close(&out.features, &f["features"], "compressor end to end");
    });
}

#[test]
fn recon_layer_matches_the_reference() {
    let f = fixture("compressor");
    let config = small_compressor();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let recon = SwinReconLayer::new(&vs.root(), &config);
    load_into(&mut vs, weights(&f, "weights.g_s.final_layer.")).unwrap();
    let out = tch::no_grad(|| recon.forward_t(&f["recon_input"], false));
    assert_close(&out, &f["recon_output"], "SwinReconLayer");
}

#[test]
fn swin_s3_style_backbone_matches_timm_in_both_layouts() {
    let config = small_swin();
    for (name, layout) in [
        ("swin_timm06", SwinLayout::EndOfStage),
        ("swin_timm10", SwinLayout::StartOfStage),
    ] {
        let f = fixture(name);
        let w = weights(&f, "weights.");
        assert_eq!(
            SwinLayout::detect(f.keys().filter_map(|k| k.strip_prefix("weights."))),
            layout,
            "{name}"
        );
        let mut vs = nn::VarStore::new(Device::Cpu);
        let model = SwinTransformer::new(&vs.root(), &config, 0..4);
        load_into(&mut vs, w).unwrap();
        let logits = tch::no_grad(|| model.forward_t(&f["input"], false));
        assert_close(&logits, &f["logits"], name);
    }
}

#[test]
fn split_head_and_tail_compose_to_the_whole_backbone() {
    let config = small_swin();
    let f = fixture("swin_timm06");
    let mut head_vs = nn::VarStore::new(Device::Cpu);
    let head = SwinTransformer::new(&head_vs.root(), &config, 0..2);
    let mut tail_vs = nn::VarStore::new(Device::Cpu);
    let tail = SwinTransformer::new(&tail_vs.root(), &config, 2..4);
    let all = weights(&f, "weights.");
    let part = |vs: &nn::VarStore| -> BTreeMap<String, Tensor> {
        let names = vs.variables();
        all.iter()
            .filter(|(k, _)| names.contains_key(*k))
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect()
    };
    let head_weights = part(&head_vs);
    let tail_weights = part(&tail_vs);
    load_into(&mut head_vs, head_weights).unwrap();
    load_into(&mut tail_vs, tail_weights).unwrap();
    tch::no_grad(|| {
        let tokens = head.forward_t(&f["input"], false);
        assert_eq!(
            tokens.size(),
            [2, config.stage_input_shape(2).0, config.stage_input_shape(2).1]
        );
        assert_close(&tokens, &f["split_tokens"], "layers[:2] output");
        assert_close(
            &tail.forward_t(&f["split_tokens"], false),
            &f["logits"],
            "tail from injected tokens",
        );
    });
}

#[test]
fn weight_mismatches_are_reported_together() {
    let f = fixture("compressor");
    let mut w = weights(&f, "weights.");
    w.remove("g_a.rb1.conv1.weight");
    w.insert(
        "g_a.rb9.conv1.weight".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    );
    w.insert(
        "g_a.rb2.conv1.bias".into(),
        Tensor::zeros([3], (Kind::Float, Device::Cpu)),
    );
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _ = Compressor::new(&vs.root(), &small_compressor(), DecoderBlueprint::Swin);
    let message = load_into(&mut vs, w).unwrap_err().to_string();
    for expected in [
        "g_a.rb1.conv1.weight",
        "g_a.rb9.conv1.weight",
        "g_a.rb2.conv1.bias: checkpoint [3], model [12]",
    ] {
        assert!(message.contains(expected), "{expected} not in:\n{message}");
    }
}

/// The full-size compressor has the reference's parameter counts
/// (`frankensplit.md` §3.2–3.4, counted from the released modules).
#[test]
fn full_size_parameter_counts_equal_the_reference() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = Compressor::new(&vs.root(), &CompressorConfig::default(), DecoderBlueprint::Swin);
    let count = |prefix: &str| -> i64 {
        vs.variables()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, t)| t.numel() as i64)
            .sum()
    };
    assert_eq!(count("g_a."), 141_696);
    assert_eq!(count("entropy_bottleneck."), 2_928);
    assert_eq!(count("g_s.final_layer."), 1_188_296);
    assert_eq!(count("g_s.") - count("g_s.final_layer."), 870_678);
    assert_eq!(count(""), 2_203_598);
}

/// Swin-S3-B: 71,125,762 parameters, of which the server tail (stages 3–4,
/// norm, head) holds 69,633,472.
#[test]
fn swin_s3_base_parameter_counts_equal_timm() {
    let config = SwinConfig::swin_s3_base_224();
    let numel = |stages: std::ops::Range<usize>| -> i64 {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = SwinTransformer::new(&vs.root(), &config, stages);
        vs.variables().values().map(|t| t.numel() as i64).sum()
    };
    assert_eq!(numel(0..4), 71_125_762);
    assert_eq!(numel(2..4), 69_633_472);
}

/// The reference checkpoint (tail only, as the release saves it) plus the
/// timm weights of the whole backbone: the bundle classifies whole images
/// exactly as timm does, and refuses a backbone file that is another model.
#[test]
fn bundles_with_the_backbone_head_classify_images_like_timm() {
    let f = fixture("swin_timm06");
    let dir = std::env::temp_dir().join(format!("frankensplit-head-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let timm: Vec<(String, Tensor)> = weights(&f, "weights.").into_iter().collect();
    let timm_file = dir.join("timm.safetensors");
    Tensor::write_safetensors(&timm, &timm_file).unwrap();
    let fixtures = shared_fixtures();
    let arch = Architecture::from_toml(&std::fs::read_to_string(fixtures.join("small_arch.toml")).unwrap()).unwrap();
    let options = ConvertOptions {
        checkpoint: fixtures.join("reference_checkpoint.pt"),
        backbone_weights: Some(timm_file.clone()),
        tail_only: false,
        architecture: arch,
        likelihood_formula: None,
        labels: Vec::new(),
        checkpoint_limits: Default::default(),
        force: false,
    };
    let report = convert(&options, &dir.join("whole")).unwrap();
    assert!(report.backbone_head);
    let bundle = Bundle::open(&dir.join("whole"), Device::Cpu).unwrap();
    let images: Vec<Vec<f32>> = (0..2)
        .map(|i| Vec::<f32>::try_from(f["input"].get(i).reshape([-1])).unwrap())
        .collect();
    assert_close(
        &bundle.classify_images(&images).unwrap(),
        &f["logits"],
        "whole-image path",
    );

    let report = convert(
        &ConvertOptions {
            tail_only: true,
            ..options.clone()
        },
        &dir.join("tail"),
    )
    .unwrap();
    assert!(!report.backbone_head);
    // A directory of the user's own is neither replaced nor touched without --force.
    let mine = dir.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep me").unwrap();
    let err = convert(&options, &mine).unwrap_err().to_string();
    assert!(err.contains("notes.txt") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(mine.join("notes.txt")).unwrap(), "keep me");
    convert(
        &ConvertOptions {
            force: true,
            ..options.clone()
        },
        &mine,
    )
    .unwrap();
    assert!(Bundle::open(&mine, Device::Cpu).is_ok() && !mine.join("notes.txt").exists());
    let tail = Bundle::open(&dir.join("tail"), Device::Cpu).unwrap();
    assert!(tail.classify_images(&images).is_err());
    assert!(tail.backbone_vars.variables().len() < bundle.backbone_vars.variables().len());

    let other: Vec<(String, Tensor)> = timm
        .iter()
        .map(|(k, t)| {
            let t = if k == "layers.3.blocks.1.mlp.fc2.bias" {
                t + 1.0
            } else {
                t.shallow_clone()
            };
            (k.clone(), t)
        })
        .collect();
    Tensor::write_safetensors(&other, &timm_file).unwrap();
    let err = convert(&options, &dir.join("mixed")).unwrap_err().to_string();
    assert!(err.contains("layers.3.blocks.1.mlp.fc2.bias"), "{err}");
    assert!(!dir.join("mixed").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
