//! Prometheus metrics: requests by endpoint and status, queue depth, batch
//! sizes and request latency.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    status: u16,
}

/// The server's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RequestLabels, Histogram>,
    /// Requests decoded and waiting for the inference thread.
    pub queue_depth: Gauge,
    /// Sizes of the batches run.
    pub batch_size: Histogram,
    /// Inputs dropped before inference because their request had timed out.
    pub abandoned: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("frankensplit");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let queue_depth = Gauge::default();
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        registry.register("requests", "Requests by endpoint and HTTP status", requests.clone());
        registry.register(
            "request_latency_seconds",
            "Time from request to response",
            latency.clone(),
        );
        registry.register(
            "queue_depth",
            "Decoded requests waiting for inference",
            queue_depth.clone(),
        );
        registry.register("batch_size", "Requests per inference batch", batch_size.clone());
        let abandoned = Counter::default();
        registry.register(
            "abandoned_inputs",
            "Inputs skipped by the inference thread because their request timed out",
            abandoned.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            queue_depth,
            batch_size,
            abandoned,
        }
    }

    /// Counts a finished request.
    pub fn observe_request(&self, endpoint: &'static str, status: u16, elapsed: Duration) {
        let labels = RequestLabels { endpoint, status };
        self.requests.get_or_create(&labels).inc();
        self.latency.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
