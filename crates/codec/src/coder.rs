//! CompressAI's indexed coding scheme on top of Rans64: each symbol picks a
//! CDF row by index; values outside a row's range are sent as the row's escape
//! symbol followed by the value in 4-bit bypass chunks.
//!
//! Escape layout (as in CompressAI): `raw = -2v - 1` for `v < 0`, else
//! `raw = 2(v - max)`; then the number of 4-bit chunks of `raw`, written as
//! repeated 15s plus a remainder, then the chunks least significant first.
//!
//! CompressAI 1.2.x's encoder never terminates on a `raw` that needs 8 or more
//! chunks (`raw >= 2^28`, i.e. values about 2^27 away from the table), because
//! it shifts a 32-bit value by 32. We widen `raw` to 64 bits and write the same
//! scheme with 8 or 9 chunks, which covers every 32-bit symbol; such strings are
//! decoded here but cannot be produced, nor read correctly, by CompressAI.

use crate::cdf::{CdfRow, CdfTables};
use crate::error::{CodecError, Result};
use crate::rans::{RansDecoder, RansEncoder};

const BYPASS_BITS: u32 = 4;
const MAX_BYPASS: u32 = (1 << BYPASS_BITS) - 1;
/// Chunks needed for the largest `raw` an `i32` symbol can produce (< 2^34).
const MAX_BYPASS_CHUNKS: u32 = 9;

/// What coding one symbol with a row costs: the frequency (out of 2^16) of
/// the CDF entry it is coded as (the escape's, for a value outside the
/// row), and the bypass bits that follow an escape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymbolCost {
    /// Width of the coded entry's interval in the 16-bit CDF.
    pub frequency: u32,
    /// Whether the symbol lies outside the row and is sent as the escape.
    pub escaped: bool,
    /// Bits of the escape's 4-bit bypass chunks (the chunk count and the
    /// value's chunks); 0 without an escape.
    pub bypass_bits: u32,
}

impl SymbolCost {
    /// The symbol's ideal code length: `-log2(frequency / 2^16)` plus the bypass bits.
    pub fn bits(&self) -> f64 {
        f64::from(crate::rans::PRECISION) - f64::from(self.frequency).log2() + f64::from(self.bypass_bits)
    }
}

/// What `symbol` costs when coded with `row` (see [`SymbolCost`]): the
/// quantities the coder writes, without coding anything.
pub fn symbol_cost(row: CdfRow<'_>, symbol: i32) -> SymbolCost {
    let (coded, raw) = coded_entry(row, symbol);
    SymbolCost {
        frequency: row.cdf[coded + 1] - row.cdf[coded],
        escaped: raw.is_some(),
        bypass_bits: raw.map_or(0, |raw| {
            let chunks = bypass_chunks(raw);
            BYPASS_BITS * (chunks + 1 + chunks / MAX_BYPASS)
        }),
    }
}

/// The CDF entry `symbol` is coded as, and for a value outside the row the
/// `raw` value its escape carries.
#[inline]
fn coded_entry(row: CdfRow<'_>, symbol: i32) -> (usize, Option<u64>) {
    let max_value = row.escape_symbol() as i64;
    let value = i64::from(symbol) - i64::from(row.offset);
    if value < 0 {
        (max_value as usize, Some((-2 * value - 1) as u64))
    } else if value >= max_value {
        (max_value as usize, Some((2 * (value - max_value)) as u64))
    } else {
        (value as usize, None)
    }
}

/// Number of 4-bit chunks an escape's `raw` value takes.
#[inline]
fn bypass_chunks(raw: u64) -> u32 {
    (64 - raw.leading_zeros()).div_ceil(BYPASS_BITS)
}

/// Pushes `symbol`, coded with `row`, onto `enc`. Callers visit symbols in
/// reverse decoding order; the escape chunks are pushed in reverse here.
#[inline]
pub(crate) fn encode_symbol(enc: &mut RansEncoder, row: CdfRow<'_>, symbol: i32) {
    let (coded, raw) = coded_entry(row, symbol);
    if let Some(raw) = raw {
        push_escape(enc, raw);
    }
    let start = row.cdf[coded];
    enc.put(start, row.cdf[coded + 1] - start);
}

#[inline(never)]
fn push_escape(enc: &mut RansEncoder, raw: u64) {
    let chunks = bypass_chunks(raw);
    for j in (0..chunks).rev() {
        enc.put_bits(((raw >> (j * BYPASS_BITS)) & u64::from(MAX_BYPASS)) as u32, BYPASS_BITS);
    }
    enc.put_bits(chunks % MAX_BYPASS, BYPASS_BITS);
    for _ in 0..chunks / MAX_BYPASS {
        enc.put_bits(MAX_BYPASS, BYPASS_BITS);
    }
}

