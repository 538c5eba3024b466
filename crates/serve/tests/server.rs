//! The server on a loopback port, with the small fixture model: good
//! payloads (200, same top-k as local inference), another model's payload
//! (409), truncated and random bytes (400), an oversized body or image
//! (413), a flood beyond the queue (503 with Retry-After), and it still
//! answers afterwards; 256 framed payloads admitted whole; bearer tokens
//! (401) and TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use frankensplit_models::convert::{convert, ConvertOptions};
use frankensplit_models::{Architecture, Bundle};
use frankensplit_serve::{start, ServeConfig};
use serde_json::Value;
use tch::{Device, Kind};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models")
}

/// Converts the small reference checkpoint into a bundle in a fresh
/// directory; with `whole_backbone`, adds the fixture's timm backbone so that
/// the bundle classifies images too.
fn small_bundle(name: &str, whole_backbone: bool) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("frankensplit-serve-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let backbone_weights = whole_backbone.then(|| {
        let timm: Vec<(String, tch::Tensor)> =
            tch::Tensor::read_safetensors(fixtures().join("swin_timm06.safetensors"))
                .unwrap()
                .into_iter()
                .filter_map(|(k, t)| Some((k.strip_prefix("weights.")?.to_string(), t)))
                .collect();
        let path = std::env::temp_dir().join(format!("frankensplit-serve-{}-{name}.safetensors", std::process::id()));
        tch::Tensor::write_safetensors(&timm, &path).unwrap();
        path
    });
    let arch: Architecture = toml_arch();
    let options = ConvertOptions {
        checkpoint: fixtures().join("reference_checkpoint.pt"),
        backbone_weights: backbone_weights.clone(),
        tail_only: false,
        architecture: arch,
        likelihood_formula: None,
        labels: (0..10).map(|i| format!("class-{i}")).collect(),
        checkpoint_limits: Default::default(),
        force: false,
    };
    convert(&options, &dir).unwrap();
    if let Some(path) = backbone_weights {
        let _ = std::fs::remove_file(path);
    }
    dir
}

fn toml_arch() -> Architecture {
    let text = std::fs::read_to_string(fixtures().join("small_arch.toml")).unwrap();
    Architecture::from_toml(&text).unwrap()
}

