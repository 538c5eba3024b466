//! Parity of the convolutional backbone families with timm 1.0.31 on small
//! random-weight configurations, against fixtures from
//! `tools/fixtures/gen_backbone_fixtures.py`: each model loads timm's
//! weights under timm's names, its logits match within 1e-4 relative L2, and
//! the head and tail of a split at stage 2 reproduce the whole model.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;

use frankensplit_models::convnext::{ConvNext, ConvNextConfig};
use frankensplit_models::resnet::{ResNet, ResNetBlock, ResNetConfig};
use frankensplit_models::weights::{load_into, select};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

/// `(fixture, configuration)` pairs; keep in sync with the generator's CONFIGS.
fn resnets() -> [(&'static str, ResNetConfig); 2] {
    let config = |block, layers: [i64; 4]| ResNetConfig {
        img_size: 64,
        in_chans: 3,
        num_classes: 10,
        block,
        layers: layers.to_vec(),
        channels: vec![8, 16, 24, 32],
        drop_path_rate: 0.1,
    };
    [
        ("resnet_basic", config(ResNetBlock::Basic, [1, 2, 1, 1])),
        ("resnet_bottleneck", config(ResNetBlock::Bottleneck, [2, 1, 1, 1])),
    ]
}

fn convnexts() -> [(&'static str, ConvNextConfig); 2] {
    let config = |conv_mlp| ConvNextConfig {
        img_size: 64,
        in_chans: 3,
        num_classes: 10,
        patch_size: 4,
        depths: vec![1, 2, 1, 1],
        dims: vec![8, 16, 24, 32],
        mlp_ratio: 4.0,
        conv_mlp,
        drop_path_rate: 0.1,
        ls_init_value: 1e-6,
    };
    [("convnext", config(false)), ("convnext_conv_mlp", config(true))]
}

fn fixture(name: &str) -> BTreeMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.safetensors"));
    Tensor::read_safetensors(&path).unwrap().into_iter().collect()
}

/// The fixture's timm weights under our names and shapes.
fn timm_weights(f: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    select(f.iter().map(|(k, t)| (k.clone(), t.shallow_clone())), "weights.", None)
}

/// The weights among `all` that `vs` holds.
fn part(all: &BTreeMap<String, Tensor>, vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
    let names = vs.variables();
    all.iter()
        .filter(|(k, _)| names.contains_key(*k))
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect()
}

fn assert_close(ours: &Tensor, theirs: &Tensor, what: &str) {
    assert_eq!(ours.size(), theirs.size(), "{what}: shape");
    let ours = ours.to_kind(Kind::Double);
    let theirs = theirs.to_kind(Kind::Double);
    let err = (&ours - &theirs).norm().double_value(&[]) / theirs.norm().double_value(&[]).max(1e-30);
    assert!(err <= 1e-4, "{what}: relative L2 error {err:e}");
}

/// Builds a model of `stages` and loads its share of the fixture's weights;
/// every variable must be covered.
fn loaded<M>(f: &BTreeMap<String, Tensor>, build: impl Fn(&nn::Path, Range<usize>) -> M, stages: Range<usize>) -> M {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = build(&vs.root(), stages);
    let weights = part(&timm_weights(f), &vs);
    load_into(&mut vs, weights).unwrap();
    model
}

/// The whole model, then head `0..2` and tail `2..4`, against the fixture.
fn check_family<M: ModuleT>(
    name: &str,
    f: &BTreeMap<String, Tensor>,
    build: impl Fn(&nn::Path, Range<usize>) -> M,
    input_shape: (i64, i64),
) {
    // The whole model takes every timm weight: nothing left over.
    let mut vs = nn::VarStore::new(Device::Cpu);
    let whole = build(&vs.root(), 0..4);
    load_into(&mut vs, timm_weights(f)).unwrap();
    let head = loaded(f, &build, 0..2);
    let tail = loaded(f, &build, 2..4);
    tch::no_grad(|| {
        assert_close(&whole.forward_t(&f["input"], false), &f["logits"], name);
        let features = head.forward_t(&f["input"], false);
        let (channels, side) = input_shape;
        assert_eq!(features.size(), [2, channels, side, side], "{name}: split shape");
        assert_close(&features, &f["split2"], &format!("{name}: head"));
        assert_close(
            &tail.forward_t(&f["split2"], false),
            &f["logits"],
            &format!("{name}: tail from the injected features"),
        );
    });
}

#[test]
fn resnets_match_timm_whole_and_split() {
    for (name, config) in resnets() {
        let f = fixture(name);
        let build = |p: &nn::Path, stages| ResNet::new(p, &config, stages);
        check_family(name, &f, build, config.stage_input_shape(2));
    }
}

#[test]
fn convnexts_match_timm_whole_and_split() {
    for (name, config) in convnexts() {
        let f = fixture(name);
        let build = |p: &nn::Path, stages| ConvNext::new(p, &config, stages);
        check_family(name, &f, build, config.stage_input_shape(2));
    }
}

#[test]
fn a_batch_norm_in_training_mode_normalises_by_the_batch() {
    // The fixture's running statistics are random, so a forward pass that
    // (wrongly) used them in training mode would not give zero-mean maps.
    let (name, config) = resnets().into_iter().next().unwrap();
    let f = fixture(name);
    let head = loaded(&f, |p, s| ResNet::new(p, &config, s), 0..1);
    let _guard = tch::no_grad_guard();
    let eval = head.forward_t(&f["input"], false);
    let train = head.forward_t(&f["input"], true);
    assert!((&eval - &train).abs().max().double_value(&[]) > 1e-3);
}

fn trainable(build: impl Fn(&nn::Path)) -> i64 {
    let vs = nn::VarStore::new(Device::Cpu);
    build(&vs.root());
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

/// Full-size presets hold timm 1.0.31's parameter counts, and a split at
/// stage 2 leaves the tail timm's `layer3`, `layer4`, `fc` (resp.
/// `stages.2`, `stages.3`, `head`).
#[test]
fn full_size_presets_have_timms_parameter_counts() {
    for (name, whole, tail) in [
        ("resnet18", 11_689_512, None),
        ("resnet50", 25_557_032, Some(24_112_104)),
    ] {
        let config = ResNetConfig::preset(name).unwrap();
        assert_eq!(trainable(|p| drop(ResNet::new(p, &config, 0..4))), whole, "{name}");
        if let Some(tail) = tail {
            assert_eq!(trainable(|p| drop(ResNet::new(p, &config, 2..4))), tail, "{name} tail");
        }
    }
    for (name, whole, tail) in [
        ("convnext_atto", 3_695_520, None),
        ("convnext_tiny", 28_589_128, Some(27_354_088)),
    ] {
        let config = ConvNextConfig::preset(name).unwrap();
        assert_eq!(trainable(|p| drop(ConvNext::new(p, &config, 0..4))), whole, "{name}");
        if let Some(tail) = tail {
            assert_eq!(
                trainable(|p| drop(ConvNext::new(p, &config, 2..4))),
                tail,
                "{name} tail"
            );
        }
    }
}

#[test]
fn convnext_layer_scales_start_at_the_configured_value() {
    let (_, mut config) = convnexts().into_iter().next().unwrap();
    config.ls_init_value = 0.5;
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = ConvNext::new(&vs.root(), &config, 0..4);
    let gammas: Vec<Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(name, _)| name.ends_with(".gamma"))
        .map(|(_, t)| t)
        .collect();
    assert_eq!(gammas.len(), config.depths.iter().sum::<i64>() as usize);
    for gamma in gammas {
        assert!(gamma.eq(0.5).all().int64_value(&[]) == 1);
    }
}

/// Both families learn: 60 Adam steps at least halve the loss on random
/// labels of a small batch (a network that does not learn stays near ln 8).
#[test]
fn cnn_families_fit_a_batch() {
    use tch::nn::OptimizerConfig;
    tch::manual_seed(0);
    let x = Tensor::randn([8, 3, 64, 64], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
    let fit = |build: &dyn Fn(&nn::Path) -> Box<dyn ModuleT>| -> (f64, f64) {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = build(&vs.root());
        let mut adam = nn::Adam::default().build(&vs, 1e-3).unwrap();
        let mut losses = Vec::new();
        for _ in 0..60 {
            let loss = model.forward_t(&x, true).cross_entropy_for_logits(&labels);
            adam.backward_step(&loss);
            losses.push(loss.double_value(&[]));
        }
        (losses[0], losses[59])
    };
    let (_, convnext) = convnexts().into_iter().next().unwrap();
    let (first, last) = fit(&|p| Box::new(ConvNext::new(p, &convnext, 0..4)));
    assert!(last < 0.5 * first, "convnext: loss {first} → {last}");
    let (_, resnet) = resnets().into_iter().next().unwrap();
    let (first, last) = fit(&|p| Box::new(ResNet::new(p, &resnet, 0..4)));
    assert!(last < 0.5 * first, "resnet: loss {first} → {last}");
}

/// A fresh convolutional decoder starts at zero for any latent (its blocks
/// as identities), for each resampling it may need.
#[test]
fn a_fresh_convolutional_decoder_restores_zeros() {
    use frankensplit_models::compressor::{CompressorConfig, Decoder, DecoderBlueprint};
    let config = CompressorConfig {
        input_size: 64,
        encoder_hidden: [8, 12],
        latent_channels: 6,
        decoder_dim: 16,
        recon_dim: 24,
        target_dim: 16,
        ..CompressorConfig::default()
    };
    let latent = Tensor::randn([2, 6, 8, 8], (Kind::Float, Device::Cpu)) * 5.0;
    for side in [4, 8, 16] {
        let vs = nn::VarStore::new(Device::Cpu);
        let decoder = Decoder::new(&vs.root(), &config, DecoderBlueprint::Conv { side });
        let restored = tch::no_grad(|| decoder.forward_t(&latent, false));
        assert_eq!(restored.size(), [2, 16, side, side]);
        assert_eq!(restored.abs().max().double_value(&[]), 0.0, "side {side}");
    }
}