/// Reads one symbol coded with `row`.
#[inline]
pub(crate) fn decode_symbol(dec: &mut RansDecoder<'_>, row: CdfRow<'_>) -> Result<i32> {
    let s = row.find(dec.peek());
    let start = row.cdf[s];
    dec.advance(start, row.cdf[s + 1] - start)?;
    let max_value = row.escape_symbol();
    let value = if s == max_value {
        read_escape(dec, max_value as i64)?
    } else {
        s as i64
    };
    let symbol = value + i64::from(row.offset);
    i32::try_from(symbol).map_err(|_| CodecError::SymbolOutOfRange { value: symbol })
}

#[inline(never)]
fn read_escape(dec: &mut RansDecoder<'_>, max_value: i64) -> Result<i64> {
    let mut chunk = dec.get_bits(BYPASS_BITS)?;
    let mut chunks = chunk;
    while chunk == MAX_BYPASS {
        if chunks > MAX_BYPASS_CHUNKS {
            return Err(CodecError::Corrupt(
                "escape announces more bypass chunks than any 32-bit symbol needs",
            ));
        }
        chunk = dec.get_bits(BYPASS_BITS)?;
        chunks += chunk;
    }
    if chunks > MAX_BYPASS_CHUNKS {
        return Err(CodecError::Corrupt(
            "escape announces more bypass chunks than any 32-bit symbol needs",
        ));
    }
    let mut raw = 0u64;
    let mut top_chunk = 0;
    for j in 0..chunks {
        top_chunk = dec.get_bits(BYPASS_BITS)?;
        raw |= u64::from(top_chunk) << (j * BYPASS_BITS);
    }
    // An encoder writes exactly as many chunks as `raw` needs, so a zero top
    // chunk never comes from one; refusing it keeps decoding one-to-one.
    if chunks > 0 && top_chunk == 0 {
        return Err(CodecError::Corrupt("escape value has a redundant zero chunk"));
    }
    let magnitude = (raw >> 1) as i64;
    Ok(if raw & 1 == 1 {
        -magnitude - 1
    } else {
        magnitude + max_value
    })
}

/// Encodes `symbols`, each with the CDF row named by the matching entry of
/// `indexes`: CompressAI's `RansEncoder.encode_with_indexes`, byte for byte.
pub fn encode_with_indexes(symbols: &[i32], indexes: &[u32], tables: &CdfTables) -> Result<Vec<u8>> {
    check_indexes(indexes, symbols.len(), tables)?;
    let mut enc = RansEncoder::with_capacity(symbols.len() / 2);
    for (&symbol, &index) in symbols.iter().zip(indexes).rev() {
        encode_symbol(&mut enc, tables.row(index as usize), symbol);
    }
    Ok(enc.finish())
}

/// Decodes one symbol per entry of `indexes` from `bytes`: CompressAI's
/// `RansDecoder.decode_with_indexes`, but every malformed input is an error.
pub fn decode_with_indexes(bytes: &[u8], indexes: &[u32], tables: &CdfTables) -> Result<Vec<i32>> {
    check_indexes(indexes, indexes.len(), tables)?;
    let mut dec = RansDecoder::new(bytes)?;
    let symbols = indexes
        .iter()
        .map(|&index| decode_symbol(&mut dec, tables.row(index as usize)))
        .collect::<Result<Vec<i32>>>()?;
    dec.finish()?;
    Ok(symbols)
}

