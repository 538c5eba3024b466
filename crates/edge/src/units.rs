//! Link rates and durations as people write them: `2mbit`, `250kbit/s`,
//! `1.5MB/s`, `40ms`, `0.2s`.

use anyhow::{bail, Context, Result};

/// Parses a data rate into bits per second. Bit units (`bit`, `kbit`,
/// `mbit`, `gbit`, also `bps`, `kbps`, `mbps`, `gbps`, any case, optional
/// `/s`) are decimal; byte units (`B/s`, `kB/s`, `MB/s`, `GB/s`, capital B) are ×8.
pub fn parse_rate(text: &str) -> Result<f64> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .with_context(|| format!("rate {text:?} has no unit (e.g. 2mbit, 500kbit, 1.5MB/s)"))?;
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .with_context(|| format!("rate {text:?} does not start with a number"))?;
    let unit = unit.trim().trim_end_matches("/s");
    let bytes = unit.ends_with('B');
    let scale = match unit.to_ascii_lowercase().trim_end_matches("ps").trim_end_matches("it") {
        "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => bail!("unknown rate unit in {text:?} (bit, kbit, mbit, gbit, B/s, kB/s, MB/s, GB/s)"),
    };
    let bits = value * scale * if bytes { 8.0 } else { 1.0 };
    if !(bits.is_finite() && bits > 0.0) {
        bail!("rate {text:?} must be positive");
    }
    Ok(bits)
}

/// Parses a duration (`us`, `ms`, `s`) into milliseconds.
pub fn parse_ms(text: &str) -> Result<f64> {
    let s = text.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e3)
    } else {
        bail!("duration {text:?} needs a unit (us, ms or s)");
    };
    let value: f64 = number
        .trim()
        .parse()
        .with_context(|| format!("duration {text:?} does not start with a number"))?;
    if !(value.is_finite() && value >= 0.0) {
        bail!("duration {text:?} must not be negative");
    }
    Ok(value * scale)
}

/// A rate for people: `270 kbit/s`, `12 Mbit/s`.
pub fn format_rate(bits_per_s: f64) -> String {
    if bits_per_s >= 1e9 {
        format!("{:.3} Gbit/s", bits_per_s / 1e9)
    } else if bits_per_s >= 1e6 {
        format!("{} Mbit/s", trim(bits_per_s / 1e6))
    } else if bits_per_s >= 1e3 {
        format!("{} kbit/s", trim(bits_per_s / 1e3))
    } else {
        format!("{} bit/s", trim(bits_per_s))
    }
}

fn trim(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_in_bits_and_bytes() {
        for (text, bits) in [
            ("2mbit", 2e6),
            ("2Mbit/s", 2e6),
            ("250kbit", 250e3),
            ("0.27Mbps", 270e3),
            ("1gbit", 1e9),
            ("1.5MB/s", 12e6),
            ("100kB/s", 800e3),
            ("64bit", 64.0),
        ] {
            assert!((parse_rate(text).unwrap() - bits).abs() < 1e-6 * bits, "{text}");
        }
        for bad in ["", "2", "mbit", "2 parsecs", "0mbit", "-1mbit", "1..2mbit"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_in_milliseconds() {
        assert_eq!(parse_ms("40ms").unwrap(), 40.0);
        assert_eq!(parse_ms("0.2s").unwrap(), 200.0);
        assert_eq!(parse_ms("500us").unwrap(), 0.5);
        for bad in ["40", "ms", "-3ms", "fast"] {
            assert!(parse_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formatted_rates_parse_back() {
        for bits in [270e3, 12e6, 1.5e9, 800.0] {
            let text = format_rate(bits).replace(' ', "");
            assert!((parse_rate(&text).unwrap() - bits).abs() < 1e-3 * bits, "{text}");
        }
    }
}
