//! The FrankenSplit inference server. Edge devices POST payloads (the
//! container of `docs/format.md`); the server entropy-decodes them on the
//! blocking pool, a single inference thread runs the decoder and the backbone
//! tail on dynamically formed batches (on the bundle's device, CPU or GPU, in
//! its precision: see `Bundle::set_precision`), and the answer is the top classes with
//! server-side timings. Bundles that hold the whole backbone also classify
//! whole images (`/v1/classify-image`), the offloading baseline.
//!
//! Back-pressure is explicit: a request is admitted whole or refused
//! before any work (503 with `Retry-After` while the inputs or bytes in
//! flight are at their bounds, 413 when it could never fit), a body-size
//! limit (413), image sizes planned from the header (413), a per-request
//! timeout (504, and the inference thread skips what nobody waits for);
//! payloads of another model are refused with 409 and malformed ones with
//! 400. Access: bearer tokens (401) and TLS, both optional. `/metrics`
//! exposes Prometheus counters and histograms, `/openapi.json` describes the
//! API; shutdown on SIGINT/SIGTERM finishes the requests in flight.

mod access;
mod admission;
mod metrics;
mod worker;

use std::net::SocketAddr;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use frankensplit_api::{
    BackboneAnswer, ClassifyBody, ClassifyOptions, ClassifyResponse, ErrorBody, FramedResponse, ImageOptions, Timings,
    ALL_BACKBONES,
};
use frankensplit_codec::{CodecError, PayloadCodec};
use frankensplit_models::Bundle;
use frankensplit_preprocess::{Preprocess, RgbImage};

pub use access::{tls_config, Tokens};
use admission::{Admission, Refusal, Ticket};
pub use metrics::Metrics;
use worker::{Backbones, Input, Job};

pub use frankensplit_api::{FRAMED_PAYLOADS, FRAMED_RAW_STRINGS, RAW_STRING};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Largest batch the inference thread forms.
    pub max_batch: usize,
    /// How long the inference thread waits for more requests once one arrived.
    pub batch_wait: Duration,
    /// Inputs (payloads or images) admitted and not yet answered; a request
    /// that would exceed it gets 503 (413 if it frames more on its own).
    pub queue_capacity: usize,
    /// Bytes admitted requests may hold at once (bodies, decoded images and
    /// the input pipeline's intermediates, latents); beyond, 503.
    pub max_inflight_bytes: u64,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Time a request may take in the server before it gets 504.
    pub request_timeout: Duration,
    /// Classes reported per request.
    pub top_k: usize,
    /// Largest image (pixels) `/v1/classify-image` decodes; bounds memory
    /// per request, since a small PNG can declare a huge canvas.
    pub max_image_pixels: u64,
    /// Bearer tokens the API and `/metrics` require (`/healthz` and
    /// `/openapi.json` stay open); `None` serves everyone.
    pub tokens: Option<Tokens>,
    /// TLS identity; `None` serves plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            batch_wait: Duration::from_millis(5),
            queue_capacity: 2 * frankensplit_api::MAX_FRAMES,
            max_inflight_bytes: 1 << 30,
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(10),
            top_k: 5,
            max_image_pixels: 4096 * 4096,
            tokens: None,
            tls: None,
        }
    }
}

#[derive(Clone)]
struct AppState {
    decoder: Arc<PayloadCodec>,
    /// Unbounded: admission bounds what can be in it.
    queue: Sender<Job>,
    admission: Arc<Admission>,
    config: Arc<ServeConfig>,
    metrics: Arc<Metrics>,
    model: Arc<str>,
    /// The backbones' names, in the bundle's order.
    backbones: Arc<Vec<String>>,
    /// The input pipeline, when the bundle can classify whole images.
    images: Option<Arc<Preprocess>>,
}

