//! Checkpoints made to exhaust memory: each must be refused with an error
//! after allocating no more than the file's real contents justify.

use std::io::{Cursor, Write};

use frankensplit_checkpoint::{unpickle, Checkpoint, Limits};
use zip::write::SimpleFileOptions;

/// Pickle opcodes for `{"w": torch._utils._rebuild_tensor_v2(storage, 0,
/// shape, stride, False, {})}` whose storage is `data/0`, a `FloatStorage`
/// declaring `storage_elements` elements.
fn tensor_pickle(storage_elements: u64, shape: &[u64], stride: &[u64]) -> Vec<u8> {
    fn text(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn int(out: &mut Vec<u8>, v: u64) {
        // LONG1: eight bytes of little-endian two's complement (v < 2^63).
        out.extend_from_slice(&[0x8a, 8]);
        out.extend_from_slice(&v.to_le_bytes());
    }
    let mut p = vec![0x80, 2, b'}'];
    text(&mut p, "w");
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    p.push(b'(');
    text(&mut p, "storage");
    p.extend_from_slice(b"ctorch\nFloatStorage\n");
    text(&mut p, "0");
    text(&mut p, "cpu");
    int(&mut p, storage_elements);
    p.extend_from_slice(b"tQ");
    int(&mut p, 0);
    for dims in [shape, stride] {
        p.push(b'(');
        for &d in dims {
            int(&mut p, d);
        }
        p.push(b't');
    }
    p.extend_from_slice(&[0x89, b'}', b't', b'R', b's', b'.']);
    p
}

fn archive(pickle: &[u8], storage: &[u8], deflate: bool) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(pickle).unwrap();
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    zip.start_file(
        "archive/data/0",
        SimpleFileOptions::default().compression_method(method),
    )
    .unwrap();
    zip.write_all(storage).unwrap();
    zip.finish().unwrap().into_inner()
}

