//! Rans64: the byte-level range-asymmetric-numeral-system coder CompressAI uses.
//!
//! 64-bit state, renormalisation in 32-bit words, a lower bound of 2^31 and a
//! 16-bit probability precision, plus "bit" symbols of uniform probability used
//! by the escape path. This module knows words and bytes only; which symbols to
//! code and with which frequencies is decided by [`crate::coder`].
//!
//! rANS is last-in-first-out: the encoder consumes symbols in reverse so that the
//! decoder reads them forwards. The finished string is the flushed 64-bit state
//! (low word first) followed by the renormalisation words in the order the
//! decoder reads them, every word little-endian. That is CompressAI's layout on
//! every little-endian host.

use crate::error::{CodecError, Result};

/// Probability precision in bits. CompressAI fixes it at compile time.
pub const PRECISION: u32 = 16;
/// Total frequency of a quantised CDF row.
pub const PROB_SCALE: u32 = 1 << PRECISION;
/// Lower bound of the normalised state interval `[L, 2^64)`.
const RANS64_L: u64 = 1 << 31;
const PROB_MASK: u64 = (PROB_SCALE - 1) as u64;

/// Builds a Rans64 string from symbols pushed in *reverse* decoding order.
#[derive(Debug, Clone)]
pub struct RansEncoder {
    state: u64,
    /// Renormalisation words in emission order (the reverse of stream order).
    emitted: Vec<u32>,
}

impl Default for RansEncoder {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl RansEncoder {
    /// An encoder with room for about `words` renormalisation words.
    pub fn with_capacity(words: usize) -> Self {
        Self {
            state: RANS64_L,
            emitted: Vec::with_capacity(words),
        }
    }

    /// Pushes a symbol occupying `[start, start + freq)` of the 16-bit range.
    ///
    /// `freq` must be non-zero and `start + freq <= 2^16`; the CDF tables
    /// guarantee both.
    #[inline]
    pub fn put(&mut self, start: u32, freq: u32) {
        debug_assert!(freq > 0 && start + freq <= PROB_SCALE);
        let freq64 = u64::from(freq);
        let x_max = ((RANS64_L >> PRECISION) << 32) * freq64;
        let mut x = self.state;
        if x >= x_max {
            self.emitted.push(x as u32);
            x >>= 32;
        }
        self.state = ((x / freq64) << PRECISION) + (x % freq64) + u64::from(start);
    }

    /// Pushes `nbits` (at most 16) raw bits of uniform probability.
    #[inline]
    pub fn put_bits(&mut self, value: u32, nbits: u32) {
        debug_assert!(nbits <= 16 && value < (1 << nbits));
        let x_max = ((RANS64_L >> PRECISION) << 32) << (PRECISION - nbits);
        let mut x = self.state;
        if x >= x_max {
            self.emitted.push(x as u32);
            x >>= 32;
        }
        self.state = (x << nbits) | u64::from(value);
    }

    /// Flushes the state and returns the finished string.
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 * (self.emitted.len() + 2));
        out.extend_from_slice(&(self.state as u32).to_le_bytes());
        out.extend_from_slice(&((self.state >> 32) as u32).to_le_bytes());
        for word in self.emitted.iter().rev() {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out
    }
}

/// Reads symbols back from a Rans64 string, refusing anything a valid encoder
/// could not have written.
#[derive(Debug, Clone)]
pub struct RansDecoder<'a> {
    state: u64,
    words: &'a [u8],
    total_len: usize,
}

impl<'a> RansDecoder<'a> {
    /// Starts decoding `bytes`. Fails unless it is a whole number of words and
    /// holds a state a Rans64 encoder can end in.
    pub fn new(bytes: &'a [u8]) -> Result<Self> {
        if bytes.len() < 8 || !bytes.len().is_multiple_of(4) {
            return Err(CodecError::BadStreamLength { len: bytes.len() });
        }
        let lo = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let hi = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let state = u64::from(lo) | (u64::from(hi) << 32);
        if state < RANS64_L {
            return Err(CodecError::Corrupt("initial state below the rANS lower bound"));
        }
        Ok(Self {
            state,
            words: &bytes[8..],
            total_len: bytes.len(),
        })
    }

