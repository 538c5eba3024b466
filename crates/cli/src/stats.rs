//! The statistics `eval` reports: bootstrap confidence intervals of top-1
//! accuracy, and a Bjøntegaard-style summary of two rate–accuracy curves —
//! the mean ratio of the bytes one method needs to the bytes another needs
//! for the same top-1, over the accuracy range both reach.
//!
//! The byte ratio (see docs/results.md for the derivation): each curve is
//! reduced to its Pareto front (no point both larger and less accurate than
//! another), then `ln bytes` is taken as a piecewise-linear function of
//! top-1 through the front's points. Over the common range `[lo, hi]` of
//! top-1, `ratio = exp( 1/(hi − lo) · ∫ (ln B_a(t) − ln B_b(t)) dt )`, the
//! geometric mean over accuracy of `B_a / B_b`. Between the merged
//! breakpoints both functions are linear, so the trapezoid rule on them is
//! exact. Bjøntegaard's BD-rate does the same with cubic fits in PSNR;
//! piecewise-linear interpolation does not overshoot on curves of a few
//! noisy points.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One operating point: mean bytes per image and top-1 (%).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Mean bytes sent per image.
    pub bytes: f64,
    /// Top-1 accuracy (%).
    pub top1: f64,
}

/// The points no other point beats on both axes, in increasing bytes and
/// (strictly) increasing accuracy.
pub fn pareto_front(points: &[Point]) -> Vec<Point> {
    let mut sorted: Vec<Point> = points
        .iter()
        .copied()
        .filter(|p| p.bytes > 0.0 && p.bytes.is_finite() && p.top1.is_finite())
        .collect();
    // Cheapest first; at equal bytes the most accurate first.
    sorted.sort_by(|a, b| a.bytes.total_cmp(&b.bytes).then(b.top1.total_cmp(&a.top1)));
    let mut front: Vec<Point> = Vec::new();
    for p in sorted {
        if front.last().is_none_or(|last| p.top1 > last.top1) {
            front.push(p);
        }
    }
    front
}

/// `ln bytes` at accuracy `t` on a front (increasing in both), linear between points.
fn log_bytes_at(front: &[Point], t: f64) -> f64 {
    let i = front.partition_point(|p| p.top1 < t);
    if i == 0 {
        return front[0].bytes.ln();
    }
    if i == front.len() {
        return front[front.len() - 1].bytes.ln();
    }
    let (a, b) = (front[i - 1], front[i]);
    let w = (t - a.top1) / (b.top1 - a.top1);
    a.bytes.ln() * (1.0 - w) + b.bytes.ln() * w
}

/// The mean ratio of `a`'s bytes to `b`'s for the same top-1, over the
/// top-1 range both fronts cover, and that range; `None` when the ranges
/// do not overlap over more than a point (or a curve has no point).
pub fn byte_ratio(a: &[Point], b: &[Point]) -> Option<(f64, [f64; 2])> {
    let (fa, fb) = (pareto_front(a), pareto_front(b));
    let (first_a, last_a) = (fa.first()?, fa.last()?);
    let (first_b, last_b) = (fb.first()?, fb.last()?);
    let lo = first_a.top1.max(first_b.top1);
    let hi = last_a.top1.min(last_b.top1);
    if hi - lo <= 1e-9 {
        return None;
    }
    let mut knots: Vec<f64> = fa
        .iter()
        .chain(&fb)
        .map(|p| p.top1)
        .filter(|&t| t > lo && t < hi)
        .collect();
    knots.push(lo);
    knots.push(hi);
    knots.sort_by(f64::total_cmp);
    knots.dedup();
    let gap = |t: f64| log_bytes_at(&fa, t) - log_bytes_at(&fb, t);
    let integral: f64 = knots
        .windows(2)
        .map(|w| (gap(w[0]) + gap(w[1])) / 2.0 * (w[1] - w[0]))
        .sum();
    Some(((integral / (hi - lo)).exp(), [lo, hi]))
}

/// Per-image outcomes of one method, for resampling.
#[derive(Debug, Clone, Default)]
pub struct Outcomes {
    /// Whether the top-1 class was right, per image.
    pub correct: Vec<bool>,
    /// Bytes sent, per image.
    pub bytes: Vec<usize>,
}

impl Outcomes {
    fn point_of(&self, indices: &[usize]) -> Point {
        let n = indices.len().max(1) as f64;
        let right = indices.iter().filter(|&&i| self.correct[i]).count() as f64;
        let bytes: f64 = indices.iter().map(|&i| self.bytes[i] as f64).sum();
        Point {
            bytes: bytes / n,
            top1: 100.0 * right / n,
        }
    }
}

/// Resamples of the evaluated images (with replacement, the same draw for
/// every method, so comparisons are paired), from a fixed seed.
pub struct Bootstrap {
    draws: Vec<Vec<usize>>,
}

