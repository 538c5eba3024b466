//! Swin Transformer v1 with per-stage window sizes (Swin-S3 / AutoFormerV2),
//! in timm's 0.6–0.8 layout: a stage is its blocks followed by the patch
//! merging that halves the grid, so "the output of `layers.1`" is the 14×14×384
//! tensor FrankenSplit's decoder reproduces. Checkpoints of timm ≥ 0.9, which
//! merges at the start of the next stage, are mapped onto this layout by
//! [`crate::weights`].
//!
//! A model can be built for a range of stages only, which is how the split
//! works: the server builds the tail from the injection point, a teacher the
//! head up to it.

use std::ops::Range;

pub use frankensplit_bundle::SwinConfig;
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

use frankensplit_bundle::CompressorConfig;

use crate::layers::{drop_path, drop_path_rates};

/// Index of each pair of tokens in a `window × window` window into the
/// `(2w-1)²` relative-position bias table.
pub fn relative_position_index(window: i64) -> Tensor {
    let n = window * window;
    let index: Vec<i64> = (0..n)
        .flat_map(|a| {
            (0..n).map(move |b| {
                let dy = a / window - b / window + window - 1;
                let dx = a % window - b % window + window - 1;
                dy * (2 * window - 1) + dx
            })
        })
        .collect();
    Tensor::from_slice(&index).view([n, n])
}

/// The SW-MSA mask: 0 within a region of the shifted grid, -100 across regions.
pub fn shifted_window_mask(height: i64, width: i64, window: i64, shift: i64) -> Tensor {
    let region = |i: i64, size: i64| {
        if i < size - window {
            0
        } else if i < size - shift {
            1
        } else {
            2
        }
    };
    let labels: Vec<f32> = (0..height)
        .flat_map(|y| (0..width).map(move |x| (region(y, height) * 3 + region(x, width)) as f32))
        .collect();
    let labels = Tensor::from_slice(&labels).view([1, height, width, 1]);
    let windows = window_partition(&labels, window).view([-1, window * window]);
    let diff = windows.unsqueeze(1) - windows.unsqueeze(2);
    diff.ne(0.0).to_kind(Kind::Float) * -100.0
}

/// `(B, H, W, C)` → `(B·windows, w, w, C)`, windows in row-major order.
pub fn window_partition(x: &Tensor, window: i64) -> Tensor {
    let s = x.size();
    let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
    x.view([b, h / window, window, w / window, window, c])
        .permute([0, 1, 3, 2, 4, 5])
        .contiguous()
        .view([-1, window, window, c])
}

/// Inverse of [`window_partition`].
pub fn window_reverse(windows: &Tensor, window: i64, height: i64, width: i64) -> Tensor {
    let c = windows.size()[3];
    windows
        .view([-1, height / window, width / window, window, window, c])
        .permute([0, 1, 3, 2, 4, 5])
        .contiguous()
        .view([-1, height, width, c])
}

/// Window multi-head self-attention with a relative position bias.
#[derive(Debug)]
pub struct WindowAttention {
    qkv: nn::Linear,
    proj: nn::Linear,
    relative_position_bias_table: Tensor,
    relative_position_index: Tensor,
    num_heads: i64,
    scale: f64,
}

impl WindowAttention {
    /// Registers `qkv`, `proj` and `relative_position_bias_table` under `p`.
    pub fn new(p: &nn::Path, dim: i64, num_heads: i64, window: i64, qkv_bias: bool) -> Self {
        let head_dim = dim / num_heads;
        let table = p.var(
            "relative_position_bias_table",
            &[(2 * window - 1) * (2 * window - 1), num_heads],
            nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        );
        Self {
            qkv: nn::linear(
                p / "qkv",
                dim,
                3 * dim,
                nn::LinearConfig {
                    bias: qkv_bias,
                    ..Default::default()
                },
            ),
            proj: nn::linear(p / "proj", dim, dim, Default::default()),
            relative_position_bias_table: table,
            relative_position_index: relative_position_index(window).to_device(p.device()),
            num_heads,
            scale: (head_dim as f64).powf(-0.5),
        }
    }

