//! Line charts for reports, as PNG or SVG (by the file's extension), drawn
//! with plotters and an embedded font so they render the same everywhere.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, bail, Context, Result};
use image::ImageEncoder;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

/// DejaVu Sans (Bitstream Vera licence, `assets/DejaVuSans.LICENSE`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// One line of a chart.
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points in data units (x ascending).
    pub points: Vec<(f64, f64)>,
}

/// What to draw.
pub struct Chart<'a> {
    /// Title above the plot.
    pub title: String,
    /// Axis labels.
    pub x_label: String,
    /// Axis labels.
    pub y_label: String,
    /// Logarithmic axes (values must be positive).
    pub log_x: bool,
    /// Logarithmic axes (values must be positive).
    pub log_y: bool,
    /// The lines.
    pub series: &'a [Series],
    /// Labelled vertical marks (x in data units), e.g. named link profiles.
    pub marks: &'a [(f64, String)],
    /// Where the legend goes (where the data leaves room).
    pub legend: SeriesLabelPosition,
}

impl<'a> Chart<'a> {
    /// Milliseconds against uplink bandwidth in Mbit/s, both axes
    /// logarithmic, the link profiles marked: the latency plots.
    pub fn over_bandwidth(title: String, y_label: &str, series: &'a [Series], marks: &'a [(f64, String)]) -> Self {
        Self {
            title,
            x_label: "uplink bandwidth (Mbit/s)".into(),
            y_label: y_label.into(),
            log_x: true,
            log_y: true,
            series,
            marks,
            legend: SeriesLabelPosition::UpperRight,
        }
    }
}

const SIZE: (u32, u32) = (960, 600);

/// Line colours that stay apart on white (Tableau 10).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Draws `chart` to `path` (`.png` or `.svg`), written atomically.
pub fn draw(chart: &Chart<'_>, path: &Path) -> Result<()> {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The embedded font is valid; if it were not, text would be missing, not the chart.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let bytes = match extension.as_str() {
        "png" => {
            let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
            {
                let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
                render(chart, &root)?;
                root.present()
                    .map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))?;
            }
            let mut out = Vec::new();
            image::codecs::png::PngEncoder::new(&mut out)
                .write_image(&pixels, SIZE.0, SIZE.1, image::ExtendedColorType::Rgb8)
                .context("cannot encode the PNG")?;
            out
        }
        "svg" => {
            let mut text = String::new();
            {
                let root = SVGBackend::with_string(&mut text, SIZE).into_drawing_area();
                render(chart, &root)?;
                root.present()
                    .map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))?;
            }
            text.into_bytes()
        }
        _ => bail!("{}: plots are written as .png or .svg", path.display()),
    };
    frankensplit_edge::write_atomically(path, &bytes)
}

