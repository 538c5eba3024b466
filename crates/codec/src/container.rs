//! The FrankenSplit payload: one compressed latent with just enough framing
//! for a server to refuse what it cannot decode. Layout (see `docs/format.md`):
//!
//! | bytes | field |
//! |---|---|
//! | 1 | `0xF0 | version` (magic nibble `F`, format version 1) |
//! | 4 | model fingerprint, little-endian |
//! | 1–5 each | channels, height, width as unsigned LEB128 |
//! | rest | the CompressAI rANS string |
//!
//! For FrankenSplit's 48×28×28 latent the header is 8 bytes.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{CodecError, Result};
use crate::LatentShape;

/// Version written by this build.
pub const FORMAT_VERSION: u8 = 1;
const MAGIC: u8 = 0xF0;
const MAX_VARINT_BYTES: usize = 5;

/// Identifies the model (weights and tables) a payload was encoded for. The
/// first four bytes of a SHA-256 over whatever defines the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelFingerprint(pub u32);

impl ModelFingerprint {
    /// Fingerprint of the concatenation of `parts`.
    pub fn of_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        let digest = hasher.finalize();
        Self(u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]))
    }
}

impl fmt::Display for ModelFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// A parsed (or to-be-written) payload; `string` borrows the rANS bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload<'a> {
    /// Model the latent was encoded with.
    pub fingerprint: ModelFingerprint,
    /// Latent shape, needed to decode the string.
    pub shape: LatentShape,
    /// CompressAI rANS string.
    pub string: &'a [u8],
}

impl<'a> Payload<'a> {
    /// Serialises the payload.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.header_len() + self.string.len());
        out.push(MAGIC | FORMAT_VERSION);
        out.extend_from_slice(&self.fingerprint.0.to_le_bytes());
        for dim in [self.shape.channels, self.shape.height, self.shape.width] {
            write_varint(&mut out, dim);
        }
        out.extend_from_slice(self.string);
        out
    }

    /// Bytes of framing before the string.
    pub fn header_len(&self) -> usize {
        5 + [self.shape.channels, self.shape.height, self.shape.width]
            .iter()
            .map(|&d| varint_len(d))
            .sum::<usize>()
    }

    /// Parses a payload, checking the header and the string's word structure.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let (&first, rest) = bytes.split_first().ok_or(CodecError::BadHeader("empty payload"))?;
        if first & 0xF0 != MAGIC {
            return Err(CodecError::BadMagic { found: first });
        }
        let version = first & 0x0F;
        if version != FORMAT_VERSION {
            return Err(CodecError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let (fingerprint, mut rest) = rest
            .split_first_chunk::<4>()
            .ok_or(CodecError::BadHeader("payload ends inside the model fingerprint"))?;
        let mut dims = [0u32; 3];
        for dim in &mut dims {
            let (value, used) = read_varint(rest)?;
            if value == 0 {
                return Err(CodecError::BadHeader("latent dimension is zero"));
            }
            *dim = value;
            rest = &rest[used..];
        }
        if rest.len() < 8 || rest.len() % 4 != 0 {
            return Err(CodecError::BadStreamLength { len: rest.len() });
        }
        Ok(Self {
            fingerprint: ModelFingerprint(u32::from_le_bytes(*fingerprint)),
            shape: LatentShape::new(dims[0], dims[1], dims[2]),
            string: rest,
        })
    }

    /// Parses a payload and refuses it unless it was made for `expected`.
    pub fn parse_for(bytes: &'a [u8], expected: ModelFingerprint) -> Result<Self> {
        let payload = Self::parse(bytes)?;
        if payload.fingerprint != expected {
            return Err(CodecError::FingerprintMismatch {
                expected: expected.to_string(),
                found: payload.fingerprint.to_string(),
            });
        }
        Ok(payload)
    }
}

fn varint_len(value: u32) -> usize {
    (32 - value.leading_zeros()).div_ceil(7).max(1) as usize
}

fn write_varint(out: &mut Vec<u8>, mut value: u32) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7F) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads a canonical LEB128 `u32`: no value over `u32::MAX`, no redundant zero bytes.
fn read_varint(bytes: &[u8]) -> Result<(u32, usize)> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().take(MAX_VARINT_BYTES).enumerate() {
        value |= u64::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(CodecError::BadHeader("latent dimension has a non-canonical encoding"));
            }
            return u32::try_from(value)
                .map(|v| (v, i + 1))
                .map_err(|_| CodecError::BadHeader("latent dimension exceeds 32 bits"));
        }
    }
    Err(CodecError::BadHeader("payload ends inside a latent dimension"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(shape: LatentShape, string: &[u8]) -> Payload<'_> {
        Payload {
            fingerprint: ModelFingerprint(0xDEADBEEF),
            shape,
            string,
        }
    }

    #[test]
    fn frankensplit_latent_costs_eight_bytes_of_framing() {
        let string = [7u8; 12];
        let p = payload(LatentShape::new(48, 28, 28), &string);
        let bytes = p.to_bytes();
        assert_eq!(bytes.len() - string.len(), 8);
        assert_eq!(p.header_len(), 8);
        assert_eq!(Payload::parse(&bytes).unwrap(), p);
    }

    #[test]
    fn large_dimensions_round_trip() {
        let string = [1u8; 8];
        for shape in [LatentShape::new(1, 127, 128), LatentShape::new(u32::MAX, 16384, 300)] {
            let p = payload(shape, &string);
            let bytes = p.to_bytes();
            assert_eq!(bytes.len(), p.header_len() + 8);
            assert_eq!(Payload::parse(&bytes).unwrap(), p);
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        let string = [1u8; 8];
        let good = payload(LatentShape::new(48, 28, 28), &string).to_bytes();
        assert!(matches!(Payload::parse(&[]), Err(CodecError::BadHeader(_))));
        assert!(matches!(
            Payload::parse(&[0x12; 20]),
            Err(CodecError::BadMagic { found: 0x12 })
        ));
        assert!(matches!(
            Payload::parse(&[0xF2; 20]),
            Err(CodecError::UnsupportedVersion { found: 2, .. })
        ));
        for cut in 1..good.len() {
            assert!(Payload::parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut zero_dim = good.clone();
        zero_dim[5] = 0;
        assert!(Payload::parse(&zero_dim).is_err());
        let mut non_canonical = good[..5].to_vec();
        non_canonical.extend_from_slice(&[0xB0, 0x00, 28, 28]);
        non_canonical.extend_from_slice(&string);
        assert!(Payload::parse(&non_canonical).is_err());
        let mut too_big = good[..5].to_vec();
        too_big.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 28, 28]);
        too_big.extend_from_slice(&string);
        assert!(Payload::parse(&too_big).is_err());
    }

    #[test]
    fn another_models_payload_is_refused() {
        let string = [1u8; 8];
        let bytes = payload(LatentShape::new(48, 28, 28), &string).to_bytes();
        assert!(Payload::parse_for(&bytes, ModelFingerprint(0xDEADBEEF)).is_ok());
        let err = Payload::parse_for(&bytes, ModelFingerprint(1)).unwrap_err();
        assert!(matches!(err, CodecError::FingerprintMismatch { .. }), "{err}");
    }

    #[test]
    fn fingerprints_depend_on_part_boundaries() {
        let a = ModelFingerprint::of_parts([b"ab".as_slice(), b"c".as_slice()]);
        let b = ModelFingerprint::of_parts([b"a".as_slice(), b"bc".as_slice()]);
        assert_ne!(a, b);
        assert_eq!(a, ModelFingerprint::of_parts([b"ab".as_slice(), b"c".as_slice()]));
    }
}