    /// Attention within each window of `x` `(B·windows, N, C)`; `mask`
    /// `(windows, N, N)` separates regions after a cyclic shift.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let s = x.size();
        let (b, n, c) = (s[0], s[1], s[2]);
        let heads = self.num_heads;
        let qkv = x
            .apply(&self.qkv)
            .reshape([b, n, 3, heads, c / heads])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let q = q * self.scale;
        let bias = self
            .relative_position_bias_table
            .index_select(0, &self.relative_position_index.view([-1]))
            .view([n, n, -1])
            .permute([2, 0, 1])
            .contiguous()
            .unsqueeze(0);
        let mut attn = q.matmul(&k.transpose(-2, -1)) + bias;
        if let Some(mask) = mask {
            let windows = mask.size()[0];
            attn = (attn.view([b / windows, windows, heads, n, n])
                + mask.to_kind(attn.kind()).unsqueeze(1).unsqueeze(0))
            .view([-1, heads, n, n]);
        }
        attn.softmax(-1, attn.kind())
            .matmul(&v)
            .transpose(1, 2)
            .reshape([b, n, -1])
            .apply(&self.proj)
    }
}

/// A Swin block: (shifted) window attention and an MLP, each pre-norm with a residual.
#[derive(Debug)]
pub struct SwinBlock {
    norm1: nn::LayerNorm,
    attn: WindowAttention,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    resolution: (i64, i64),
    window: i64,
    shift: i64,
    attn_mask: Option<Tensor>,
    drop_path: f64,
}

/// How one Swin block is laid out.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec {
    /// Token width.
    pub dim: i64,
    /// Grid `(H, W)` the block works on.
    pub resolution: (i64, i64),
    /// Attention heads.
    pub num_heads: i64,
    /// Requested window; shrunk to the grid when the grid is not larger.
    pub window: i64,
    /// Requested cyclic shift (0 or window/2); dropped when the window covers the grid.
    pub shift: i64,
    /// MLP expansion.
    pub mlp_ratio: f64,
    /// Whether `qkv` has a bias.
    pub qkv_bias: bool,
    /// Stochastic depth rate.
    pub drop_path: f64,
}

impl BlockSpec {
    /// How the blocks of stage `i` of `config` are laid out (shift and
    /// drop-path per block come from [`BlockSpec::in_stage`]).
    pub fn for_stage(config: &SwinConfig, i: usize) -> Self {
        let side = config.stage_resolution(i);
        Self {
            dim: config.stage_dim(i),
            resolution: (side, side),
            num_heads: config.num_heads[i],
            window: config.window_sizes[i],
            shift: 0,
            mlp_ratio: config.mlp_ratio,
            qkv_bias: config.qkv_bias,
            drop_path: 0.0,
        }
    }

    /// How the compressor's decoder lays out its Swin blocks of width `dim`
    /// (the grid is the latent's).
    pub fn for_decoder(config: &CompressorConfig, dim: i64, num_heads: i64) -> Self {
        let side = config.latent_size();
        Self {
            dim,
            resolution: (side, side),
            num_heads,
            window: config.window,
            shift: 0,
            mlp_ratio: 4.0,
            qkv_bias: true,
            drop_path: 0.0,
        }
    }

    /// Block `i` of a stage laid out as `self`: odd blocks shift by half a
    /// window; `drop_paths` holds the stage's rates (missing ones are 0).
    pub fn in_stage(self, i: usize, drop_paths: &[f64]) -> Self {
        Self {
            shift: if i.is_multiple_of(2) { 0 } else { self.window / 2 },
            drop_path: drop_paths.get(i).copied().unwrap_or(0.0),
            ..self
        }
    }

    /// The `(window, shift)` the block really uses: a window that covers the
    /// grid shrinks to it and drops the shift, as timm does.
    pub fn effective_window(&self) -> (i64, i64) {
        let (h, w) = self.resolution;
        if h.min(w) <= self.window {
            (h.min(w), 0)
        } else {
            (self.window, self.shift)
        }
    }
}

impl SwinBlock {
    /// Registers `norm1`, `attn`, `norm2`, `mlp.fc1`, `mlp.fc2` under `p`.
    pub fn new(p: &nn::Path, spec: BlockSpec) -> Self {
        let (h, w) = spec.resolution;
        let (window, shift) = spec.effective_window();
        let ln = nn::LayerNormConfig {
            eps: 1e-5,
            ..Default::default()
        };
        let hidden = (spec.dim as f64 * spec.mlp_ratio) as i64;
        Self {
            norm1: nn::layer_norm(p / "norm1", vec![spec.dim], ln),
            attn: WindowAttention::new(&(p / "attn"), spec.dim, spec.num_heads, window, spec.qkv_bias),
            norm2: nn::layer_norm(p / "norm2", vec![spec.dim], ln),
            fc1: nn::linear(p / "mlp" / "fc1", spec.dim, hidden, Default::default()),
            fc2: nn::linear(p / "mlp" / "fc2", hidden, spec.dim, Default::default()),
            resolution: spec.resolution,
            window,
            shift,
            attn_mask: (shift > 0).then(|| shifted_window_mask(h, w, window, shift).to_device(p.device())),
            drop_path: spec.drop_path,
        }
    }