/// A running server: its address and a handle that ends when it has shut down.
pub struct RunningServer {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// Completes once the server has stopped and the inference thread has finished.
    pub done: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Binds `listen` and serves `bundle` until `shutdown` completes; requests in
/// flight are finished first.
pub async fn start(
    bundle: Bundle,
    listen: SocketAddr,
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<RunningServer> {
    let metrics = Arc::new(Metrics::new());
    let decoder = Arc::new(bundle.payload.clone());
    let model: Arc<str> = bundle.fingerprint.to_string().into();
    let backbones = Arc::new(bundle.backbone_names());
    let images = bundle
        .backbone_head
        .is_some()
        .then(|| Arc::new(bundle.manifest.preprocess.clone()));
    let (queue, worker) = worker::spawn(bundle, &config, metrics.clone());
    let admission = Arc::new(Admission::new(config.queue_capacity, config.max_inflight_bytes));
    let state = AppState {
        decoder,
        queue,
        admission,
        config: Arc::new(config.clone()),
        metrics,
        model,
        backbones,
        images,
    };
    let app = router(state);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let done = tokio::spawn(async move {
        let served = match config.tls {
            Some(tls) => {
                let listener = access::TlsListener::new(listener, tls)?;
                axum::serve(listener, app).with_graceful_shutdown(shutdown).await
            }
            None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
        };
        // The router (and with it the queue's sender) is gone: the worker drains and exits.
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        served
    });
    Ok(RunningServer { addr, done })
}

fn router(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    let mut protected = Router::new()
        .route(frankensplit_api::CLASSIFY, post(classify))
        .route(frankensplit_api::CLASSIFY_IMAGE, post(classify_image))
        .route(frankensplit_api::METRICS, get(metrics_text));
    if let Some(tokens) = state.config.tokens.clone() {
        protected = protected.layer(axum::middleware::from_fn_with_state(tokens, access::require_token));
    }
    // The description is the same for every request: built once.
    let openapi = Bytes::from(frankensplit_api::openapi::document().to_string());
    Router::new()
        .merge(protected)
        .route(frankensplit_api::HEALTH, get(|| async { "ok\n" }))
        .route(
            frankensplit_api::OPENAPI,
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], openapi) }),
        )
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(ErrorBody { error: message.into() })).into_response()
}

fn refused(refusal: Refusal) -> Response {
    let body = Json(ErrorBody { error: refusal.message });
    if refusal.retry {
        (refusal.status, [(header::RETRY_AFTER, "1")], body).into_response()
    } else {
        (refusal.status, body).into_response()
    }
}

/// Runs `work` on the blocking pool, answering 504 if it outlasts the
/// request's deadline (the work itself finishes on its own: it is bounded
/// by the admission that preceded it).
async fn blocking<T: Send + 'static>(
    state: &AppState,
    started: Instant,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    let deadline = tokio::time::Instant::from_std(started + state.config.request_timeout);
    match tokio::time::timeout_at(deadline, tokio::task::spawn_blocking(work)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("worker task failed: {e}"),
        )),
        Err(_) => Err(error(StatusCode::GATEWAY_TIMEOUT, "request timed out in the server")),
    }
}

async fn classify(
    State(state): State<AppState>,
    options: Result<Query<ClassifyOptions>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let kind = ClassifyBody::from_content_type(headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes()));
    let response = match options
        .map_err(|e| e.body_text())
        .and_then(|Query(o)| chosen(&state, &o))
    {
        Ok(backbones) => classify_inner(&state, body, kind, backbones, started).await,
        Err(message) => error(StatusCode::BAD_REQUEST, message),
    };
    state
        .metrics
        .observe_request("classify", response.status().as_u16(), started.elapsed());
    response
}

/// The backbones a request's `?backbone=` asks for.
fn chosen(state: &AppState, options: &ClassifyOptions) -> Result<Backbones, String> {
    match options.backbone.as_deref() {
        None => Ok(Backbones::One(0)),
        Some(ALL_BACKBONES) => Ok(Backbones::All),
        Some(name) => state
            .backbones
            .iter()
            .position(|n| n == name)
            .map(Backbones::One)
            .ok_or_else(|| {
                format!(
                    "this server has no backbone {name:?}; it serves {} (or ask for {ALL_BACKBONES})",
                    state.backbones.join(", ")
                )
            }),
    }
}

