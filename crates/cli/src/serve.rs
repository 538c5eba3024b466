//! `frankensplit serve`: the HTTP inference server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use frankensplit_models::Bundle;
use frankensplit_serve::{shutdown_signal, start, ServeConfig};
use tch::Device;

#[derive(Args)]
pub struct ServeArgs {
    /// Model bundle directory.
    #[arg(long, value_parser = crate::builtin::parse_model)]
    model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Largest inference batch.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Milliseconds to wait for more requests once one is queued.
    #[arg(long, default_value_t = 5)]
    batch_wait_ms: u64,
    /// Decoded requests that may wait for inference; beyond, 503 + Retry-After.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Largest request body in bytes; beyond, 413.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Milliseconds a request may spend in the server; beyond, 504.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Classes per answer.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Largest image /v1/classify-image decodes, in pixels; beyond, 400.
    #[arg(long, default_value_t = 4096 * 4096)]
    max_image_pixels: u64,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let bundle = Bundle::open(&args.model, Device::Cpu)
        .with_context(|| format!("cannot load model {}", args.model.display()))?;
    let model = bundle.fingerprint;
    let endpoints = if bundle.backbone_head.is_some() {
        "POST payloads to /v1/classify, images to /v1/classify-image"
    } else {
        "POST payloads to /v1/classify"
    };
    let config = ServeConfig {
        max_batch: args.max_batch,
        batch_wait: Duration::from_millis(args.batch_wait_ms),
        queue_capacity: args.queue,
        max_body_bytes: args.max_body_bytes,
        request_timeout: Duration::from_millis(args.timeout_ms),
        top_k: args.top_k,
        max_image_pixels: args.max_image_pixels,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let server = start(bundle, args.listen, config, shutdown_signal())
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        eprintln!(
            "serving model {model} on http://{} ({endpoints}; Ctrl-C stops after the requests in flight)",
            server.addr
        );
        server.done.await.context("server task failed")??;
        eprintln!("stopped");
        Ok(())
    })
}