    /// Blocks `0..depth` of a stage: shifts alternate, drop-path rates given per block.
    pub fn stage(p: &nn::Path, spec: BlockSpec, depth: usize, drop_paths: &[f64]) -> Vec<Self> {
        (0..depth)
            .map(|i| Self::new(&(p / i as i64), spec.in_stage(i, drop_paths)))
            .collect()
    }
}

impl SwinBlock {
    /// The block's output and the output of its `norm1` `(B, L, C)`, the
    /// layer saliency methods (XGradCAM) read activations and gradients from.
    pub fn forward_with_norm1(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let (h, w) = self.resolution;
        let s = x.size();
        let (b, c) = (s[0], s[2]);
        let shortcut = x;
        let normed = x.apply(&self.norm1);
        let mut t = normed.view([b, h, w, c]);
        if self.shift > 0 {
            t = t.roll([-self.shift, -self.shift], [1, 2]);
        }
        let windows = window_partition(&t, self.window).view([-1, self.window * self.window, c]);
        let attended = self.attn.forward(&windows, self.attn_mask.as_ref());
        let mut t = window_reverse(&attended.view([-1, self.window, self.window, c]), self.window, h, w);
        if self.shift > 0 {
            t = t.roll([self.shift, self.shift], [1, 2]);
        }
        let x = shortcut + drop_path(t.view([b, h * w, c]), self.drop_path, train);
        let mlp = x.apply(&self.norm2).apply(&self.fc1).gelu("none").apply(&self.fc2);
        (&x + drop_path(mlp, self.drop_path, train), normed)
    }
}

impl ModuleT for SwinBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_with_norm1(x, train).0
    }
}

/// Patch merging: concatenates each 2×2 neighbourhood (in the order
/// (0,0), (1,0), (0,1), (1,1)), normalises, and projects `4C → out`.
#[derive(Debug)]
pub struct PatchMerging {
    norm: nn::LayerNorm,
    reduction: nn::Linear,
    resolution: (i64, i64),
}

impl PatchMerging {
    /// Registers `norm` and `reduction` under `p`.
    pub fn new(p: &nn::Path, resolution: (i64, i64), dim: i64, out_dim: i64) -> Self {
        Self {
            norm: nn::layer_norm(
                p / "norm",
                vec![4 * dim],
                nn::LayerNormConfig {
                    eps: 1e-5,
                    ..Default::default()
                },
            ),
            reduction: nn::linear(
                p / "reduction",
                4 * dim,
                out_dim,
                nn::LinearConfig {
                    bias: false,
                    ..Default::default()
                },
            ),
            resolution,
        }
    }
}

impl Module for PatchMerging {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (h, w) = self.resolution;
        let s = x.size();
        let (b, c) = (s[0], s[2]);
        let x = x.view([b, h, w, c]);
        let pick = |dy: i64, dx: i64| x.slice(1, dy, h, 2).slice(2, dx, w, 2);
        Tensor::cat(&[pick(0, 0), pick(1, 0), pick(0, 1), pick(1, 1)], -1)
            .view([b, -1, 4 * c])
            .apply(&self.norm)
            .apply(&self.reduction)
    }
}

/// One stage in timm 0.8's layout: blocks, then (except in the last stage) patch merging.
#[derive(Debug)]
pub struct SwinStage {
    blocks: Vec<SwinBlock>,
    downsample: Option<PatchMerging>,
}

impl SwinStage {
    /// The stage's output and the `norm1` output of its last block.
    fn forward_probed(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let mut x = x.shallow_clone();
        let mut probe = None;
        for block in &self.blocks {
            let (out, normed) = block.forward_with_norm1(&x, train);
            x = out;
            probe = Some(normed);
        }
        let out = match &self.downsample {
            Some(merge) => merge.forward(&x),
            None => x,
        };
        (out, probe.expect("a stage has at least one block"))
    }
}

impl ModuleT for SwinStage {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_probed(x, train).0
    }
}

