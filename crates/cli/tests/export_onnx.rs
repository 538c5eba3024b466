//! `frankensplit export-onnx` on the built-in demo model: each part is
//! written as an ONNX model whose graph has the part's named input and
//! output, and `--check-data` writes the tch model's tensors under the same
//! names (the graphs themselves are checked in `models/tests/onnx.rs`).

use std::process::Command;

use frankensplit_models::onnx::proto::ModelProto;
use frankensplit_models::onnx::Part;
use prost::Message;

#[test]
fn every_part_exports_with_its_named_input_and_output() {
    let dir = std::env::temp_dir().join(format!("frankensplit-export-onnx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (flag, part) in [
        ("encoder", Part::Encoder),
        ("decoder", Part::Decoder),
        ("tail", Part::Tail),
    ] {
        let (onnx, data) = (
            dir.join(format!("{flag}.onnx")),
            dir.join(format!("{flag}.safetensors")),
        );
        let out = Command::new(env!("CARGO_BIN_EXE_frankensplit"))
            .args(["export-onnx", "--model", "demo", "--part", flag, "-o"])
            .arg(&onnx)
            .arg("--check-data")
            .arg(&data)
            .env("FRANKENSPLIT_CACHE", dir.join("cache"))
            .output()
            .expect("frankensplit runs");
        assert!(out.status.success(), "{flag}: {}", String::from_utf8_lossy(&out.stderr));
        let model = ModelProto::decode(std::fs::read(&onnx).unwrap().as_slice()).unwrap();
        let graph = model.graph.expect("a graph");
        let (input, output) = part.io();
        assert_eq!(
            graph.input.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            [input],
            "{flag}"
        );
        assert_eq!(
            graph.output.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            [output],
            "{flag}"
        );
        assert!(!graph.node.is_empty(), "{flag}");
        let bytes = std::fs::read(&data).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for name in [input, output] {
            assert!(tensors.tensor(name).is_ok(), "{flag}: check data lacks {name}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