impl Bootstrap {
    /// `rounds` resamples of `images` images.
    pub fn new(images: usize, rounds: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let draws = (0..rounds)
            .map(|_| (0..images).map(|_| rng.gen_range(0..images.max(1))).collect())
            .collect();
        Self { draws }
    }

    /// The 95 % percentile interval of a method's top-1 (%).
    pub fn top1_interval(&self, outcomes: &Outcomes) -> [f64; 2] {
        percentile_interval(self.draws.iter().map(|d| outcomes.point_of(d).top1).collect())
    }

    /// The 95 % percentile interval of [`byte_ratio`] between two families
    /// of methods; resamples whose ranges stop overlapping are left out
    /// (their count is returned with the interval).
    pub fn ratio_interval(&self, a: &[&Outcomes], b: &[&Outcomes]) -> Option<([f64; 2], usize)> {
        let ratios: Vec<f64> = self
            .draws
            .iter()
            .filter_map(|d| {
                let pa: Vec<Point> = a.iter().map(|o| o.point_of(d)).collect();
                let pb: Vec<Point> = b.iter().map(|o| o.point_of(d)).collect();
                byte_ratio(&pa, &pb).map(|(r, _)| r)
            })
            .collect();
        let missing = self.draws.len() - ratios.len();
        (!ratios.is_empty()).then(|| (percentile_interval(ratios), missing))
    }
}

/// The 2.5th and 97.5th percentiles (linear interpolation between order statistics).
fn percentile_interval(mut values: Vec<f64>) -> [f64; 2] {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if values.is_empty() {
            return f64::NAN;
        }
        let x = q * (values.len() - 1) as f64;
        let (i, w) = (x.floor() as usize, x.fract());
        let next = values[(i + 1).min(values.len() - 1)];
        values[i] * (1.0 - w) + next * w
    };
    [at(0.025), at(0.975)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(bytes: f64, top1: f64) -> Point {
        Point { bytes, top1 }
    }

    #[test]
    fn the_front_drops_points_that_cost_more_and_know_less() {
        let front = pareto_front(&[
            p(300.0, 60.0),
            p(100.0, 50.0),
            p(200.0, 45.0),
            p(400.0, 60.0),
            p(500.0, 70.0),
        ]);
        assert_eq!(front, [p(100.0, 50.0), p(300.0, 60.0), p(500.0, 70.0)]);
    }

    #[test]
    fn a_curve_shifted_by_a_constant_factor_has_that_ratio() {
        let b = [p(100.0, 50.0), p(180.0, 60.0), p(400.0, 75.0), p(2000.0, 90.0)];
        // 40 % of b's bytes at b's accuracies from 60 % on, and one point beyond b's best.
        let mut a: Vec<Point> = b[1..].iter().map(|q| p(0.4 * q.bytes, q.top1)).collect();
        a.push(p(5000.0, 95.0));
        let (ratio, range) = byte_ratio(&a, &b).unwrap();
        assert!((ratio - 0.4).abs() < 1e-9, "{ratio}");
        assert_eq!(range, [60.0, 90.0]);
        let (inverse, _) = byte_ratio(&b, &a).unwrap();
        assert!((inverse - 2.5).abs() < 1e-9, "{inverse}");
    }

    #[test]
    fn the_ratio_averages_log_bytes_over_accuracy() {
        // ln a rises linearly by 2 over [50, 70] from ln 100; ln b stays at
        // ln 100 + 1: ∫ (t − 50)/10 − 1 dt over [50, 70] is 0, so the ratio is 1
        // although a is e times cheaper at 50 % and e times dearer at 70 %.
        let e = std::f64::consts::E;
        let a = [p(100.0, 50.0), p(100.0 * e * e, 70.0)];
        let b = [p(100.0 * e, 50.0), p(100.0 * e * 1.000_001, 70.0)];
        let (ratio, _) = byte_ratio(&a, &b).unwrap();
        assert!((ratio - 1.0).abs() < 1e-5, "{ratio}");
        // Disjoint accuracy ranges have no ratio.
        assert!(byte_ratio(&[p(10.0, 10.0), p(20.0, 20.0)], &[p(10.0, 30.0), p(20.0, 40.0)]).is_none());
    }

    #[test]
    fn bootstrap_intervals_cover_the_estimate_and_shrink_with_more_images() {
        let outcomes = |n: usize| Outcomes {
            correct: (0..n).map(|i| i % 4 != 0).collect(),
            bytes: vec![100; n],
        };
        let (small, large) = (outcomes(200), outcomes(5000));
        let [lo, hi] = Bootstrap::new(200, 500, 1).top1_interval(&small);
        assert!(lo < 75.0 && 75.0 < hi, "[{lo}, {hi}]");
        // Binomial: 1.96·√(0.75·0.25/200) = 6.0 points either side.
        assert!((hi - lo - 12.0).abs() < 2.5, "[{lo}, {hi}]");
        let [lo2, hi2] = Bootstrap::new(5000, 500, 1).top1_interval(&large);
        assert!(hi2 - lo2 < (hi - lo) / 3.0, "[{lo2}, {hi2}]");
    }
}
