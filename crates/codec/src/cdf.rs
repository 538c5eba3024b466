//! Quantised CDF tables: CompressAI's `pmf_to_quantized_cdf`, and the table of
//! rows the coder reads (`_quantized_cdf`, `_cdf_length`, `_offset`).

use crate::error::{CodecError, Result};
use crate::rans::{PRECISION, PROB_SCALE};

/// Longest CDF row the coder accepts: every symbol needs a non-zero frequency
/// out of 2^16, so a row can hold at most 2^16 symbols (2^16 + 1 entries).
pub const MAX_CDF_LENGTH: usize = PROB_SCALE as usize + 1;

/// Bits of the cumulative frequency used to index the decoding lookup table.
const LUT_BITS: u32 = 10;
const LUT_SHIFT: u32 = PRECISION - LUT_BITS;
const LUT_SIZE: usize = 1 << LUT_BITS;

/// Quantises a probability mass function to a 16-bit CDF exactly as
/// CompressAI's C++ `pmf_to_quantized_cdf` does, so tables built here equal
/// the ones a Python peer builds from the same `f32` pmf.
///
/// The steps: round every `p * 2^16` in `f32` (half away from zero), rescale
/// the integer frequencies to sum to 2^16 with integer division, take the
/// prefix sum, pin the last entry to 2^16, then give every zero-width bin one
/// unit taken from the smallest bin wider than one (first such in scan order).
/// The last pmf entry is the escape ("tail mass") symbol.
pub fn pmf_to_quantized_cdf(pmf: &[f32]) -> Result<Vec<u32>> {
    if pmf.is_empty() {
        return Err(CodecError::InvalidPmf("empty pmf".into()));
    }
    if pmf.len() + 1 > MAX_CDF_LENGTH {
        return Err(CodecError::InvalidPmf(format!(
            "{} symbols do not fit a 16-bit table",
            pmf.len()
        )));
    }
    if let Some(p) = pmf.iter().find(|p| !p.is_finite() || **p < 0.0) {
        return Err(CodecError::InvalidPmf(format!(
            "non-finite or negative element found: {p}"
        )));
    }
    let mut cdf = Vec::with_capacity(pmf.len() + 1);
    cdf.push(0u32);
    // `as u32` saturates; pmf entries above 2^16 are no probabilities and are
    // caught by the total check below.
    cdf.extend(pmf.iter().map(|&p| (p * PROB_SCALE as f32).round() as u32));
    let total: u64 = cdf.iter().map(|&f| u64::from(f)).sum();
    if total == 0 {
        return Err(CodecError::InvalidPmf(
            "at least one element must have a non-zero probability".into(),
        ));
    }
    if total > u64::from(u32::MAX >> 1) {
        return Err(CodecError::InvalidPmf(format!(
            "frequencies sum to {total}, not a probability distribution"
        )));
    }
    for f in cdf.iter_mut() {
        *f = ((u64::from(PROB_SCALE) * u64::from(*f)) / total) as u32;
    }
    for i in 1..cdf.len() {
        cdf[i] += cdf[i - 1];
    }
    *cdf.last_mut().expect("cdf is non-empty") = PROB_SCALE;

    for i in 0..cdf.len() - 1 {
        if cdf[i] != cdf[i + 1] {
            continue;
        }
        let mut best: Option<(u32, usize)> = None;
        for j in 0..cdf.len() - 1 {
            let freq = cdf[j + 1] - cdf[j];
            if freq > 1 && best.is_none_or(|(best_freq, _)| freq < best_freq) {
                best = Some((freq, j));
            }
        }
        let Some((_, steal)) = best else {
            return Err(CodecError::InvalidPmf(
                "no bin has frequency to spare for a zero-width bin".into(),
            ));
        };
        if steal < i {
            for entry in &mut cdf[steal + 1..=i] {
                *entry -= 1;
            }
        } else {
            for entry in &mut cdf[i + 1..=steal] {
                *entry += 1;
            }
        }
    }
    Ok(cdf)
}

/// A set of quantised CDF rows, each with its offset: what CompressAI stores
/// in an entropy model's `_quantized_cdf`, `_cdf_length` and `_offset`.
///
/// Row `r` codes the values `offset[r] .. offset[r] + len(r) - 2`; its last
/// symbol (`len(r) - 2`) is the escape that introduces a bypass-coded value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CdfTables {
    cdfs: Vec<u32>,
    row_starts: Vec<usize>,
    offsets: Vec<i32>,
    /// For each row, `LUT_SIZE` entries: the symbol whose interval holds the
    /// cumulative frequency `bucket << LUT_SHIFT`. Decoding starts its search there.
    lut: Vec<u16>,
}

/// One row of a [`CdfTables`], borrowed for coding.
#[derive(Debug, Clone, Copy)]
pub struct CdfRow<'a> {
    /// CDF entries, `cdf[0] == 0`, strictly increasing, last `== 2^16`.
    pub cdf: &'a [u32],
    /// The value coded by symbol 0.
    pub offset: i32,
    lut: &'a [u16],
}

