//! `frankensplit pack-models`: bundles trained against one teacher stored in
//! the layout of the built-in models ([`crate::builtin`]): the backbone once,
//! then per bundle its manifest and the rest of its weights.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use frankensplit_bundle::names::BACKBONE;
use frankensplit_bundle::{MANIFEST, WEIGHTS};
use safetensors::SafeTensors;

use crate::builtin::{merge, BACKBONE_FILE};

#[derive(clap::Args)]
pub struct PackArgs {
    /// NAME=BUNDLE_DIR, e.g. l0.16=runs/scenes/compressor-l0.16/bundle; repeat the flag.
    #[arg(long = "bundle", required = true, value_parser = parse_named)]
    bundles: Vec<(String, PathBuf)>,
    /// Output directory (models/demo to replace the built-in models),
    /// replaced in one step; refused when it holds anything but packed models
    /// of these names unless --force.
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output whatever it holds.
    #[arg(long)]
    force: bool,
}

fn parse_named(text: &str) -> std::result::Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => Ok((name.to_string(), PathBuf::from(dir))),
        _ => Err(format!("expected NAME=BUNDLE_DIR, got {text:?}")),
    }
}

pub fn run(args: PackArgs) -> Result<()> {
    pack(&args.bundles, &args.output, args.force)?;
    println!(
        "packed {} bundles into {}; rebuild the binary to build them in",
        args.bundles.len(),
        args.output.display()
    );
    Ok(())
}

/// Writes bundles (name → bundle directory, trained against one teacher) in
/// the committed layout under `out`: `backbone.safetensors` once, and
/// `l<λ>/{model.toml, compressor.safetensors}` per bundle. Checks that each
/// bundle merges back to its own bytes.
pub fn pack(bundles: &[(String, PathBuf)], out: &Path, force: bool) -> Result<()> {
    let mut ours = vec![BACKBONE_FILE];
    ours.extend(bundles.iter().map(|(name, _)| name.as_str()));
    frankensplit_fsio::check_replaceable(out, &ours, force).map_err(anyhow::Error::msg)?;
    let staging =
        frankensplit_fsio::Staging::new(out).with_context(|| format!("cannot write beside {}", out.display()))?;
    let mut shared: Option<Vec<u8>> = None;
    for (name, dir) in bundles {
        let bytes = std::fs::read(dir.join(WEIGHTS)).with_context(|| format!("cannot read {}", dir.display()))?;
        let tensors = SafeTensors::deserialize(&bytes)?;
        let (backbone, rest): (Vec<_>, Vec<_>) = tensors
            .tensors()
            .into_iter()
            .partition(|(k, _)| k.starts_with(BACKBONE));
        let backbone = safetensors::serialize(backbone, &None)?;
        let rest = safetensors::serialize(rest, &None)?;
        match &shared {
            Some(first) if *first != backbone => {
                bail!(
                    "{} has another backbone than the first bundle; demo bundles share their teacher",
                    dir.display()
                )
            }
            Some(_) => {}
            None => shared = Some(backbone.clone()),
        }
        if merge(&backbone, &rest)? != bytes {
            bail!(
                "{}: its weights do not split into backbone and compressor losslessly",
                dir.display()
            );
        }
        let target = staging.path().join(name);
        std::fs::create_dir_all(&target).with_context(|| format!("cannot create {}", target.display()))?;
        std::fs::write(target.join("compressor.safetensors"), &rest)?;
        std::fs::write(target.join(MANIFEST), std::fs::read(dir.join(MANIFEST))?)?;
    }
    if let Some(backbone) = shared {
        std::fs::write(staging.path().join(BACKBONE_FILE), &backbone)?;
    }
    staging
        .commit()
        .with_context(|| format!("cannot move the models into {}", out.display()))
}
