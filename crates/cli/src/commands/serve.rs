//! `frankensplit serve`: the HTTP inference server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use frankensplit_serve::{shutdown_signal, start, tls_config, ServeConfig, Tokens};

use super::placement::Placement;

#[derive(Args)]
pub struct ServeArgs {
    /// Model bundle directory.
    #[arg(long, value_parser = crate::builtin::parse_model)]
    model: PathBuf,
    #[command(flatten)]
    placement: Placement,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Largest inference batch.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Milliseconds to wait for more requests once one is queued.
    #[arg(long, default_value_t = 5)]
    batch_wait_ms: u64,
    /// Inputs (payloads or images) admitted and not yet answered; a request
    /// is admitted whole or gets 503 + Retry-After (413 if it alone frames more).
    #[arg(long, default_value_t = ServeConfig::default().queue_capacity)]
    queue: usize,
    /// Bytes admitted requests may hold at once (bodies, decoded images and
    /// every intermediate of the input pipeline, latents), reserved before
    /// decoding; beyond, 503 + Retry-After.
    #[arg(long, default_value_t = ServeConfig::default().max_inflight_bytes, value_name = "BYTES")]
    max_inflight_bytes: u64,
    /// Largest request body in bytes; beyond, 413.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Milliseconds a request may spend in the server; beyond, 504.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Classes per answer.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Largest image /v1/classify-image takes, in pixels: the decoded image
    /// and every image the resize makes of it (checked from the header,
    /// before decoding); beyond, 413.
    #[arg(long, default_value_t = ServeConfig::default().max_image_pixels)]
    max_image_pixels: u64,
    /// Require `Authorization: Bearer <token>` on the API and /metrics, the
    /// tokens one per line in this file (/healthz and /openapi.json stay open).
    #[arg(long, value_name = "FILE")]
    auth_token_file: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let bundle = args.placement.open(&args.model)?;
    let placement = args.placement.describe();
    let model = bundle.fingerprint;
    let endpoints = if bundle.backbone_head.is_some() {
        "POST payloads to /v1/classify, images to /v1/classify-image"
    } else {
        "POST payloads to /v1/classify"
    };
    let tokens = args
        .auth_token_file
        .as_deref()
        .map(Tokens::from_file)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_config(cert, key).map_err(anyhow::Error::msg)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let access = if tokens.is_some() {
        "; bearer token required"
    } else {
        ""
    };
    let config = ServeConfig {
        max_batch: args.max_batch,
        batch_wait: Duration::from_millis(args.batch_wait_ms),
        queue_capacity: args.queue,
        max_inflight_bytes: args.max_inflight_bytes,
        max_body_bytes: args.max_body_bytes,
        request_timeout: Duration::from_millis(args.timeout_ms),
        top_k: args.top_k,
        max_image_pixels: args.max_image_pixels,
        tokens,
        tls,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let server = start(bundle, args.listen, config, shutdown_signal())
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        eprintln!(
            "serving model {model} ({placement}) on {scheme}://{} ({endpoints}{access}; Ctrl-C stops after the requests in flight)",
            server.addr
        );
        server.done.await.context("server task failed")??;
        eprintln!("stopped");
        Ok(())
    })
}
