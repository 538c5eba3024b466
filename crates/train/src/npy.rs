//! NumPy `.npy` files of `float32`/`float64` arrays, the reference's format
//! for saliency maps (one `.npy` per image).

use std::path::Path;

use crate::{Error, Result};

/// Reads a little-endian `f4`/`f8` C-order array: `(shape, values as f32)`.
pub fn read(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    parse(&bytes).map_err(|why| Error::Data(format!("{}: not a float .npy array: {why}", path.display())))
}

fn parse(bytes: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("missing the NUMPY magic".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("format version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated header")?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}':"))? + key.len() + 3;
        Some(header[at..].trim_start())
    };
    let descr = field("descr").ok_or("no descr")?;
    let width = if descr.starts_with("'<f4'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        return Err(format!("dtype {}", descr.split(',').next().unwrap_or("?")));
    };
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err("Fortran order".into());
    }
    let shape_text = field("shape").ok_or("no shape")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("bad shape")?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!("bad shape {shape_text}")))
        .collect::<std::result::Result<_, _>>()?;
    let count: usize = shape.iter().product();
    let data = &bytes[start + header_len..];
    if data.len() != count * width {
        return Err(format!("{} data bytes for {count} values", data.len()));
    }
    let values = if width == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect()
    };
    Ok((shape, values))
}

/// Writes a `float32` array (format 1.0), atomically.
pub fn write(path: &Path, shape: &[usize], values: &[f32]) -> Result<()> {
    assert_eq!(
        shape.iter().product::<usize>(),
        values.len(),
        "shape and values disagree"
    );
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_text = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Pad so that the data starts on a 64-byte boundary, ending with a newline.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + values.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::Data(format!("{}: {e}", dir.display())))?;
    }
    let tmp = path.with_extension("npy.tmp");
    std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_numpy_written_files() {
        let dir = std::env::temp_dir().join(format!("frankensplit-npy-{}", std::process::id()));
        let path = dir.join("a/map.npy");
        let values: Vec<f32> = (0..12).map(|i| i as f32 / 7.0).collect();
        write(&path, &[3, 4], &values).unwrap();
        assert_eq!(read(&path).unwrap(), (vec![3, 4], values));
        // What `np.save(f, np.array([[0.5, 1.0]], dtype=np.float64))` writes.
        let mut numpy = b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2), }".to_vec();
        numpy.resize(10 + 0x76 - 1, b' ');
        numpy.push(b'\n');
        numpy.extend_from_slice(&0.5f64.to_le_bytes());
        numpy.extend_from_slice(&1.0f64.to_le_bytes());
        assert_eq!(parse(&numpy).unwrap(), (vec![1, 2], vec![0.5, 1.0]));
        assert!(parse(&numpy[..numpy.len() - 3]).is_err());
        assert!(parse(b"not numpy at all").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
