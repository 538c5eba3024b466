//! One training step against the PyTorch reference (fixtures from
//! tools/fixtures/gen_train_fixtures.py): the stage-1 and stage-2 losses,
//! their terms and the gradients of parameters across the compressor, the
//! parameters after two Adam steps, and XGradCAM maps from pytorch-grad-cam
//! (plain, and eigen-smoothed with the component's sign oriented as ours).

use std::collections::BTreeMap;
use std::path::PathBuf;

use frankensplit_models::weights::{load_into, select};
use frankensplit_models::{Architecture, Backbone, Compressor};
use frankensplit_train::optim::Adam;
use frankensplit_train::run::compressor_loss;
use frankensplit_train::saliency::{xgradcam, SplitBackbone};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn read(path: PathBuf) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn models_fixture(name: &str) -> BTreeMap<String, Tensor> {
    read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../../fixtures/models/{name}.safetensors")))
}

fn train_fixture(name: &str) -> BTreeMap<String, Tensor> {
    read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}.safetensors")))
}

fn weights(f: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let stripped = f
        .iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("weights.")?.to_string(), t.shallow_clone())));
    select(stripped, "", None)
}

/// Largest |a − b| relative to the largest |b|.
fn relative_error(ours: &Tensor, theirs: &Tensor) -> f64 {
    let scale = theirs.abs().max().double_value(&[]).max(1e-12);
    (ours.to_kind(Kind::Double) - theirs.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
        / scale
}

struct Setup {
    compressor_vars: VarStore,
    compressor: Compressor,
    head: Backbone,
    tail: Backbone,
    _backbone_vars: VarStore,
}

fn setup() -> Setup {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/small_arch.toml"),
    )
    .unwrap();
    let mut arch = Architecture::from_toml(&text).unwrap();
    // The fixture runs the modules in eval mode: no stochastic depth.
    arch.compressor.decoder_drop_path = 0.0;
    let mut compressor_vars = VarStore::new(Device::Cpu);
    let compressor = Compressor::new(&compressor_vars.root(), &arch.compressor, arch.blueprint());
    load_into(&mut compressor_vars, weights(&models_fixture("compressor"))).unwrap();
    let mut backbone_vars = VarStore::new(Device::Cpu);
    let head = Backbone::new(&backbone_vars.root(), &arch.backbone, 0..2);
    let tail = Backbone::new(&backbone_vars.root(), &arch.backbone, 2..4);
    load_into(&mut backbone_vars, weights(&models_fixture("swin_timm06"))).unwrap();
    backbone_vars.freeze();
    Setup {
        compressor_vars,
        compressor,
        head,
        tail,
        _backbone_vars: backbone_vars,
    }
}

#[test]
fn one_step_matches_the_reference_loss_and_gradients() {
    let f = train_fixture("train_step");
    let mut s = setup();
    let vars: BTreeMap<String, Tensor> = s.compressor_vars.variables().into_iter().collect();
    for (tag, saliency) in [("distill", None), ("saliency", Some(&f["saliency"]))] {
        for v in vars.values() {
            let mut v = v.shallow_clone();
            v.zero_grad();
        }
        let loss = compressor_loss(&s.compressor, &s.head, &f["input"], 0.05, saliency, Some(&f["noise"]));
        loss.loss_tensor.backward();
        let terms = loss.values();
        for (name, ours) in [
            ("loss", terms.loss),
            ("distortion", terms.distortion.unwrap()),
            ("bits", terms.bits.unwrap()),
        ] {
            let theirs = f[&format!("{tag}.{name}")].double_value(&[0]);
            assert!(
                ((ours - theirs) / theirs).abs() < 1e-4,
                "{tag} {name}: {ours} vs {theirs}"
            );
        }
        let mut compared = 0;
        for (key, theirs) in f.iter().filter(|(k, _)| k.starts_with(&format!("{tag}.grad."))) {
            let name = key.trim_start_matches(&format!("{tag}.grad."));
            let ours = vars[name].grad();
            let error = relative_error(&ours, theirs);
            assert!(error < 1e-4, "{tag}: gradient of {name} off by {error:e}");
            compared += 1;
        }
        assert_eq!(compared, 6);
    }
    let aux = s.compressor.entropy_bottleneck.aux_loss().double_value(&[]);
    let theirs = f["aux_loss"].double_value(&[0]);
    assert!(((aux - theirs) / theirs).abs() < 1e-5, "aux loss {aux} vs {theirs}");

    // Two reference updates: aux and stage-1 loss backward, one Adam step.
    let mut adam = Adam::new(vars.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect(), 1e-3);
    for _ in 0..2 {
        adam.zero_grad();
        s.compressor.entropy_bottleneck.aux_loss().backward();
        compressor_loss(&s.compressor, &s.head, &f["input"], 0.05, None, Some(&f["noise"]))
            .loss_tensor
            .backward();
        adam.step();
    }
    for (key, theirs) in f.iter().filter(|(k, _)| k.starts_with("after_two_steps.")) {
        let name = key.trim_start_matches("after_two_steps.");
        // Relative to the size of the two updates, not of the parameter.
        let before = weights(&models_fixture("compressor"))[name].shallow_clone();
        let moved = (theirs - &before).abs().max().double_value(&[]);
        let error = (&vars[name] - theirs).abs().max().double_value(&[]);
        assert!(
            moved > 0.0 && error < 1e-3 * moved,
            "{name}: off by {error:e} of a {moved:e} move"
        );
    }
    let _ = &mut s.compressor_vars;
}

#[test]
fn xgradcam_maps_match_pytorch_grad_cam() {
    let f = train_fixture("xgradcam");
    let s = setup();
    let labels = Vec::<i64>::try_from(&f["labels"]).unwrap();
    let backbone = SplitBackbone {
        head: &s.head,
        tail: &s.tail,
    };
    for (key, eigen_smooth) in [("maps_plain", false), ("maps_eigen", true)] {
        let maps = xgradcam(&backbone, &f["input"], &labels, &[1, 2, 3], 8, eigen_smooth).unwrap();
        let theirs = Vec::<Vec<Vec<f32>>>::try_from(&f[key]).unwrap();
        for (b, map) in maps.iter().enumerate() {
            let expected: Vec<f32> = theirs[b].concat();
            let error = map
                .iter()
                .zip(&expected)
                .map(|(a, e)| (a - e).abs())
                .fold(0f32, f32::max);
            assert!(
                error < 1e-3,
                "{key} image {b}: max difference {error}\nours   {map:?}\ntheirs {expected:?}"
            );
        }
    }
}