impl CdfRow<'_> {
    /// Index of the escape symbol (CompressAI's `max_value`).
    #[inline]
    pub fn escape_symbol(&self) -> usize {
        self.cdf.len() - 2
    }

    /// The symbol `s` with `cdf[s] <= cum < cdf[s + 1]`.
    #[inline]
    pub fn find(&self, cum: u32) -> usize {
        let mut s = usize::from(self.lut[(cum >> LUT_SHIFT) as usize]);
        while self.cdf[s + 1] <= cum {
            s += 1;
        }
        s
    }
}

impl CdfTables {
    /// Builds tables from rows of CDF entries and per-row offsets, checking
    /// every invariant the coder relies on.
    pub fn new(rows: Vec<Vec<u32>>, offsets: Vec<i32>) -> Result<Self> {
        if rows.len() != offsets.len() {
            return Err(CodecError::InvalidTable(format!(
                "{} CDF rows but {} offsets",
                rows.len(),
                offsets.len()
            )));
        }
        let mut cdfs = Vec::with_capacity(rows.iter().map(Vec::len).sum());
        let mut row_starts = Vec::with_capacity(rows.len() + 1);
        row_starts.push(0);
        for (r, row) in rows.iter().enumerate() {
            validate_row(r, row)?;
            cdfs.extend_from_slice(row);
            row_starts.push(cdfs.len());
        }
        let lut = build_lut(&cdfs, &row_starts);
        Ok(Self {
            cdfs,
            row_starts,
            offsets,
            lut,
        })
    }

    /// Builds tables from CompressAI's buffers: `quantized_cdf` is the padded
    /// `rows × width` int32 matrix, `cdf_length` and `offset` its companions.
    pub fn from_compressai(quantized_cdf: &[i32], width: usize, cdf_length: &[i32], offset: &[i32]) -> Result<Self> {
        let rows = cdf_length.len();
        if quantized_cdf.len() != rows * width {
            return Err(CodecError::InvalidTable(format!(
                "_quantized_cdf has {} entries, expected {rows} rows × {width}",
                quantized_cdf.len()
            )));
        }
        let rows = cdf_length
            .iter()
            .enumerate()
            .map(|(r, &len)| {
                let len = usize::try_from(len).ok().filter(|&len| len <= width).ok_or_else(|| {
                    CodecError::InvalidTable(format!("row {r}: _cdf_length {len} is outside 0..={width}"))
                })?;
                quantized_cdf[r * width..r * width + len]
                    .iter()
                    .map(|&v| {
                        u32::try_from(v)
                            .map_err(|_| CodecError::InvalidTable(format!("row {r}: negative CDF entry {v}")))
                    })
                    .collect()
            })
            .collect::<Result<Vec<Vec<u32>>>>()?;
        Self::new(rows, offset.to_vec())
    }

    /// The tables as CompressAI's buffers `(_quantized_cdf, width, _cdf_length, _offset)`,
    /// rows zero-padded to the longest row as `update()` lays them out.
    pub fn to_compressai(&self) -> (Vec<i32>, usize, Vec<i32>, Vec<i32>) {
        let width = (0..self.num_rows())
            .map(|r| self.row_starts[r + 1] - self.row_starts[r])
            .max()
            .unwrap_or(0);
        let mut padded = vec![0i32; width * self.num_rows()];
        let mut lengths = Vec::with_capacity(self.num_rows());
        for r in 0..self.num_rows() {
            let row = &self.cdfs[self.row_starts[r]..self.row_starts[r + 1]];
            for (dst, &v) in padded[r * width..].iter_mut().zip(row) {
                *dst = v as i32;
            }
            lengths.push(row.len() as i32);
        }
        (padded, width, lengths, self.offsets.clone())
    }

    /// Number of rows (CDF indexes).
    pub fn num_rows(&self) -> usize {
        self.offsets.len()
    }

    /// Row `r`. Panics if `r >= num_rows()`; coding paths check indexes first.
    #[inline]
    pub fn row(&self, r: usize) -> CdfRow<'_> {
        CdfRow {
            cdf: &self.cdfs[self.row_starts[r]..self.row_starts[r + 1]],
            offset: self.offsets[r],
            lut: &self.lut[r * LUT_SIZE..(r + 1) * LUT_SIZE],
        }
    }

    /// Per-row offsets (`_offset`).
    pub fn offsets(&self) -> &[i32] {
        &self.offsets
    }

    /// Row `r`'s CDF entries.
    pub fn cdf(&self, r: usize) -> &[u32] {
        self.row(r).cdf
    }
}

fn validate_row(r: usize, row: &[u32]) -> Result<()> {
    let bad = |why: String| Err(CodecError::InvalidTable(format!("row {r}: {why}")));
    if row.len() < 2 || row.len() > MAX_CDF_LENGTH {
        return bad(format!("CDF length {} is outside 2..={MAX_CDF_LENGTH}", row.len()));
    }
    if row[0] != 0 {
        return bad(format!("first CDF entry is {}, expected 0", row[0]));
    }
    if row[row.len() - 1] != PROB_SCALE {
        return bad(format!(
            "last CDF entry is {}, expected {PROB_SCALE}",
            row[row.len() - 1]
        ));
    }
    if let Some(i) = row.windows(2).position(|w| w[1] <= w[0]) {
        return bad(format!(
            "CDF is not strictly increasing at entry {i} ({} then {})",
            row[i],
            row[i + 1]
        ));
    }
    Ok(())
}