    /// The 16-bit cumulative frequency that selects the next symbol.
    #[inline]
    pub fn peek(&self) -> u32 {
        (self.state & PROB_MASK) as u32
    }

    /// Consumes the symbol at `[start, start + freq)`; `start <= peek() < start + freq`.
    #[inline]
    pub fn advance(&mut self, start: u32, freq: u32) -> Result<()> {
        let x = self.state;
        let x = u64::from(freq) * (x >> PRECISION) + (x & PROB_MASK) - u64::from(start);
        self.state = x;
        self.renormalise()
    }

    /// Reads `nbits` (at most 16) raw bits.
    #[inline]
    pub fn get_bits(&mut self, nbits: u32) -> Result<u32> {
        let value = (self.state & ((1u64 << nbits) - 1)) as u32;
        self.state >>= nbits;
        self.renormalise()?;
        Ok(value)
    }

    #[inline]
    fn renormalise(&mut self) -> Result<()> {
        if self.state < RANS64_L {
            let Some((word, rest)) = self.words.split_first_chunk::<4>() else {
                return Err(CodecError::Truncated {
                    consumed_bytes: self.total_len,
                });
            };
            self.words = rest;
            self.state = (self.state << 32) | u64::from(u32::from_le_bytes(*word));
            if self.state < RANS64_L {
                return Err(CodecError::Corrupt(
                    "state below the rANS lower bound after renormalisation",
                ));
            }
        }
        Ok(())
    }

    /// Checks that the whole string was consumed and that the state is back at
    /// the encoder's initial value, as it is after every valid string.
    pub fn finish(self) -> Result<()> {
        if !self.words.is_empty() {
            return Err(CodecError::TrailingData {
                trailing_bytes: self.words.len(),
            });
        }
        if self.state != RANS64_L {
            return Err(CodecError::Corrupt(
                "final state differs from the encoder's initial state",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_message_is_the_flushed_initial_state() {
        let bytes = RansEncoder::default().finish();
        assert_eq!(bytes, [0, 0, 0, 0x80, 0, 0, 0, 0]);
        RansDecoder::new(&bytes).unwrap().finish().unwrap();
    }

    #[test]
    fn symbols_and_bits_round_trip_in_lifo_order() {
        // (start, freq) pairs spanning tiny and large frequencies, interleaved with raw bits.
        let symbols: Vec<(u32, u32)> = (0..5000u32)
            .map(|i| {
                let freq = 1 + (i.wrapping_mul(2654435761) >> 17) % 4000;
                let start = (i * 7919) % (PROB_SCALE - freq);
                (start, freq)
            })
            .collect();
        let mut enc = RansEncoder::default();
        for (i, &(start, freq)) in symbols.iter().enumerate().rev() {
            enc.put_bits((i % 16) as u32, 4);
            enc.put(start, freq);
        }
        let bytes = enc.finish();
        let mut dec = RansDecoder::new(&bytes).unwrap();
        for (i, &(start, freq)) in symbols.iter().enumerate() {
            let cum = dec.peek();
            assert!(cum >= start && cum < start + freq, "symbol {i}");
            dec.advance(start, freq).unwrap();
            assert_eq!(dec.get_bits(4).unwrap(), (i % 16) as u32);
        }
        dec.finish().unwrap();
    }

    #[test]
    fn truncation_and_bad_lengths_are_errors() {
        let mut enc = RansEncoder::default();
        for _ in 0..200 {
            enc.put(100, 3);
        }
        let bytes = enc.finish();
        assert!(bytes.len() > 16);
        assert_eq!(
            RansDecoder::new(&bytes[..7]).unwrap_err(),
            CodecError::BadStreamLength { len: 7 }
        );
        let mut dec = RansDecoder::new(&bytes[..bytes.len() - 4]).unwrap();
        let err = (0..200).try_for_each(|_| dec.advance(100, 3)).unwrap_err();
        assert!(matches!(err, CodecError::Truncated { .. }), "{err:?}");
    }
}
