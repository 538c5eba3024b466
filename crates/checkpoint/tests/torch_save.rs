//! Reads a real `torch.save` checkpoint (written by
//! `tools/fixtures/gen_model_fixtures.py` with torch 2.11) in the torchdistill
//! layout the FrankenSplit reference saves.

use std::io::Cursor;
use std::path::PathBuf;

use frankensplit_checkpoint::{Checkpoint, DType, Error, Value};

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/reference_checkpoint.pt")
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn torchdistill_checkpoint_yields_the_state_dict() {
    let ckpt = Checkpoint::open(&fixture_path()).unwrap();
    let tensors = ckpt.tensors_under(&["model"]).unwrap();
    let find = |name: &str| {
        tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let conv = find("compression_module.g_a.rb1.conv1.weight");
    assert_eq!(
        (conv.dtype, conv.shape.as_slice()),
        (DType::F32, &[8usize, 3, 3, 3][..])
    );
    assert_eq!(conv.data.len(), 8 * 27 * 4);
    let index = find("backbone.layers.2.blocks.0.attn.relative_position_index");
    assert_eq!(index.dtype, DType::I64);
    let offset = find("compression_module.entropy_bottleneck._offset");
    assert_eq!(
        (offset.dtype, offset.shape.as_slice(), offset.data.len()),
        (DType::I32, &[0usize][..], 0)
    );
    // The duplicated reconstruction layer holds the same values.
    assert_eq!(
        find("reconstruction_layer.norm.weight").data,
        find("compression_module.g_s.final_layer.norm.weight").data
    );
    // Everything but tensors is kept inert.
    assert!(matches!(ckpt.root().get("args"), Some(Value::Object(..))));
    assert_eq!(ckpt.root().get("best_value"), Some(&Value::Float(0.25)));
}

#[test]
fn strided_offset_and_half_views_are_materialised_in_c_order() {
    let ckpt = Checkpoint::open(&fixture_path()).unwrap();
    let views = ckpt.tensors_under(&["views"]).unwrap();
    let transposed = views.iter().find(|t| t.name == "transposed").unwrap();
    assert_eq!(transposed.shape, [4, 3]);
    assert_eq!(
        f32s(&transposed.data),
        [0.0, 4.0, 8.0, 1.0, 5.0, 9.0, 2.0, 6.0, 10.0, 3.0, 7.0, 11.0]
    );
    let offset = views.iter().find(|t| t.name == "offset").unwrap();
    let values: Vec<i64> = offset
        .data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values, [3, 4, 5, 6]);
    let half = views.iter().find(|t| t.name == "half").unwrap();
    assert_eq!(
        (half.dtype, half.data.as_slice()),
        (DType::F16, &[0x00, 0x3E, 0x80, 0xC0][..])
    );
}

#[test]
fn damaged_files_give_errors() {
    let bytes = std::fs::read(fixture_path()).unwrap();
    assert!(matches!(
        Checkpoint::from_reader(Cursor::new(&bytes[..1000])),
        Err(Error::Zip(_))
    ));
    assert!(matches!(
        Checkpoint::from_reader(Cursor::new(b"not a zip file".to_vec())),
        Err(Error::Zip(_))
    ));
    let ckpt = Checkpoint::from_reader(Cursor::new(bytes)).unwrap();
    let err = ckpt.tensors_under(&["state_dict"]).unwrap_err();
    assert!(err.to_string().contains("state_dict"), "{err}");
    assert!(Checkpoint::open("/nonexistent/file.pt".as_ref()).is_err());
}