/// A deterministic "image" in the model's input range.
fn input(seed: u64, size: usize) -> Vec<f32> {
    let mut state = seed;
    (0..3 * size * size)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

async fn post(client: &reqwest::Client, addr: SocketAddr, body: Vec<u8>) -> (u16, Option<String>, Value) {
    let response = client
        .post(format!("http://{addr}/v1/classify"))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let json = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, retry, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_good_payloads_and_refuses_bad_ones() {
    let dir = small_bundle("answers", false);
    let local = Bundle::open(&dir, Device::Cpu).unwrap();
    let images: Vec<Vec<f32>> = (0..4).map(|s| input(s, 64)).collect();
    let payloads: Vec<Vec<u8>> = images.iter().map(|x| local.compress(x).unwrap()).collect();
    let expected_top: Vec<i64> = payloads
        .iter()
        .map(|p| {
            let logits = local
                .classify_features(&local.decompress(p).unwrap())
                .to_kind(Kind::Float);
            logits.argmax(-1, false).int64_value(&[0])
        })
        .collect();

    let config = ServeConfig {
        max_body_bytes: 64 << 10,
        ..ServeConfig::default()
    };
    let (server, stop) = launch(Bundle::open(&dir, Device::Cpu).unwrap(), config).await;
    let addr = server.addr;
    let client = reqwest::Client::new();

    for (payload, top) in payloads.iter().zip(&expected_top) {
        let (status, _, json) = post(&client, addr, payload.clone()).await;
        assert_eq!(status, 200, "{json}");
        assert_eq!(json["top_k"][0]["class"].as_i64().unwrap(), *top);
        assert_eq!(json["top_k"][0]["label"].as_str().unwrap(), format!("class-{top}"));
        assert_eq!(json["model"].as_str().unwrap(), local.fingerprint.to_string());
    }

    // The API description, as JSON, twice the same.
    for _ in 0..2 {
        let response = client
            .get(format!("http://{addr}{}", frankensplit_api::OPENAPI))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(response.headers()["content-type"], "application/json");
        let description: Value = response.json().await.unwrap();
        assert_eq!(description, frankensplit_api::openapi::document());
    }

    // Several payloads in one framed request answer in order, as singly.
    let mut framed = Vec::new();
    for p in &payloads[..3] {
        framed.extend_from_slice(&(p.len() as u32).to_le_bytes());
        framed.extend_from_slice(p);
    }
    let send_framed = |body: Vec<u8>| {
        client
            .post(format!("http://{addr}/v1/classify"))
            .header("content-type", frankensplit_serve::FRAMED_PAYLOADS)
            .body(body)
            .send()
    };
    let response = send_framed(framed.clone()).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let json: Value = response.json().await.unwrap();
    let classes: Vec<i64> = json["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["top_k"][0]["class"].as_i64().unwrap())
        .collect();
    assert_eq!(classes, expected_top[..3]);
    assert_eq!(
        send_framed(framed[..framed.len() - 1].to_vec())
            .await
            .unwrap()
            .status()
            .as_u16(),
        400
    );
    assert_eq!(send_framed(Vec::new()).await.unwrap().status().as_u16(), 400);

    let mut other_model = payloads[0].clone();
    other_model[1] ^= 0xFF;
    assert_eq!(post(&client, addr, other_model).await.0, 409);
    assert_eq!(
        post(&client, addr, payloads[0][..payloads[0].len() - 4].to_vec())
            .await
            .0,
        400
    );
    assert_eq!(post(&client, addr, payloads[0][..3].to_vec()).await.0, 400);
    let random: Vec<u8> = input(9, 40).iter().map(|v| v.to_bits() as u8).collect();
    let (status, _, json) = post(&client, addr, random).await;
    assert_eq!(status, 400, "{json}");
    assert!(json["error"].as_str().unwrap().contains("payload"));
    assert_eq!(post(&client, addr, vec![0xF1; 65 << 10]).await.0, 413);

    let (status, _, _) = post(&client, addr, payloads[1].clone()).await;
    assert_eq!(status, 200, "the server stopped answering after bad requests");
    let health = client.get(format!("http://{addr}/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let metrics = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("frankensplit_requests_total{endpoint=\"classify\",status=\"409\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("frankensplit_batch_size"), "{metrics}");

    stop.send(()).unwrap();
    finish(server, &dir).await;
}

/// The same classes in the same order, with logits equal up to libtorch's
/// run-to-run rounding.
fn assert_same_top_k(a: &Value, b: &Value) {
    let (a, b) = (a["top_k"].as_array().unwrap(), b["top_k"].as_array().unwrap());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x["class"], y["class"], "{a:?} vs {b:?}");
        let (lx, ly) = (x["logit"].as_f64().unwrap(), y["logit"].as_f64().unwrap());
        assert!((lx - ly).abs() < 1e-4, "{a:?} vs {b:?}");
    }
}

/// Posts `body` to /v1/classify with `content_type`.
async fn post_as(client: &reqwest::Client, addr: SocketAddr, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let response = client
        .post(format!("http://{addr}/v1/classify"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_compressai_string_answers_as_its_payload_does() {
    let dir = small_bundle("raw", false);
    let local = Bundle::open(&dir, Device::Cpu).unwrap();
    let payloads: Vec<Vec<u8>> = (0..3).map(|s| local.compress(&input(20 + s, 64)).unwrap()).collect();
    // What a PyTorch edge sends: the CompressAI string alone, no container.
    let strings: Vec<Vec<u8>> = payloads
        .iter()
        .map(|p| frankensplit_codec::Payload::parse(p).unwrap().string.to_vec())
        .collect();
    let (server, stop) = launch(Bundle::open(&dir, Device::Cpu).unwrap(), ServeConfig::default()).await;
    let addr = server.addr;
    let client = reqwest::Client::new();

    for (payload, string) in payloads.iter().zip(&strings) {
        let (status, _, container) = post(&client, addr, payload.clone()).await;
        assert_eq!(status, 200, "{container}");
        let (status, raw) = post_as(&client, addr, frankensplit_serve::RAW_STRING, string.clone()).await;
        assert_eq!(status, 200, "{raw}");
        assert_same_top_k(&raw, &container);
        assert_eq!(raw["model"], container["model"]);
        assert_eq!(raw["input_bytes"].as_u64().unwrap() as usize, string.len());
    }

    let framed = frankensplit_api::frame(&strings).unwrap();
    let (status, json) = post_as(&client, addr, frankensplit_serve::FRAMED_RAW_STRINGS, framed).await;
    assert_eq!(status, 200, "{json}");
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), strings.len());
    for (result, payload) in results.iter().zip(&payloads) {
        let (_, _, container) = post(&client, addr, payload.clone()).await;
        assert_same_top_k(result, &container);
    }

    // A truncated string, or a whole container sent as a raw string, is malformed for this shape.
    let truncated = strings[0][..strings[0].len() / 2].to_vec();
    let (status, json) = post_as(&client, addr, frankensplit_serve::RAW_STRING, truncated).await;
    assert_eq!(status, 400, "{json}");
    assert!(json["error"].as_str().unwrap().contains("CompressAI string"), "{json}");
    let mut bad_frame = frankensplit_api::frame(&strings[..2]).unwrap();
    bad_frame.truncate(bad_frame.len() - 1);
    assert_eq!(
        post_as(&client, addr, frankensplit_serve::FRAMED_RAW_STRINGS, bad_frame)
            .await
            .0,
        400
    );

    stop.send(()).unwrap();
    finish(server, &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_queue_gets_503_and_the_server_recovers() {
    let dir = small_bundle("flood", false);
    let local = Bundle::open(&dir, Device::Cpu).unwrap();
    let payload = local.compress(&input(1, 64)).unwrap();
    // One request per batch and a one-slot queue: 400 simultaneous requests
    // cannot all fit.
    let config = ServeConfig {
        max_batch: 1,
        queue_capacity: 1,
        ..ServeConfig::default()
    };
    let (server, stop) = launch(local, config).await;
    let addr = server.addr;
    let client = reqwest::Client::new();
    let flood: Vec<_> = (0..400)
        .map(|_| tokio::spawn(post_owned(client.clone(), addr, payload.clone())))
        .collect();
    let mut ok = 0;
    let mut busy = 0;
    for task in flood {
        let (status, retry, _) = task.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                busy += 1;
                assert_eq!(retry.as_deref(), Some("1"));
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(busy > 0, "no request was refused ({ok} answered)");
    assert!(ok > 0, "no request was answered");
    assert_eq!(
        post(&client, addr, payload.clone()).await.0,
        200,
        "the server did not recover"
    );
    stop.send(()).unwrap();
    finish(server, &dir).await;
}

/// A black PNG of `width × height` pixels.
fn strip_png(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::RgbImage::new(width, height)
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

/// A PNG of `side × side` pixels with a smooth pattern.
fn png(side: u32, seed: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([(x * 3 + seed) as u8, (y * 5) as u8, ((x + y) * 2 + seed * 7) as u8])
    });
    let mut bytes = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

async fn post_image(client: &reqwest::Client, addr: SocketAddr, query: &str, body: Vec<u8>) -> (u16, Value) {
    post_json(client, format!("http://{addr}/v1/classify-image{query}"), body).await
}

/// Posts `body` to `url`: the status and the JSON answer (null if none).
async fn post_json(client: &reqwest::Client, url: String, body: Vec<u8>) -> (u16, Value) {
    let response = client.post(url).body(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json::<Value>().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classifies_whole_images_when_the_bundle_has_the_whole_backbone() {
    let whole = small_bundle("images", true);
    let local = Bundle::open(&whole, Device::Cpu).unwrap();
    let preprocess = local.manifest.preprocess.clone();
    let pictures: Vec<Vec<u8>> = (0..3).map(|i| png(80 + 13 * i, i)).collect();
    let expected: Vec<i64> = pictures
        .iter()
        .map(|bytes| {
            let input = preprocess
                .apply(&frankensplit_preprocess::RgbImage::decode(bytes).unwrap())
                .unwrap();
            local
                .classify_images(&[input])
                .unwrap()
                .argmax(-1, false)
                .int64_value(&[0])
        })
        .collect();
    let config = ServeConfig {
        max_image_pixels: 200 * 200,
        ..ServeConfig::default()
    };
    let (server, stop) = launch(local, config).await;
    let addr = server.addr;
    let client = reqwest::Client::new();
    for (bytes, top) in pictures.iter().zip(&expected) {
        let (status, json) = post_image(&client, addr, "", bytes.clone()).await;
        assert_eq!(status, 200, "{json}");
        assert_eq!(json["top_k"][0]["class"].as_i64().unwrap(), *top);
        assert_eq!(json["input_bytes"].as_u64().unwrap(), bytes.len() as u64);
    }
    // An image already cropped on the device is only normalised.
    let crop = preprocess
        .resize_and_crop(&frankensplit_preprocess::RgbImage::decode(&pictures[1]).unwrap())
        .unwrap();
    let cropped_png = {
        let image = image::RgbImage::from_raw(crop.width, crop.height, crop.pixels.clone()).unwrap();
        let mut bytes = Vec::new();
        image
            .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        bytes
    };
    let (status, json) = post_image(&client, addr, "?cropped=true", cropped_png).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["top_k"][0]["class"].as_i64().unwrap(), expected[1]);

    let (status, json) = post_image(&client, addr, "?cropped=true", pictures[0].clone()).await;
    assert_eq!(status, 400);
    assert!(json["error"].as_str().unwrap().contains("cropped"), "{json}");
    let (status, json) = post_image(&client, addr, "", pictures[0][..pictures[0].len() / 2].to_vec()).await;
    assert_eq!(status, 400, "{json}");
    let (status, json) = post_image(&client, addr, "", b"GIF89a not an image".to_vec()).await;
    assert_eq!(status, 400, "{json}");
    let (status, json) = post_image(&client, addr, "", png(300, 0)).await;
    assert_eq!(status, 413, "{json}");
    assert!(json["error"].as_str().unwrap().contains("pixels"), "{json}");
    // Within the pixel limit as decoded, but Resize would make 73 × 2,920,000
    // pixels of it: refused from the header, before decoding.
    let (status, json) = post_image(&client, addr, "", strip_png(1, 40_000)).await;
    assert_eq!(status, 413, "{json}");
    let (status, json) = post_image(&client, addr, "", strip_png(40_000, 1)).await;
    assert_eq!(status, 413, "{json}");
    let (status, _) = post_image(&client, addr, "?cropped=maybe", pictures[0].clone()).await;
    assert_eq!(status, 400);
    let (status, json) = post_image(&client, addr, "", pictures[2].clone()).await;
    assert_eq!(status, 200, "the server stopped answering after bad images: {json}");
    stop.send(()).unwrap();
    finish(server, &whole).await;

    // A bundle with only the tail says what is missing.
    let tail = small_bundle("tail-only", false);
    let (server, stop) = launch(Bundle::open(&tail, Device::Cpu).unwrap(), ServeConfig::default()).await;
    let (status, json) = post_image(&client, server.addr, "", pictures[0].clone()).await;
    assert_eq!(status, 501);
    assert!(json["error"].as_str().unwrap().contains("backbone"), "{json}");
    stop.send(()).unwrap();
    finish(server, &tail).await;
}

/// The decoder and backbone in bf16 on the CPU (`serve --precision bf16`):
/// the answers' top-1 is f32's and their logits stay within bf16's rounding
/// of f32's, for payloads alone and framed (one batch), and for whole images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_on_the_cpu_answers_as_f32() {
    use frankensplit_models::Precision;

    let whole = small_bundle("bf16", true);
    let local = Bundle::open(&whole, Device::Cpu).unwrap();
    let images: Vec<Vec<f32>> = (0..8).map(|s| input(100 + s, 64)).collect();
    let payloads: Vec<Vec<u8>> = images.iter().map(|x| local.compress(x).unwrap()).collect();
    let f32_logits: Vec<Vec<f32>> = payloads
        .iter()
        .map(|p| {
            let logits = local.classify_features(&local.decompress(p).unwrap());
            assert_eq!(logits.kind(), Kind::Float);
            Vec::<f32>::try_from(logits.view([-1])).unwrap()
        })
        .collect();
    let argmax = |l: &[f32]| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as i64;

    let mut bf16 = Bundle::open(&whole, Device::Cpu).unwrap();
    bf16.set_precision(Precision::Bf16).unwrap();
    assert_eq!(bf16.precision, Precision::Bf16);
    // The networks really are in bf16 (the edge encoder stays f32).
    let logits = bf16.classify_features(&bf16.decompress(&payloads[0]).unwrap());
    assert_eq!(logits.kind(), Kind::BFloat16);
    assert_eq!(bf16.compress(&images[0]).unwrap(), payloads[0]);
    // Back to f32 is refused, not faked.
    assert!(bf16.set_precision(Precision::F32).is_err());

    let config = ServeConfig {
        top_k: 10,
        ..ServeConfig::default()
    };
    let (server, stop) = launch(bf16, config).await;
    let addr = server.addr;
    let client = reqwest::Client::new();
    // Checks one answer against f32: same top-1 and every logit within
    // 2^-5 of the logits' scale (their largest magnitude). bf16 keeps 8
    // significant bits, 2^-8 relative per rounding; through the small
    // model's layers the logits moved at most 0.014 of the scale here, and
    // f32's top-1 leads by at least 0.043 of it on these inputs, three
    // times that change: the top-1 must not flip.
    let check = |json: &Value, expected: &[f32]| {
        let scale = expected.iter().fold(0f32, |m, l| m.max(l.abs())).max(1.0);
        let top = json["top_k"].as_array().unwrap();
        assert_eq!(top.len(), expected.len());
        assert_eq!(top[0]["class"].as_i64().unwrap(), argmax(expected), "{json}");
        for p in top {
            let class = p["class"].as_u64().unwrap() as usize;
            let logit = p["logit"].as_f64().unwrap() as f32;
            assert!(
                (logit - expected[class]).abs() <= scale / 32.0,
                "class {class}: bf16 {logit}, f32 {}",
                expected[class]
            );
        }
    };
    for (payload, expected) in payloads.iter().zip(&f32_logits) {
        let (status, _, json) = post(&client, addr, payload.clone()).await;
        assert_eq!(status, 200, "{json}");
        check(&json, expected);
    }
    let mut framed = Vec::new();
    for p in &payloads {
        framed.extend_from_slice(&(p.len() as u32).to_le_bytes());
        framed.extend_from_slice(p);
    }
    let response = client
        .post(format!("http://{addr}/v1/classify"))
        .header("content-type", frankensplit_serve::FRAMED_PAYLOADS)
        .body(framed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let json = response.json::<Value>().await.unwrap();
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), payloads.len());
    for (r, expected) in results.iter().zip(&f32_logits) {
        check(r, expected);
    }
    assert!(results.iter().any(|r| r["batch_size"].as_u64().unwrap() > 1), "{json}");

    // Whole images through the bf16 backbone.
    let preprocess = local.manifest.preprocess.clone();
    for i in 0..3 {
        let bytes = png(80 + 13 * i, i);
        let input = preprocess
            .apply(&frankensplit_preprocess::RgbImage::decode(&bytes).unwrap())
            .unwrap();
        let expected = Vec::<f32>::try_from(local.classify_images(&[input]).unwrap().view([-1])).unwrap();
        let (status, json) = post_image(&client, addr, "", bytes).await;
        assert_eq!(status, 200, "{json}");
        check(&json, &expected);
    }
    stop.send(()).unwrap();
    finish(server, &whole).await;
}

/// Starts `bundle` on a loopback port; the sender stops it.
async fn launch(
    bundle: Bundle,
    config: ServeConfig,
) -> (frankensplit_serve::RunningServer, tokio::sync::oneshot::Sender<()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = start(bundle, "127.0.0.1:0".parse().unwrap(), config, async {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    (server, stop)
}

/// Waits for a stopped server to finish, then removes its bundle.
async fn finish(server: frankensplit_serve::RunningServer, dir: &std::path::Path) {
    tokio::time::timeout(Duration::from_secs(10), server.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

async fn post_owned(client: reqwest::Client, addr: SocketAddr, body: Vec<u8>) -> (u16, Option<String>, Value) {
    post(&client, addr, body).await
}

fn framed_body(payload: &[u8], count: usize) -> Vec<u8> {
    let mut body = Vec::new();
    for _ in 0..count {
        body.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        body.extend_from_slice(payload);
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_framed_request_of_256_payloads_is_admitted_whole_on_an_idle_server() {
    let dir = small_bundle("framed256", false);
    let local = Bundle::open(&dir, Device::Cpu).unwrap();
    let payload = local.compress(&input(3, 64)).unwrap();
    let (server, stop) = launch(local, ServeConfig::default()).await;
    let client = reqwest::Client::new();
    let send = |count: usize| {
        client
            .post(format!("http://{}/v1/classify", server.addr))
            .header("content-type", frankensplit_serve::FRAMED_PAYLOADS)
            .body(framed_body(&payload, count))
            .send()
    };
    let response = send(256).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["results"].as_array().unwrap().len(), 256);
    // A request framing more than the server could ever hold is told so
    // (413), not asked to retry.
    let config = ServeConfig {
        queue_capacity: 8,
        ..ServeConfig::default()
    };
    let (small, stop_small) = launch(Bundle::open(&dir, Device::Cpu).unwrap(), config).await;
    let response = client
        .post(format!("http://{}/v1/classify", small.addr))
        .header("content-type", frankensplit_serve::FRAMED_PAYLOADS)
        .body(framed_body(&payload, 9))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    assert!(response.headers().get("retry-after").is_none());
    stop_small.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), small.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    stop.send(()).unwrap();
    finish(server, &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_tls_keep_strangers_out() {
    let dir = small_bundle("access", false);
    let local = Bundle::open(&dir, Device::Cpu).unwrap();
    let payload = local.compress(&input(4, 64)).unwrap();
    let secrets = std::env::temp_dir().join(format!("frankensplit-serve-{}-secrets", std::process::id()));
    std::fs::create_dir_all(&secrets).unwrap();
    let identity = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (secrets.join("cert.pem"), secrets.join("key.pem"));
    std::fs::write(&cert, identity.cert.pem()).unwrap();
    std::fs::write(&key, identity.key_pair.serialize_pem()).unwrap();
    let token = "0123456789abcdef0123456789abcdef";
    let config = ServeConfig {
        tokens: Some(frankensplit_serve::Tokens::new([token])),
        tls: Some(frankensplit_serve::tls_config(&cert, &key).unwrap()),
        ..ServeConfig::default()
    };
    let (server, stop) = launch(local, config).await;
    let port = server.addr.port();
    let trusting = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(identity.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}");
    let classify = |auth: Option<&str>| {
        let mut request = trusting.post(format!("{url}/v1/classify")).body(payload.clone());
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(status(classify(None).await.unwrap()), 401, "no token");
    assert_eq!(
        status(classify(Some("Bearer wrong-token-wrong-token")).await.unwrap()),
        401
    );
    assert_eq!(status(classify(Some(&format!("Basic {token}"))).await.unwrap()), 401);
    assert_eq!(status(classify(Some(&format!("Bearer {token}"))).await.unwrap()), 200);
    let metrics = trusting.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(status(metrics), 401, "/metrics is protected");
    let health = trusting.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(status(health), 200, "/healthz stays open");
    // Plain HTTP to the TLS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    // A client that does not trust the certificate refuses the server.
    let untrusting = reqwest::Client::builder().use_rustls_tls().build().unwrap();
    assert!(untrusting.get(format!("{url}/healthz")).send().await.is_err());
    stop.send(()).unwrap();
    finish(server, &dir).await;
    std::fs::remove_dir_all(&secrets).unwrap();
}

/// A bundle with `first`'s edge encoder, prior and tables in front of a
/// random small ResNet and a fresh convolutional decoder for it: what a
/// `decoder` stage trains, untrained.
fn resnet_bundle_sharing_the_encoder(first: &std::path::Path, name: &str) -> PathBuf {
    use frankensplit_models::bundle::{write_bundle, BundleContents, TableSource};
    use frankensplit_models::{Backbone, BackboneConfig, Compressor, ResNetConfig};
    let dir = std::env::temp_dir().join(format!("frankensplit-serve-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let source = Bundle::open(first, Device::Cpu).unwrap();
    let mut arch = source.manifest.architecture.clone();
    arch.backbone = BackboneConfig::ResNet(ResNetConfig {
        img_size: 64,
        in_chans: 3,
        num_classes: 10,
        block: frankensplit_models::resnet::ResNetBlock::Basic,
        layers: vec![1, 1, 1, 1],
        channels: vec![8, 16, 24, 32],
        drop_path_rate: 0.0,
    });
    arch.compressor.target_dim = 16;
    tch::manual_seed(3);
    let compressor_vars = tch::nn::VarStore::new(Device::Cpu);
    let _compressor = Compressor::new(&compressor_vars.root(), &arch.compressor, arch.blueprint());
    let encoder_side = source.compressor_vars.variables();
    tch::no_grad(|| {
        for (name, mut var) in compressor_vars.variables() {
            if !name.starts_with("g_s.") {
                var.copy_(&encoder_side[&name]);
            }
        }
    });
    let backbone_vars = tch::nn::VarStore::new(Device::Cpu);
    let _tail = Backbone::new(&backbone_vars.root(), &arch.backbone, 2..4);
    let verified = frankensplit_bundle::VerifiedBundle::open(first).unwrap();
    let tables = frankensplit_bundle::tables::cdf_tables(&verified.tensors().unwrap()).unwrap();
    write_bundle(
        &dir,
        BundleContents {
            architecture: &arch,
            compressor_vars: &compressor_vars,
            backbone_vars: &backbone_vars,
            backbone_head: false,
            tables: &tables,
            likelihood_formula: source.manifest.likelihood_formula,
            table_source: TableSource::Checkpoint,
            labels: source.manifest.labels.clone(),
            source: "serve test: a random ResNet behind the small model's encoder".into(),
        },
        false,
    )
    .unwrap();
    dir
}

/// Posts one payload to /v1/classify with `query`.
async fn post_query(client: &reqwest::Client, addr: SocketAddr, query: &str, body: Vec<u8>) -> (u16, Value) {
    post_json(client, format!("http://{addr}/v1/classify{query}"), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_payload_is_classified_by_each_backbone_of_a_merged_bundle() {
    let swin = small_bundle("merge-swin", false);
    let resnet = resnet_bundle_sharing_the_encoder(&swin, "merge-resnet");
    let merged = std::env::temp_dir().join(format!("frankensplit-serve-{}-merged", std::process::id()));
    let _ = std::fs::remove_dir_all(&merged);
    let parts = [
        ("swin".to_string(), swin.clone()),
        ("resnet".to_string(), resnet.clone()),
    ];
    frankensplit_models::bundle::merge_bundles(&merged, &parts, false).unwrap();
    let singles = [
        Bundle::open(&swin, Device::Cpu).unwrap(),
        Bundle::open(&resnet, Device::Cpu).unwrap(),
    ];
    assert_eq!(singles[0].fingerprint, singles[1].fingerprint);
    let assert_same_top = |answer: &Value, (class, logit): (i64, f64)| {
        assert_eq!(answer["class"].as_i64().unwrap(), class, "{answer}");
        assert!(
            (answer["logit"].as_f64().unwrap() - logit).abs() < 1e-4,
            "{answer} vs {logit}"
        );
    };
    let payload = singles[0].compress(&input(7, 64)).unwrap();
    // The top class and its logit, which tells the backbones apart even
    // where their top classes agree.
    let local_top = |bundle: &Bundle| -> (i64, f64) {
        let logits = bundle
            .classify_features(&bundle.decompress(&payload).unwrap())
            .to_kind(Kind::Float);
        let top = logits.argmax(-1, false).int64_value(&[0]);
        (top, logits.double_value(&[0, top]))
    };
    let expected = [local_top(&singles[0]), local_top(&singles[1])];

    let (server, stop) = launch(Bundle::open(&merged, Device::Cpu).unwrap(), ServeConfig::default()).await;
    let (addr, client) = (server.addr, reqwest::Client::new());
    for (query, backbone, top) in [
        ("", "swin", expected[0]),
        ("?backbone=swin", "swin", expected[0]),
        ("?backbone=resnet", "resnet", expected[1]),
    ] {
        let (status, json) = post_query(&client, addr, query, payload.clone()).await;
        assert_eq!(status, 200, "{query}: {json}");
        assert_eq!(json["backbone"], backbone, "{query}");
        assert_same_top(&json["top_k"][0], top);
        assert!(json.get("backbones").is_none(), "{query}: {json}");
    }
    let (status, json) = post_query(&client, addr, "?backbone=all", payload.clone()).await;
    assert_eq!(status, 200, "{json}");
    let answers = json["backbones"].as_array().unwrap();
    assert_eq!(answers.len(), 2);
    for (answer, (name, top)) in answers.iter().zip([("swin", expected[0]), ("resnet", expected[1])]) {
        assert_eq!(answer["backbone"], name);
        assert_same_top(&answer["top_k"][0], top);
    }
    let (status, json) = post_query(&client, addr, "?backbone=vit", payload.clone()).await;
    assert_eq!(status, 400);
    assert!(json["error"].as_str().unwrap().contains("swin, resnet"), "{json}");
    let _ = stop.send(());
    finish(server, &merged).await;
    let _ = std::fs::remove_dir_all(&swin);
    let _ = std::fs::remove_dir_all(&resnet);
}