/// A Swin Transformer, or the stages `stages` of one.
///
/// With `stages.start == 0` it starts from the image (`patch_embed`);
/// otherwise from the tokens of [`SwinConfig::stage_input_shape`]. With
/// `stages.end == num_stages` it ends with `norm`, token averaging and `head`
/// (logits); otherwise with the tokens after stage `end - 1`.
#[derive(Debug)]
pub struct SwinTransformer {
    config: SwinConfig,
    stages: Range<usize>,
    patch_embed: Option<(nn::Conv2D, nn::LayerNorm)>,
    layers: Vec<SwinStage>,
    head: Option<(nn::LayerNorm, nn::Linear)>,
}

impl SwinTransformer {
    /// Registers the modules of `stages` under `p` with timm's names
    /// (`patch_embed.proj`, `layers.{i}.blocks.{j}…`, `layers.{i}.downsample`, `norm`, `head`).
    pub fn new(p: &nn::Path, config: &SwinConfig, stages: Range<usize>) -> Self {
        let n = config.num_stages();
        assert!(
            stages.start < stages.end && stages.end <= n,
            "stage range {stages:?} outside 0..{n}"
        );
        let total: i64 = config.depths.iter().sum();
        let rates = drop_path_rates(config.drop_path_rate, total as usize);
        let ln = nn::LayerNormConfig {
            eps: 1e-5,
            ..Default::default()
        };
        let patch_embed = (stages.start == 0).then(|| {
            let conv = nn::ConvConfig {
                stride: config.patch_size,
                ..Default::default()
            };
            (
                nn::conv2d(
                    p / "patch_embed" / "proj",
                    config.in_chans,
                    config.embed_dim,
                    config.patch_size,
                    conv,
                ),
                nn::layer_norm(p / "patch_embed" / "norm", vec![config.embed_dim], ln),
            )
        });
        let layers = stages
            .clone()
            .map(|i| {
                let lp = p / "layers" / i as i64;
                let side = config.stage_resolution(i);
                let dim = config.stage_dim(i);
                let first = config.depths[..i].iter().sum::<i64>() as usize;
                let spec = BlockSpec::for_stage(config, i);
                let depth = config.depths[i] as usize;
                SwinStage {
                    blocks: SwinBlock::stage(&(&lp / "blocks"), spec, depth, &rates[first..first + depth]),
                    downsample: (i + 1 < n)
                        .then(|| PatchMerging::new(&(&lp / "downsample"), (side, side), dim, 2 * dim)),
                }
            })
            .collect();
        let head = (stages.end == n).then(|| {
            let features = config.stage_dim(n - 1);
            (
                nn::layer_norm(p / "norm", vec![features], ln),
                nn::linear(p / "head", features, config.num_classes, Default::default()),
            )
        });
        Self {
            config: config.clone(),
            stages,
            patch_embed,
            layers,
            head,
        }
    }

    /// The architecture.
    pub fn config(&self) -> &SwinConfig {
        &self.config
    }

    /// The stages this instance holds.
    pub fn stages(&self) -> Range<usize> {
        self.stages.clone()
    }

    /// Tokens before the global average pool and head: what `forward_t`
    /// computes up to `norm` (only when this instance holds the last stage).
    pub fn forward_features_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_probed(x, train).0
    }

    /// [`SwinTransformer::forward_features_t`] plus, for every stage held
    /// (in order), the `norm1` output `(B, L, C)` of its last block: the
    /// layers the reference's XGradCAM maps read.
    pub fn forward_probed(&self, x: &Tensor, train: bool) -> (Tensor, Vec<Tensor>) {
        let mut x = match &self.patch_embed {
            Some((proj, norm)) => x.apply(proj).flatten(2, -1).transpose(1, 2).apply(norm),
            None => x.shallow_clone(),
        };
        let mut probes = Vec::with_capacity(self.layers.len());
        for stage in &self.layers {
            let (out, probe) = stage.forward_probed(&x, train);
            x = out;
            probes.push(probe);
        }
        let features = match &self.head {
            Some((norm, _)) => x.apply(norm),
            None => x,
        };
        (features, probes)
    }

    /// Logits from features of [`SwinTransformer::forward_features_t`]
    /// (the instance must hold the last stage); otherwise the features.
    pub fn classify_features(&self, features: &Tensor) -> Tensor {
        match &self.head {
            Some((_, head)) => features.mean_dim(1, false, features.kind()).apply(head),
            None => features.shallow_clone(),
        }
    }
}

impl ModuleT for SwinTransformer {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.classify_features(&self.forward_features_t(x, train))
    }
}