/// A tick label: at most 3 significant digits, without trailing zeros.
fn tick(v: f64) -> String {
    let magnitude = v.abs();
    if magnitude != 0.0 && !(0.01..1e5).contains(&magnitude) {
        return format!("{v:.0e}");
    }
    let decimals = if magnitude >= 100.0 {
        0
    } else if magnitude >= 1.0 {
        2
    } else {
        3
    };
    let text = format!("{v:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// The data's extent on one axis, padded by 5 % (of the decades on a log axis).
fn extent(values: impl Iterator<Item = f64> + Clone, log: bool) -> std::ops::Range<f64> {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    if log {
        let (lo, hi) = (lo.log10(), hi.log10());
        let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
        10f64.powf(lo - pad)..10f64.powf(hi + pad)
    } else {
        let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
        (lo - pad)..(hi + pad)
    }
}

fn render<DB: DrawingBackend>(chart: &Chart<'_>, root: &DrawingArea<DB, Shift>) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let points: Vec<(f64, f64)> = chart.series.iter().flat_map(|s| s.points.iter().copied()).collect();
    if points.is_empty() {
        bail!("nothing to plot");
    }
    if points
        .iter()
        .any(|&(x, y)| !x.is_finite() || !y.is_finite() || (chart.log_x && x <= 0.0) || (chart.log_y && y <= 0.0))
    {
        bail!("cannot plot non-finite values, or values ≤ 0 on a logarithmic axis");
    }
    let x = extent(points.iter().map(|p| p.0), chart.log_x);
    let y = extent(points.iter().map(|p| p.1), chart.log_y);
    let log = |r: &std::ops::Range<f64>| r.clone().log_scale().with_key_points(log_ticks(r));
    match (chart.log_x, chart.log_y) {
        (false, false) => render_in(chart, root, x.clone(), y.clone(), x, y),
        (true, false) => render_in(chart, root, log(&x), y.clone(), x, y),
        (false, true) => render_in(chart, root, x.clone(), log(&y), x, y),
        (true, true) => render_in(chart, root, log(&x), log(&y), x, y),
    }
}

/// Labelled points of a logarithmic axis: 1-2-5 per decade, or 1 to 9 when
/// the range spans under two decades (plotters' own choice leaves the lowest
/// decade unlabelled).
fn log_ticks(range: &std::ops::Range<f64>) -> Vec<f64> {
    let (lo, hi) = (range.start.log10(), range.end.log10());
    let mantissas: &[f64] = if hi - lo < 2.0 {
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0]
    } else {
        &[1.0, 2.0, 5.0]
    };
    (lo.floor() as i32..=hi.ceil() as i32)
        .flat_map(|decade| mantissas.iter().map(move |m| m * 10f64.powi(decade)))
        .filter(|v| range.contains(v))
        .collect()
}

fn render_in<DB, X, Y>(
    chart: &Chart<'_>,
    root: &DrawingArea<DB, Shift>,
    x_spec: X,
    y_spec: Y,
    x_range: std::ops::Range<f64>,
    y_range: std::ops::Range<f64>,
) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing failed: {e:?}");
    root.fill(&WHITE).map_err(fail)?;
    let mut plot = ChartBuilder::on(root)
        .caption(&chart.title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x_spec, y_spec)
        .map_err(fail)?;
    plot.configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(fail)?;
    let grey = RGBColor(150, 150, 150);
    for (x, label) in chart.marks {
        if !x_range.contains(x) {
            continue;
        }
        plot.draw_series(LineSeries::new(
            [(*x, y_range.start), (*x, y_range.end)],
            grey.stroke_width(1),
        ))
        .map_err(fail)?;
        plot.draw_series(std::iter::once(Text::new(
            format!(" {label}"),
            (*x, y_range.end),
            ("sans-serif", 14).into_font().color(&grey),
        )))
        .map_err(fail)?;
    }
    for (i, series) in chart.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        plot.draw_series(LineSeries::new(series.points.clone(), color.stroke_width(2)))
            .map_err(fail)?
            .label(series.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        plot.draw_series(series.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(fail)?;
    }
    plot.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(chart.legend.clone())
        .draw()
        .map_err(fail)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_axes_are_labelled_in_every_decade_they_span() {
        let ticks = log_ticks(&(25.0..700.0));
        assert_eq!(
            ticks,
            [30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0]
        );
        let wide = log_ticks(&(0.08..1200.0));
        assert_eq!(wide.first(), Some(&0.1));
        assert_eq!(wide.last(), Some(&1000.0));
        assert_eq!(wide.len(), 3 * 4 + 1);
        assert!(wide.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn ticks_are_short() {
        for (v, text) in [
            (1000.0, "1000"),
            (0.1, "0.1"),
            (3.0, "3"),
            (2.5, "2.5"),
            (0.125, "0.125"),
            (1e6, "1e6"),
            (150.0, "150"),
        ] {
            assert_eq!(tick(v), text);
        }
    }

    #[test]
    fn charts_render_as_png_and_svg_and_bad_data_is_refused() {
        let dir = std::env::temp_dir().join(format!("frankensplit-plot-{}", std::process::id()));
        let series = [
            Series {
                name: "a".into(),
                points: vec![(0.1, 10.0), (1.0, 30.0), (10.0, 300.0)],
            },
            Series {
                name: "b".into(),
                points: vec![(0.1, 20.0), (10.0, 20.0)],
            },
        ];
        let marks = [(1.0, "lte".to_string())];
        for (log_x, log_y) in [(false, false), (true, true), (true, false)] {
            let chart = Chart {
                title: "t".into(),
                x_label: "x".into(),
                y_label: "y".into(),
                log_x,
                log_y,
                series: &series,
                marks: &marks,
                legend: SeriesLabelPosition::UpperRight,
            };
            let png = dir.join("c.png");
            draw(&chart, &png).unwrap();
            let decoded = frankensplit_preprocess::RgbImage::open(&png).unwrap();
            assert_eq!((decoded.width, decoded.height), SIZE);
            // Something besides the white background was drawn.
            assert!(decoded.pixels.iter().filter(|&&p| p < 128).count() > 1000);
            let svg = dir.join("c.svg");
            draw(&chart, &svg).unwrap();
            let text = std::fs::read_to_string(&svg).unwrap();
            assert!(text.starts_with("<svg") && text.contains("lte"));
        }
        let bad = [Series {
            name: "zero".into(),
            points: vec![(0.0, 1.0)],
        }];
        let chart = Chart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_x: true,
            log_y: false,
            series: &bad,
            marks: &[],
            legend: SeriesLabelPosition::UpperRight,
        };
        assert!(draw(&chart, &dir.join("bad.png")).is_err());
        assert!(!dir.join("bad.png").exists());
        assert!(draw(&chart, &dir.join("c.gif")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
