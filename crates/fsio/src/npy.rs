//! NumPy `.npy` arrays (format 1.0, little-endian, C order), written like
//! every other file here: to a sibling, flushed, renamed over the target.

use std::io;
use std::path::Path;

/// An element type `.npy` can hold, with its NumPy `descr`.
pub trait Element: Copy {
    /// NumPy's type string (`'<i4'`, `'<f4'`).
    const DESCR: &'static str;
    /// Appends the value's little-endian bytes.
    fn put(self, out: &mut Vec<u8>);
}

impl Element for i32 {
    const DESCR: &'static str = "<i4";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl Element for f32 {
    const DESCR: &'static str = "<f4";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// The bytes of a `.npy` file holding `values` as an array of `shape`
/// (C order). Fails if the shape does not hold exactly `values.len()` values.
pub fn to_bytes<T: Element>(shape: &[usize], values: &[T]) -> io::Result<Vec<u8>> {
    let count = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if count != Some(values.len()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("an array of shape {shape:?} does not hold {} values", values.len()),
        ));
    }
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_text}, }}",
        T::DESCR
    );
    // Magic (6) + version (2) + length (2) + header + '\n', padded with
    // spaces to a multiple of 64 bytes as NumPy writes it.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let header_len = u16::try_from(header.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the array's shape is too long for .npy 1.0",
        )
    })?;
    let mut out = Vec::with_capacity(10 + header.len() + values.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for &v in values {
        v.put(&mut out);
    }
    Ok(out)
}

/// Writes `values` as a `.npy` array of `shape` to `path`, atomically (see
/// [`crate::write_file`]).
pub fn write<T: Element>(path: &Path, shape: &[usize], values: &[T]) -> io::Result<()> {
    crate::write_file(path, &to_bytes(shape, values)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_numpys_and_the_data_follows_aligned() {
        let bytes = to_bytes(&[2, 1, 3], &[1i32, -2, 3, 4, 5, i32::MIN]).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert_eq!(
            header.trim_end(),
            "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 1, 3), }"
        );
        assert!(header.ends_with('\n'));
        let data = &bytes[10 + header_len..];
        assert_eq!(data.len(), 24);
        assert_eq!(&data[4..8], &(-2i32).to_le_bytes());
        assert_eq!(&data[20..], &[0, 0, 0, 0x80]);
    }

    #[test]
    fn one_dimension_is_a_one_tuple_and_floats_say_f4() {
        let bytes = to_bytes(&[2], &[0.5f32, -1.0]).unwrap();
        let text = String::from_utf8_lossy(&bytes[10..]);
        assert!(
            text.contains("'descr': '<f4'") && text.contains("'shape': (2,)"),
            "{text}"
        );
    }

    #[test]
    fn a_shape_that_does_not_fit_the_values_is_refused() {
        assert!(to_bytes(&[2, 2], &[1i32, 2, 3]).is_err());
        assert!(to_bytes(&[usize::MAX, 3], &[1i32]).is_err());
    }

    #[test]
    fn written_files_hold_the_bytes() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("a.npy");
        write(&path, &[3], &[7i32, 8, 9]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), to_bytes(&[3], &[7i32, 8, 9]).unwrap());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }
}
