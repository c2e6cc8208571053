//! A loopback OTLP/HTTP metrics receiver (protobuf), standing in for an OpenTelemetry
//! collector: tests and the benchmark point a worker's `OTEL_EXPORTER_OTLP_ENDPOINT` at
//! [`OtlpReceiver::endpoint`] and read back what arrived. It serves `POST /v1/metrics` on
//! 127.0.0.1 (a free port) inside the calling process, decodes every request with the
//! protobuf types of `opentelemetry-proto`, keeps them, and answers as a collector does (an
//! empty `ExportMetricsServiceResponse`), or with a chosen failure status ([`OtlpReceiver::fail_with`]).
//! It stops when dropped.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{Metric, metric, number_data_point};
use prost::Message;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Inner {
    requests: Vec<ExportMetricsServiceRequest>,
    /// Protobuf bytes received in all.
    bytes: u64,
    /// Header names of the last request, lower-cased.
    last_headers: Vec<(String, String)>,
    /// Answer every request with this status instead of accepting it.
    failing: Option<StatusCode>,
    /// Requests refused because of `failing`, or undecodable.
    refused: u64,
}

pub struct OtlpReceiver {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    stop: CancellationToken,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One data point of a sum or gauge: its attributes (sorted) and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub attributes: Vec<(String, String)>,
    pub value: f64,
}

/// One histogram data point (attributes are not used by gmail-sync's histograms).
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramPoint {
    pub count: u64,
    pub sum: f64,
    pub bucket_counts: Vec<u64>,
    pub bounds: Vec<f64>,
}

impl OtlpReceiver {
    pub async fn start() -> anyhow::Result<OtlpReceiver> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner::default()));
        let stop = CancellationToken::new();
        let app = axum::Router::new()
            .route("/v1/metrics", post(receive))
            .with_state(inner.clone());
        let shutdown = stop.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "OTLP receiver failed");
            }
        });
        Ok(OtlpReceiver { addr, inner, stop })
    }

    /// The base URL for `OTEL_EXPORTER_OTLP_ENDPOINT` (the exporter appends `/v1/metrics`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, answer every request with `status` (a collector in trouble), or accept
    /// them again (`None`).
    pub fn fail_with(&self, status: Option<u16>) {
        self.lock().failing = status.map(|s| StatusCode::from_u16(s).expect("a valid status"));
    }

    /// Requests accepted so far.
    pub fn requests(&self) -> usize {
        self.lock().requests.len()
    }

    /// Requests answered with the failure status, or undecodable.
    pub fn refused(&self) -> u64 {
        self.lock().refused
    }

    /// Protobuf bytes accepted so far.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// The headers of the last accepted request (names lower-cased).
    pub fn last_headers(&self) -> Vec<(String, String)> {
        self.lock().last_headers.clone()
    }

    /// Every metric name seen.
    pub fn metric_names(&self) -> BTreeSet<String> {
        let inner = self.lock();
        inner
            .requests
            .iter()
            .flat_map(metrics_of)
            .map(|m| m.name.clone())
            .collect()
    }

    /// The resource attributes of the last request (string values only).
    pub fn resource(&self) -> Vec<(String, String)> {
        let inner = self.lock();
        let Some(last) = inner.requests.last() else {
            return Vec::new();
        };
        let mut out: Vec<(String, String)> = last
            .resource_metrics
            .iter()
            .filter_map(|rm| rm.resource.as_ref())
            .flat_map(|r| r.attributes.iter().filter_map(string_attribute))
            .collect();
        out.sort();
        out
    }

    /// The metric's unit in the last request that has it.
    pub fn unit(&self, name: &str) -> Option<String> {
        self.latest_metric(name).map(|m| m.unit)
    }

    /// The points of sum or gauge `name` in the last request that has it: with cumulative
    /// temporality (the default) a counter's point is its total since the worker started.
    pub fn points(&self, name: &str) -> Vec<Point> {
        let Some(metric) = self.latest_metric(name) else {
            return Vec::new();
        };
        let points = match metric.data {
            Some(metric::Data::Sum(s)) => s.data_points,
            Some(metric::Data::Gauge(g)) => g.data_points,
            _ => return Vec::new(),
        };
        points
            .into_iter()
            .map(|p| {
                let mut attributes: Vec<(String, String)> =
                    p.attributes.iter().filter_map(string_attribute).collect();
                attributes.sort();
                let value = match p.value {
                    Some(number_data_point::Value::AsInt(v)) => v as f64,
                    Some(number_data_point::Value::AsDouble(v)) => v,
                    None => f64::NAN,
                };
                Point { attributes, value }
            })
            .collect()
    }

    /// The value of the point of `name` whose attributes are exactly `attributes`.
    pub fn value(&self, name: &str, attributes: &[(&str, &str)]) -> Option<f64> {
        let mut wanted: Vec<(String, String)> = attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        wanted.sort();
        self.points(name)
            .into_iter()
            .find(|p| p.attributes == wanted)
            .map(|p| p.value)
    }

    /// The (only) point of histogram `name` in the last request that has it.
    pub fn histogram(&self, name: &str) -> Option<HistogramPoint> {
        match self.latest_metric(name)?.data? {
            metric::Data::Histogram(h) => {
                h.data_points.into_iter().next().map(|p| HistogramPoint {
                    count: p.count,
                    sum: p.sum.unwrap_or_default(),
                    bucket_counts: p.bucket_counts,
                    bounds: p.explicit_bounds,
                })
            }
            _ => None,
        }
    }

    fn latest_metric(&self, name: &str) -> Option<Metric> {
        let inner = self.lock();
        inner
            .requests
            .iter()
            .rev()
            .find_map(|r| metrics_of(r).find(|m| m.name == name).cloned())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn metrics_of(r: &ExportMetricsServiceRequest) -> impl Iterator<Item = &Metric> {
    r.resource_metrics
        .iter()
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
}

fn string_attribute(kv: &KeyValue) -> Option<(String, String)> {
    match kv.value.as_ref() {
        Some(AnyValue {
            value: Some(any_value::Value::StringValue(s)),
        }) => Some((kv.key.clone(), s.clone())),
        _ => None,
    }
}

async fn receive(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let mut inner = inner.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(status) = inner.failing {
        inner.refused += 1;
        return (status, Vec::new()).into_response();
    }
    let Ok(request) = ExportMetricsServiceRequest::decode(body.as_ref()) else {
        inner.refused += 1;
        return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
    };
    inner.bytes += body.len() as u64;
    inner.requests.push(request);
    inner.last_headers = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportMetricsServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}