/// Entropy-decodes the body's payloads (each with its size), or the status
/// and message to answer with.
fn decode_body(
    decoder: &PayloadCodec,
    body: &[u8],
    kind: ClassifyBody,
    backbones: Backbones,
) -> Result<Vec<(Input, usize)>, (StatusCode, String)> {
    let framed = kind.framed();
    let payloads = if framed {
        frankensplit_api::frames(body).map_err(|e| (StatusCode::BAD_REQUEST, e))?
    } else {
        vec![body]
    };
    payloads
        .iter()
        .enumerate()
        .map(|(i, payload)| {
            let which = if framed {
                format!("payload {i}: ")
            } else {
                String::new()
            };
            let latent = if kind.raw() {
                decoder.decompress_raw(payload).map_err(|e| {
                    let expected = decoder.shape;
                    (
                        StatusCode::BAD_REQUEST,
                        format!("{which}malformed CompressAI string for a {expected} latent: {e}"),
                    )
                })?
            } else {
                decoder.decompress(payload).map_err(|e| match e {
                    e @ CodecError::FingerprintMismatch { .. } => (StatusCode::CONFLICT, format!("{which}{e}")),
                    e => (StatusCode::BAD_REQUEST, format!("{which}malformed payload: {e}")),
                })?
            };
            Ok((Input::Latent(latent, backbones), payload.len()))
        })
        .collect()
}

async fn classify_inner(
    state: &AppState,
    body: Bytes,
    kind: ClassifyBody,
    backbones: Backbones,
    started: Instant,
) -> Response {
    let framed = kind.framed();
    // Admission before any decoding: the frame count is read from the
    // length prefixes alone, each payload becomes one f32 latent.
    let count = if framed {
        match frankensplit_api::frames(&body) {
            Ok(payloads) => payloads.len(),
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        }
    } else {
        1
    };
    let shape = state.decoder.shape;
    let latent_bytes = 4 * u64::from(shape.channels) * u64::from(shape.height) * u64::from(shape.width);
    let ticket = match state
        .admission
        .admit(count, body.len() as u64 + count as u64 * latent_bytes)
    {
        Ok(ticket) => ticket,
        Err(refusal) => return refused(refusal),
    };
    let decoder = state.decoder.clone();
    let inputs = match blocking(state, started, move || decode_body(&decoder, &body, kind, backbones)).await {
        Ok(Ok(inputs)) => inputs,
        Ok(Err((status, message))) => return error(status, message),
        Err(response) => return response,
    };
    match infer(state, inputs, backbones == Backbones::All, started, ticket).await {
        Ok(results) if framed => Json(FramedResponse { results }).into_response(),
        Ok(mut results) => Json(results.pop().expect("one payload, one result")).into_response(),
        Err(response) => response,
    }
}