fn check_indexes(indexes: &[u32], expected_len: usize, tables: &CdfTables) -> Result<()> {
    if indexes.len() != expected_len {
        return Err(CodecError::ShapeMismatch(format!(
            "{expected_len} symbols but {} indexes",
            indexes.len()
        )));
    }
    let rows = tables.num_rows();
    match indexes.iter().position(|&i| i as usize >= rows) {
        Some(position) => Err(CodecError::IndexOutOfRange {
            position,
            index: indexes[position],
            rows,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdf::pmf_to_quantized_cdf;

    fn tables() -> CdfTables {
        let narrow = pmf_to_quantized_cdf(&[0.2, 0.5, 0.25, 0.05]).unwrap();
        let wide = pmf_to_quantized_cdf(&[0.1; 10]).unwrap();
        CdfTables::new(vec![narrow, wide], vec![-1, -5]).unwrap()
    }

    #[test]
    fn escapes_cover_the_whole_i32_range() {
        let tables = tables();
        let symbols = [
            0,
            1,
            -1,
            2,
            3,
            -2,
            100,
            -100,
            1 << 27,
            -(1 << 27),
            1 << 28,
            i32::MAX,
            i32::MIN,
            -7,
            9,
        ];
        let indexes: Vec<u32> = (0..symbols.len() as u32).map(|i| i % 2).collect();
        let bytes = encode_with_indexes(&symbols, &indexes, &tables).unwrap();
        assert_eq!(decode_with_indexes(&bytes, &indexes, &tables).unwrap(), symbols);
    }

    #[test]
    fn every_escape_length_round_trips() {
        let tables = tables();
        // raw values with 0..=9 chunks around each chunk boundary.
        let mut symbols = Vec::new();
        for bits in 0..32 {
            let magnitude = 1i64 << bits;
            for v in [magnitude - 1, magnitude, -magnitude, -magnitude - 1] {
                if let Ok(v) = i32::try_from(v + 2) {
                    symbols.push(v);
                }
            }
        }
        let indexes = vec![0; symbols.len()];
        let bytes = encode_with_indexes(&symbols, &indexes, &tables).unwrap();
        assert_eq!(decode_with_indexes(&bytes, &indexes, &tables).unwrap(), symbols);
    }

    #[test]
    fn symbol_costs_count_the_coded_entry_and_the_bypass_chunks() {
        let tables = tables();
        let narrow = tables.row(0); // offset -1, values -1..=1, escape entry 3
        let cdf = narrow.cdf;
        let inside = symbol_cost(narrow, 0);
        assert_eq!(
            (inside.frequency, inside.escaped, inside.bypass_bits),
            (cdf[2] - cdf[1], false, 0)
        );
        assert!((inside.bits() - (16.0 - f64::from(cdf[2] - cdf[1]).log2())).abs() < 1e-12);
        let escape = cdf[4] - cdf[3];
        // -2 is one below the row: raw 1, one chunk, plus the count chunk.
        assert_eq!(
            symbol_cost(narrow, -2),
            SymbolCost {
                frequency: escape,
                escaped: true,
                bypass_bits: 8
            }
        );
        // 2 is the first value above: raw 0, no chunk, only the count.
        assert_eq!(symbol_cost(narrow, 2).bypass_bits, 4);
        // 2 + 8 = 10: raw 16, two chunks.
        assert_eq!(symbol_cost(narrow, 10).bypass_bits, 12);
        // i32::MIN: raw 2^32 - 3, eight chunks.
        assert_eq!(symbol_cost(narrow, i32::MIN).bypass_bits, 36);
        // The costs are what the encoder writes: 100 copies of a symbol make
        // the string longer than 100 copies of another by 100 times the
        // difference of their costs, within the coder's flush.
        let string_bits = |symbol: i32| {
            let symbols = vec![symbol; 100];
            8.0 * encode_with_indexes(&symbols, &vec![0; 100], &tables).unwrap().len() as f64
        };
        for symbol in [-2, 1, 2, 10, 1 << 20, -(1 << 27), i32::MAX] {
            let extra = string_bits(symbol) - string_bits(-1);
            let expected = 100.0 * (symbol_cost(narrow, symbol).bits() - symbol_cost(narrow, -1).bits());
            assert!((extra - expected).abs() <= 64.0, "{symbol}: {extra} vs {expected}");
        }
    }

    #[test]
    fn wrong_indexes_are_refused() {
        let tables = tables();
        let err = encode_with_indexes(&[1, 2], &[0, 2], &tables).unwrap_err();
        assert_eq!(
            err,
            CodecError::IndexOutOfRange {
                position: 1,
                index: 2,
                rows: 2
            }
        );
        assert!(encode_with_indexes(&[1, 2], &[0], &tables).is_err());
        let bytes = encode_with_indexes(&[1, 2], &[0, 1], &tables).unwrap();
        assert!(decode_with_indexes(&bytes, &[0, 9], &tables).is_err());
    }

    #[test]
    fn extra_or_missing_symbols_are_detected() {
        let tables = tables();
        let symbols: Vec<i32> = (0..500).map(|i| (i * 37 % 11) - 5).collect();
        let indexes = vec![1; symbols.len()];
        let bytes = encode_with_indexes(&symbols, &indexes, &tables).unwrap();
        // Asking for fewer symbols than were coded leaves state and words unconsumed.
        assert!(decode_with_indexes(&bytes, &indexes[..400], &tables).is_err());
        // Asking for more runs off the end of the string or leaves the valid state space.
        let more = vec![1; 600];
        assert!(decode_with_indexes(&bytes, &more, &tables).is_err());
    }
}