fn build_lut(cdfs: &[u32], row_starts: &[usize]) -> Vec<u16> {
    let mut lut = Vec::with_capacity((row_starts.len() - 1) * LUT_SIZE);
    for w in row_starts.windows(2) {
        let cdf = &cdfs[w[0]..w[1]];
        let mut s = 0usize;
        for bucket in 0..LUT_SIZE as u32 {
            let cum = bucket << LUT_SHIFT;
            while cdf[s + 1] <= cum {
                s += 1;
            }
            // Rows hold at most 2^16 symbols, so `s` fits.
            lut.push(s as u16);
        }
    }
    lut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_valid(cdf: &[u32]) -> bool {
        cdf[0] == 0 && *cdf.last().unwrap() == PROB_SCALE && cdf.windows(2).all(|w| w[0] < w[1])
    }

    #[test]
    fn rounding_is_half_away_from_zero_in_f32() {
        // 2.5/65536 and 3.5/65536 round to 3 and 4 (ties away from zero; ties
        // to even would give 2 and 4); with 65529 the total is exactly 2^16,
        // so rescaling leaves the frequencies alone.
        let pmf = [2.5 / 65536.0, 3.5 / 65536.0, 65529.0 / 65536.0];
        let cdf = pmf_to_quantized_cdf(&pmf).unwrap();
        assert_eq!(cdf[1] - cdf[0], 3);
        assert_eq!(cdf[2] - cdf[1], 4);
        assert!(is_valid(&cdf));
    }

    #[test]
    fn zero_width_bins_steal_from_the_smallest_wide_bin() {
        // Bins 0 and 2 round to zero; bin 3 (5 units after rescaling) is the
        // smallest bin wider than one and pays one unit for each.
        let pmf = [1e-7, 0.9, 1e-7, 5.0 / 65536.0, 0.05];
        let cdf = pmf_to_quantized_cdf(&pmf).unwrap();
        assert!(is_valid(&cdf), "{cdf:?}");
        let freqs: Vec<u32> = cdf.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(freqs[0], 1);
        assert_eq!(freqs[2], 1);
        assert_eq!(freqs[3], 3);
        assert_eq!(freqs.iter().sum::<u32>(), PROB_SCALE);
    }

    #[test]
    fn bad_pmfs_are_refused() {
        assert!(pmf_to_quantized_cdf(&[]).is_err());
        assert!(pmf_to_quantized_cdf(&[0.0, 0.0]).is_err());
        assert!(pmf_to_quantized_cdf(&[0.5, f32::NAN]).is_err());
        assert!(pmf_to_quantized_cdf(&[0.5, -0.1]).is_err());
        assert!(pmf_to_quantized_cdf(&[1e30, 0.5]).is_err());
        assert!(pmf_to_quantized_cdf(&vec![1.0 / 70000.0; 70000]).is_err());
    }

    #[test]
    fn invalid_rows_are_refused() {
        let good = vec![0, 100, PROB_SCALE];
        assert!(CdfTables::new(vec![good.clone()], vec![0]).is_ok());
        for bad in [
            vec![0],
            vec![1, 100, PROB_SCALE],
            vec![0, 100, PROB_SCALE - 1],
            vec![0, 100, 100, PROB_SCALE],
        ] {
            assert!(CdfTables::new(vec![bad.clone()], vec![0]).is_err(), "{bad:?}");
        }
        assert!(CdfTables::new(vec![good], vec![]).is_err());
    }

    #[test]
    fn lookup_finds_the_interval_of_every_cumulative_frequency() {
        let pmf: Vec<f32> = (0..300).map(|i| 1.0 + (i % 7) as f32 * (i as f32)).collect();
        let sum: f32 = pmf.iter().sum();
        let pmf: Vec<f32> = pmf.iter().map(|p| p / sum).collect();
        let cdf = pmf_to_quantized_cdf(&pmf).unwrap();
        let tables = CdfTables::new(vec![cdf.clone()], vec![-3]).unwrap();
        let row = tables.row(0);
        for cum in 0..PROB_SCALE {
            let s = row.find(cum);
            assert!(cdf[s] <= cum && cum < cdf[s + 1], "cum {cum} -> {s}");
        }
    }

    #[test]
    fn compressai_buffers_round_trip() {
        let tables = CdfTables::new(
            vec![vec![0, 10, PROB_SCALE], vec![0, 5, 9, 30, PROB_SCALE]],
            vec![-1, -2],
        )
        .unwrap();
        let (padded, width, lengths, offsets) = tables.to_compressai();
        assert_eq!(width, 5);
        assert_eq!(lengths, [3, 5]);
        let back = CdfTables::from_compressai(&padded, width, &lengths, &offsets).unwrap();
        assert_eq!(back, tables);
        assert!(CdfTables::from_compressai(&padded, width, &[6, 5], &offsets).is_err());
    }
}