async fn classify_image(
    State(state): State<AppState>,
    options: Result<Query<ImageOptions>, QueryRejection>,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let response = match options {
        Ok(Query(options)) => classify_image_inner(&state, body, options, started).await,
        Err(e) => error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    state
        .metrics
        .observe_request("classify_image", response.status().as_u16(), started.elapsed());
    response
}

async fn classify_image_inner(state: &AppState, body: Bytes, options: ImageOptions, started: Instant) -> Response {
    let Some(preprocess) = state.images.clone() else {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "this model bundle holds only the backbone after the split; convert it with the whole backbone (--backbone-weights) to classify images",
        );
    };
    let max_pixels = state.config.max_image_pixels;
    // What decoding and the pipeline will allocate, from the header alone.
    let planned = RgbImage::dimensions(&body).and_then(|(width, height)| {
        if options.cropped {
            let crop = preprocess.crop;
            if (width, height) != (crop, crop) {
                return Err(frankensplit_preprocess::Error::Size {
                    width,
                    height,
                    why: format!("cropped=true needs a {crop}×{crop} image"),
                });
            }
            Ok(15 * u64::from(crop) * u64::from(crop))
        } else {
            Ok(preprocess.plan(width, height, max_pixels)?.working_bytes)
        }
    });
    let working_bytes = match planned {
        Ok(bytes) => bytes,
        Err(e) => return image_error(e),
    };
    let ticket = match state.admission.admit(1, body.len() as u64 + working_bytes) {
        Ok(ticket) => ticket,
        Err(refusal) => return refused(refusal),
    };
    let prepared = blocking(state, started, move || {
        let input = if options.cropped {
            let image = RgbImage::decode_limited(&body, max_pixels)?;
            if (image.width, image.height) != (preprocess.crop, preprocess.crop) {
                return Err(frankensplit_preprocess::Error::Size {
                    width: image.width,
                    height: image.height,
                    why: format!("cropped=true needs a {0}×{0} image", preprocess.crop),
                });
            }
            preprocess.normalize(&image)
        } else {
            preprocess.decode_and_apply(&body, max_pixels)?
        };
        Ok((Input::Image(input), body.len()))
    })
    .await;
    let input = match prepared {
        Ok(Ok(input)) => input,
        Ok(Err(e)) => return image_error(e),
        Err(response) => return response,
    };
    match infer(state, vec![input], false, started, ticket).await {
        Ok(mut results) => Json(results.pop().expect("one image, one result")).into_response(),
        Err(response) => response,
    }
}

/// 413 for images over a limit, 400 for the rest.
fn image_error(e: frankensplit_preprocess::Error) -> Response {
    let status = match e {
        frankensplit_preprocess::Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    error(status, e.to_string())
}

/// Queues an admitted request's decoded inputs for the inference thread and
/// waits for their answers, or the error response to give; with
/// `every_backbone`, each answer lists every backbone's classes. The ticket
/// is given back when this returns, answered or timed out.
async fn infer(
    state: &AppState,
    inputs: Vec<(Input, usize)>,
    every_backbone: bool,
    started: Instant,
    _ticket: Ticket,
) -> Result<Vec<ClassifyResponse>, Response> {
    let decode_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut answers = Vec::with_capacity(inputs.len());
    for (input, input_bytes) in inputs {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            input,
            enqueued: Instant::now(),
            reply,
        };
        if state.queue.send(job).is_err() {
            return Err(error(StatusCode::SERVICE_UNAVAILABLE, "server is shutting down"));
        }
        state.metrics.queue_depth.inc();
        answers.push((answer, input_bytes));
    }
    let deadline = tokio::time::Instant::from_std(started + state.config.request_timeout);
    let mut results = Vec::with_capacity(answers.len());
    for (answer, input_bytes) in answers {
        let result = match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(Ok(result))) => result,
            Ok(Ok(Err(message))) => return Err(error(StatusCode::INTERNAL_SERVER_ERROR, message)),
            Ok(Err(_)) => return Err(error(StatusCode::SERVICE_UNAVAILABLE, "server is shutting down")),
            Err(_) => return Err(error(StatusCode::GATEWAY_TIMEOUT, "request timed out in the server")),
        };
        let k = state.config.top_k;
        let mut answers: Vec<BackboneAnswer> = result
            .logits
            .iter()
            .map(|(index, logits)| BackboneAnswer {
                backbone: state.backbones[*index].clone(),
                top_k: result.top_k(logits, k),
            })
            .collect();
        let first = answers.first().cloned().ok_or_else(|| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the inference thread answered no backbone",
            )
        })?;
        if !every_backbone {
            answers.clear();
        }
        results.push(ClassifyResponse {
            model: state.model.to_string(),
            backbone: first.backbone,
            input_bytes,
            top_k: first.top_k,
            backbones: answers,
            batch_size: result.batch_size,
            timings_ms: Timings {
                decode: decode_ms,
                queue: result.queue_ms,
                inference: result.inference_ms,
                total: started.elapsed().as_secs_f64() * 1e3,
            },
        });
    }
    Ok(results)
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