fn floats(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

#[test]
fn a_well_formed_archive_of_this_builder_reads() {
    // The builder itself is right: the same layout with honest sizes loads.
    let file = archive(&tensor_pickle(4, &[2, 2], &[2, 1]), &floats(4), true);
    let ckpt = Checkpoint::from_reader(Cursor::new(file)).unwrap();
    let tensors = ckpt.tensors_under(&[]).unwrap();
    assert_eq!(
        (tensors[0].name.as_str(), tensors[0].shape.as_slice()),
        ("w", &[2usize, 2][..])
    );
    assert_eq!(tensors[0].data, floats(4));
}

#[test]
fn dup_and_append_cannot_double_a_list_without_bound() {
    // `]` then 60 × (DUP, APPEND): each step appends the list to a copy of
    // itself, doubling the node count: 2^60 nodes if copies were free.
    let mut p = vec![0x80, 2, b']', b'K', 1, b'a'];
    for _ in 0..60 {
        p.extend_from_slice(b"2a");
    }
    p.push(b'.');
    let err = unpickle(&p).unwrap_err();
    assert!(err.to_string().contains("copied too often"), "{err}");
}

#[test]
fn a_view_larger_than_its_storage_is_refused_before_allocating() {
    // 2^40 elements (4 TiB of f32) declared over a 16-byte storage, with
    // stride 0 so that the last index stays inside it.
    let file = archive(&tensor_pickle(4, &[1 << 40], &[0]), &floats(4), false);
    let ckpt = Checkpoint::from_reader(Cursor::new(file)).unwrap();
    let err = ckpt.tensors_under(&[]).unwrap_err();
    assert!(err.to_string().contains("over a storage of 4 elements"), "{err}");
    // Contiguous: the view runs past the storage's end.
    let file = archive(&tensor_pickle(4, &[1 << 40], &[1]), &floats(4), false);
    let err = Checkpoint::from_reader(Cursor::new(file))
        .unwrap()
        .tensors_under(&[])
        .unwrap_err();
    assert!(err.to_string().contains("storage of 4 elements"), "{err}");
}

#[test]
fn a_storage_member_is_read_only_up_to_its_declared_size() {
    // The pickle declares 4 elements (16 bytes); the member inflates to
    // 64 MiB. Only 16 bytes may be read.
    let mut big = floats(4);
    big.resize(64 << 20, 0);
    let file = archive(&tensor_pickle(4, &[4], &[1]), &big, true);
    assert!(file.len() < 1 << 20, "the member compresses well: {} bytes", file.len());
    let limits = Limits { max_data_bytes: 1024 };
    let ckpt = Checkpoint::from_reader_with(Cursor::new(file), limits).unwrap();
    let tensors = ckpt.tensors_under(&[]).unwrap();
    assert_eq!(tensors[0].data, floats(4));
}

#[test]
fn declared_sizes_over_the_limit_or_over_the_member_are_refused() {
    let file = archive(&tensor_pickle(1 << 20, &[4], &[1]), &floats(1 << 20), true);
    let limits = Limits {
        max_data_bytes: 1 << 20,
    };
    let err = Checkpoint::from_reader_with(Cursor::new(file), limits).unwrap_err();
    assert!(err.to_string().contains("more than 1048576 bytes"), "{err}");
    // The pickle says 2^50 elements, the member holds 16 bytes.
    let file = archive(&tensor_pickle(1 << 50, &[4], &[1]), &floats(4), true);
    let err = Checkpoint::from_reader(Cursor::new(file)).unwrap_err();
    assert!(err.to_string().contains("declare"), "{err}");
}

#[test]
fn tied_tensors_count_against_the_build_budget() {
    // Two names on one 1 KiB storage: 2 KiB to build, over a 1.5 KiB limit
    // that the storage alone fits.
    let one = tensor_pickle(256, &[256], &[1]);
    // Insert a second SETITEM of the same tensor by memo: MEMOIZE the
    // tensor after REDUCE, then `X "v"`, GET, SETITEM.
    let mut two = one[..one.len() - 2].to_vec();
    two.extend_from_slice(&[0x94]);
    two.push(b's');
    two.push(b'X');
    two.extend_from_slice(&1u32.to_le_bytes());
    two.push(b'v');
    two.extend_from_slice(&[b'h', 0, b's', b'.']);
    let file = archive(&two, &floats(256), false);
    let limits = Limits { max_data_bytes: 1536 };
    let ckpt = Checkpoint::from_reader_with(Cursor::new(file), limits).unwrap();
    let err = ckpt.tensors_under(&[]).unwrap_err();
    assert!(err.to_string().contains("in all"), "{err}");
    let ckpt = Checkpoint::from_reader(Cursor::new(archive(&two, &floats(256), false))).unwrap();
    assert_eq!(ckpt.tensors_under(&[]).unwrap().len(), 2);
}

#[test]
fn the_fuzz_seed_checkpoints_reach_tensor_materialisation() {
    // fuzz/seeds/checkpoint holds torch.save-layout archives made by
    // tools/fixtures/gen_fuzz_seeds.py: each must load, so that fuzzing from
    // them starts inside the tensor-building code.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/checkpoint");
    let mut loaded = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let ckpt = Checkpoint::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let under = if ckpt.root().get("model").is_some() {
            vec!["model"]
        } else {
            vec![]
        };
        let tensors = ckpt
            .tensors_under(&under)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(tensors.iter().all(|t| !t.data.is_empty()), "{}", path.display());
        loaded += 1;
    }
    assert!(loaded >= 3, "{loaded} seeds");
    let views = Checkpoint::open(&dir.join("views.pt")).unwrap();
    let tensors = views.tensors_under(&["model"]).unwrap();
    let transposed = tensors.iter().find(|t| t.name == "transposed").unwrap();
    // The 3 × 4 matrix 0..12 read through its transpose, in C order.
    let expected: Vec<u8> = [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
        .iter()
        .flat_map(|&v| (v as f32).to_le_bytes())
        .collect();
    assert_eq!(transposed.data, expected);
}
