//! Metrics pushed over OTLP/HTTP (protobuf) when an endpoint is configured (README "Metrics").
//! Nothing listens: the worker connects out to the collector, as it does to everything else.
//!
//! The instruments read [`Counters`] at collection time (observable counters and gauges,
//! callbacks over the atomics), so the hot path costs the same whether an export runs or not;
//! only the two histograms are SDK instruments recorded as things happen ([`Recorders`]).
//!
//! The SDK's `PeriodicReader` would run its own thread and need a blocking HTTP client (a
//! second runtime). Here a `ManualReader` is collected by one task of the app's `TaskTracker`
//! ([`OtlpExport::run`], a background task of the supervisor), which exports on the worker's
//! runtime with the one reqwest client of the process, stops on the app's token, and makes a
//! last export, bounded, once the workers have drained.

use super::Counters;
use crate::config::{MetricTemporality, MetricsSettings, OtlpSettings};
use opentelemetry::metrics::{AsyncInstrument, Histogram, Meter, MeterProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};
use opentelemetry_sdk::resource::TelemetryResourceDetector;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// How long the last export, after the workers drained, may take. It runs in the supervisor's
/// background drain (5 s, `app::BACKGROUND_DRAIN`), so the stop budget of ARCHITECTURE.md is
/// unchanged; a collector that is down costs at most this much of it.
pub(crate) const FINAL_EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// Beyond the exporter's own bound (OTEL_EXPORTER_OTLP_TIMEOUT ends its retries and each
/// request) before the loop gives up on one periodic export: the exporter's deadline does not
/// cancel an attempt already in flight.
const EXPORT_SLACK: Duration = Duration::from_secs(1);

/// Bucket boundaries of both latency histograms, in seconds: 5 ms to 10 minutes. A sync takes
/// milliseconds against a nearby Gmail and seconds to minutes with retries and backoff; publish
/// → commit adds the coalescing window and the history-lag re-reads (up to 45 s by default).
const SECONDS_BOUNDARIES: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The instrumentation scope of every instrument.
const SCOPE: &str = "gmail-sync";

// Attribute keys.
const ACK_REASON: &str = "gmail_sync.ack.reason";
const QUARANTINE_REASON: &str = "gmail_sync.quarantine.reason";
const SYNC_OUTCOME: &str = "gmail_sync.sync.outcome";
const RENEWAL_OUTCOME: &str = "gmail_sync.renewal.outcome";
const QUOTA_REASON: &str = "gmail_sync.quota.reason";
const QUOTA_PRIORITY: &str = "gmail_sync.quota.priority";
const GMAIL_METHOD: &str = "gmail.method";
const STATUS_CLASS: &str = "http.response.status_class";

/// The SDK histograms an export records into (through [`Counters::sync_committed`] and
/// [`Counters::committed_after`]).
pub(crate) struct Recorders {
    pub(super) sync_duration: Histogram<f64>,
    pub(super) commit_latency: Histogram<f64>,
}

impl fmt::Debug for Recorders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Recorders")
    }
}

/// Why the export could not be set up (startup fails: exit 1).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExportSetupError {
    #[error("metrics export: cannot build its HTTP client: {0}")]
    HttpClient(String),
    #[error("metrics export: {0}")]
    Exporter(String),
}

/// A running OTLP export: the meter provider, its reader and the exporter.
pub(crate) struct OtlpExport {
    provider: SdkMeterProvider,
    reader: Arc<ManualReader>,
    exporter: opentelemetry_otlp::MetricExporter,
    interval: Duration,
    /// The bound of one periodic export.
    bound: Duration,
    /// For logs: the endpoint without credentials.
    shown_endpoint: String,
}

impl OtlpExport {
    /// Builds the exporter, the provider and every instrument over `counters`. Connects to
    /// nothing yet: the first export is one interval after the start.
    pub(crate) fn start(
        settings: &MetricsSettings,
        otlp: &OtlpSettings,
        counters: &Arc<Counters>,
    ) -> Result<OtlpExport, ExportSetupError> {
        // The process's reqwest (0.13, rustls); its timeout bounds each request.
        let http = reqwest::Client::builder()
            .timeout(otlp.timeout)
            .build()
            .map_err(|e| ExportSetupError::HttpClient(e.to_string()))?;
        let headers = otlp
            .headers
            .0
            .iter()
            .map(|(name, value)| (name.clone(), value.expose().to_string()))
            .collect();
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_http_client(http)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(otlp.endpoint.clone())
            .with_timeout(otlp.timeout)
            .with_headers(headers)
            .with_temporality(temporality(otlp.temporality))
            .build()
            .map_err(|e| ExportSetupError::Exporter(e.to_string()))?;
        let reader = Arc::new(
            ManualReader::builder()
                .with_temporality(exporter.temporality())
                .build(),
        );
        let provider = SdkMeterProvider::builder()
            .with_resource(resource(settings))
            .with_reader(SharedReader(reader.clone()))
            .build();
        let meter = provider.meter_with_scope(
            InstrumentationScope::builder(SCOPE)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        if !counters.attach(register(&meter, counters)) {
            tracing::warn!(
                "these counters already serve another metrics export: the histograms of this one \
                 stay empty"
            );
        }
        Ok(OtlpExport {
            provider,
            reader,
            exporter,
            interval: otlp.interval,
            bound: otlp.timeout + EXPORT_SLACK,
            shown_endpoint: otlp.shown_endpoint(),
        })
    }

    /// Exports every interval until `stop`, then once more (the counters after the drain),
    /// within [`FINAL_EXPORT_TIMEOUT`], and shuts the provider down. Never fails: an export
    /// that fails is logged once per outage ([`ExportHealth`]) and tried again next interval.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        // A slow collector delays the next export instead of causing a burst of them.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut health = ExportHealth::default();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    // An export in flight is abandoned at the stop: the final one follows at
                    // once, so the drain never waits for a slow collector's full timeout.
                    tokio::select! {
                        outcome = self.export_once(self.bound) => self.report(&mut health, outcome),
                        _ = stop.cancelled() => break,
                    }
                }
            }
        }
        let outcome = self.export_once(FINAL_EXPORT_TIMEOUT).await;
        self.report(&mut health, outcome);
        // The reader only forgets its pipeline; the exporter drops its client.
        let _ = self.provider.shutdown();
        let _ = self.exporter.shutdown();
    }

    /// One collection (the callbacks read the counters) and one export, within `bound`.
    async fn export_once(&self, bound: Duration) -> ExportOutcome {
        let mut metrics = ResourceMetrics::default();
        if let Err(e) = self.reader.collect(&mut metrics) {
            return ExportOutcome::Failed(format!("collecting: {e}"));
        }
        match tokio::time::timeout(bound, self.exporter.export(&metrics)).await {
            Ok(Ok(())) => ExportOutcome::Exported,
            // The exporter's messages carry the status or "network error", never a header.
            Ok(Err(e)) => ExportOutcome::Failed(e.to_string()),
            Err(_) => ExportOutcome::Failed(format!("no answer within {bound:?}")),
        }
    }

    fn report(&self, health: &mut ExportHealth, outcome: ExportOutcome) {
        match health.record(&outcome) {
            ExportNews::Nothing => {
                if let ExportOutcome::Failed(error) = &outcome {
                    tracing::debug!(endpoint = %self.shown_endpoint, error = %error, "metrics export failed again");
                }
            }
            ExportNews::FirstFailure => {
                let ExportOutcome::Failed(error) = &outcome else {
                    unreachable!("a failure is news only when it failed")
                };
                tracing::warn!(
                    endpoint = %self.shown_endpoint,
                    error = %error,
                    "metrics export failed; it is tried again every interval, and not logged \
                     again until it works (the summary line still carries the counters)"
                );
            }
            ExportNews::Recovered { failed } => {
                tracing::info!(endpoint = %self.shown_endpoint, failed_exports = failed, "metrics export works again");
            }
        }
    }
}

/// What one export came to.
#[derive(Debug, PartialEq, Eq)]
enum ExportOutcome {
    Exported,
    Failed(String),
}

/// What is worth a log line about the export: a collector that is down must not fill the log,
/// so only the first failure of an outage and the recovery are.
#[derive(Debug, Default)]
struct ExportHealth {
    failed_in_a_row: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum ExportNews {
    Nothing,
    FirstFailure,
    Recovered { failed: u64 },
}

impl ExportHealth {
    fn record(&mut self, outcome: &ExportOutcome) -> ExportNews {
        match outcome {
            ExportOutcome::Failed(_) => {
                self.failed_in_a_row += 1;
                if self.failed_in_a_row == 1 {
                    ExportNews::FirstFailure
                } else {
                    ExportNews::Nothing
                }
            }
            ExportOutcome::Exported => match std::mem::take(&mut self.failed_in_a_row) {
                0 => ExportNews::Nothing,
                failed => ExportNews::Recovered { failed },
            },
        }
    }
}

fn temporality(t: MetricTemporality) -> Temporality {
    match t {
        MetricTemporality::Cumulative => Temporality::Cumulative,
        MetricTemporality::Delta => Temporality::Delta,
        MetricTemporality::LowMemory => Temporality::LowMemory,
    }
}

/// `telemetry.sdk.*`, then `service.version` and `k8s.pod.name`, then what the configuration
/// asks for in order (`service.name`, OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME): a later
/// attribute replaces an earlier one of the same key.
fn resource(settings: &MetricsSettings) -> Resource {
    let mut detected = vec![KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))];
    if let Some(pod) = settings.pod_name.clone().or_else(host_name) {
        detected.push(KeyValue::new("k8s.pod.name", pod));
    }
    Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_attributes(detected)
        .with_attributes(
            settings
                .resource
                .iter()
                .map(|(key, value)| KeyValue::new(key.clone(), value.clone())),
        )
        .build()
}

/// The kernel's host name: a pod's name in Kubernetes.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// The provider owns its reader; the export task collects the same one.
#[derive(Debug)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Relaxed)
}

/// Every instrument (README "Metrics" lists them). The observable ones read the counters when
/// collected, each on its own: two instruments of one collection may be a few events apart.
fn register(meter: &Meter, counters: &Arc<Counters>) -> Recorders {
    let counter = |name: &'static str,
                   unit: &'static str,
                   description: &'static str,
                   read: fn(&Counters, &dyn AsyncInstrument<u64>)| {
        let counters = counters.clone();
        meter
            .u64_observable_counter(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |o| read(&counters, o))
            .build();
    };
    counter(
        "gmail_sync.notifications.received",
        "{notification}",
        "Notifications Pub/Sub handed to this worker",
        |c, o| o.observe(load(&c.received), &[]),
    );
    counter(
        "gmail_sync.notifications.acked",
        "{notification}",
        "Notifications acked: without work (a committed cursor already covered them), after a \
         sync of this worker committed past them, for an unknown mailbox, for a mailbox needing \
         attention",
        |c, o| {
            for (reason, n) in [
                ("without_work", &c.acked_without_work),
                ("after_sync", &c.acked_after_sync),
                ("unknown_mailbox", &c.unknown_mailbox),
                ("needs_attention", &c.attention_mailbox),
            ] {
                o.observe(load(n), &[KeyValue::new(ACK_REASON, reason)]);
            }
        },
    );
    counter(
        "gmail_sync.notifications.nacked",
        "{notification}",
        "Notifications given back to Pub/Sub for redelivery",
        |c, o| o.observe(load(&c.nacked), &[]),
    );
    counter(
        "gmail_sync.notifications.quarantined",
        "{notification}",
        "Notifications acked after their bounded copy went to the quarantine stream: malformed, \
         or ahead of Gmail's history for longer than GMAIL_SYNC_HISTORY_LAG_SECS",
        |c, o| {
            let ahead = load(&c.quarantined_history_ahead);
            let malformed = load(&c.quarantined).saturating_sub(ahead);
            o.observe(malformed, &[KeyValue::new(QUARANTINE_REASON, "malformed")]);
            o.observe(ahead, &[KeyValue::new(QUARANTINE_REASON, "history_ahead")]);
        },
    );
    counter(
        "gmail_sync.syncs",
        "{sync}",
        "Mailbox syncs that read Gmail: committed, or ended with a retryable or permanent error",
        |c, o| {
            for (outcome, n) in [
                ("committed", &c.syncs),
                ("retryable_error", &c.sync_errors_retryable),
                ("permanent_error", &c.sync_errors_permanent),
            ] {
                o.observe(load(n), &[KeyValue::new(SYNC_OUTCOME, outcome)]);
            }
        },
    );
    counter(
        "gmail_sync.changes.written",
        "{change}",
        "Change entries written to the change streams",
        |c, o| o.observe(load(&c.changes_written), &[]),
    );
    counter(
        "gmail_sync.history.pages",
        "{page}",
        "Pages of users.history.list read",
        |c, o| o.observe(load(&c.history_pages), &[]),
    );
    counter(
        "gmail_sync.gmail.calls",
        "{request}",
        "Gmail requests (a batch part counts as one), by method and answer (`none`: no answer)",
        |c, o| {
            for call in c.gmail.calls() {
                o.observe(
                    call.calls,
                    &[
                        KeyValue::new(GMAIL_METHOD, call.method),
                        KeyValue::new(STATUS_CLASS, call.status_class),
                    ],
                );
            }
        },
    );
    counter(
        "gmail_sync.gmail.quota_units",
        "{unit}",
        "Gmail quota units spent, by method (at the costs of Gmail's usage table and \
         GMAIL_SYNC_MESSAGES_GET_COST)",
        |c, o| {
            for (method, units) in c.gmail.quota_units() {
                o.observe(units, &[KeyValue::new(GMAIL_METHOD, method)]);
            }
        },
    );
    counter(
        "gmail_sync.gmail.rate_limited",
        "{response}",
        "Gmail answers 429 and 403 rate limits",
        |c, o| o.observe(load(&c.gmail_rate_limited), &[]),
    );
    counter(
        "gmail_sync.lease.busy",
        "{sync}",
        "Sync attempts that found the mailbox leased by another worker (lease contention)",
        |c, o| o.observe(load(&c.lease_busy), &[]),
    );
    counter(
        "gmail_sync.quota.admissions",
        "{admission}",
        "Quota governor admissions and charges that fit the shared budgets",
        |c, o| o.observe(load(&c.quota_granted), &[]),
    );
    counter(
        "gmail_sync.quota.deferrals",
        "{deferral}",
        "Work the quota governor deferred, by the budget that was spent (user minute, user \
         in-flight slots, project minute or day, a Gmail rate-limit block)",
        |c, o| {
            for (reason, n) in [
                ("user", &c.quota_deferred_user),
                ("in_flight", &c.quota_deferred_in_flight),
                ("project", &c.quota_deferred_project),
                ("blocked", &c.quota_deferred_blocked),
            ] {
                o.observe(load(n), &[KeyValue::new(QUOTA_REASON, reason)]);
            }
        },
    );
    counter(
        "gmail_sync.quota.deferrals_by_priority",
        "{deferral}",
        "The same deferrals by the work deferred: notification-driven syncs, renewals, fallback \
         syncs",
        |c, o| {
            for (priority, n) in [
                ("notification", &c.quota_deferred_notification),
                ("renewal", &c.quota_deferred_renewal),
                ("fallback", &c.quota_deferred_fallback),
            ] {
                o.observe(load(n), &[KeyValue::new(QUOTA_PRIORITY, priority)]);
            }
        },
    );
    counter(
        "gmail_sync.quota.blocks",
        "{block}",
        "Gmail rate-limit answers fed back to the governor as a block of a budget for every replica",
        |c, o| o.observe(load(&c.quota_blocks), &[]),
    );
    counter(
        "gmail_sync.resyncs",
        "{resync}",
        "Full resyncs after Gmail answered 404 for the stored cursor",
        |c, o| o.observe(load(&c.resyncs), &[]),
    );
    counter(
        "gmail_sync.scheduler.renewals",
        "{renewal}",
        "Watch renewals (users.watch) by the scheduler: renewed or failed",
        |c, o| {
            o.observe(
                load(&c.renewals),
                &[KeyValue::new(RENEWAL_OUTCOME, "renewed")],
            );
            o.observe(
                load(&c.renewal_failures),
                &[KeyValue::new(RENEWAL_OUTCOME, "failed")],
            );
        },
    );
    counter(
        "gmail_sync.scheduler.fallback_syncs",
        "{sync}",
        "Fallback syncs of mailboxes silent for GMAIL_SYNC_FALLBACK_SILENCE_SECS",
        |c, o| o.observe(load(&c.fallback_syncs), &[]),
    );
    {
        let c = counters.clone();
        meter
            .u64_observable_gauge("gmail_sync.watch.expiring")
            .with_unit("{watch}")
            .with_description(
                "Watches expiring within GMAIL_SYNC_WATCH_WARN_HORIZON_SECS while their renewal \
                 keeps failing",
            )
            .with_callback(move |o| o.observe(load(&c.watches_expiring_soon), &[]))
            .build();
    }
    {
        let c = counters.clone();
        meter
            .f64_observable_gauge("gmail_sync.watch.soonest_expiry")
            .with_unit("s")
            .with_description(
                "Seconds until the soonest expiry of a watch whose renewal keeps failing \
                 (negative: expired); absent while no renewal fails (other watches are renewed \
                 days before they expire)",
            )
            .with_callback(move |o| {
                let soonest_ms = load(&c.soonest_watch_expiry_ms);
                if soonest_ms > 0 {
                    let now_ms = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_millis() as f64;
                    o.observe((soonest_ms as f64 - now_ms) / 1000.0, &[]);
                }
            })
            .build();
    }
    {
        let c = counters.clone();
        meter
            .u64_observable_gauge("gmail_sync.mailboxes.attention")
            .with_unit("{mailbox}")
            .with_description(
                "Registered mailboxes needing attention (a revoked grant, a mailbox gone), in \
                 the whole deployment, as the scheduler last read it",
            )
            .with_callback(move |o| o.observe(load(&c.mailboxes_attention), &[]))
            .build();
    }
    let histogram = |name: &'static str, description: &'static str| {
        meter
            .f64_histogram(name)
            .with_unit("s")
            .with_description(description)
            .with_boundaries(SECONDS_BOUNDARIES.to_vec())
            .build()
    };
    Recorders {
        sync_duration: histogram(
            "gmail_sync.sync.duration",
            "Duration of committed mailbox syncs, from taking the lease to the last commit",
        ),
        commit_latency: histogram(
            "gmail_sync.notification.commit_latency",
            "Pub/Sub publish to the commit that covers the notification, for notifications acked \
             after a sync of this worker",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::StatusClass;

    #[test]
    fn an_outage_is_reported_once_and_its_end_once() {
        let mut health = ExportHealth::default();
        let failed = || ExportOutcome::Failed("HTTP export failed: network error".into());
        assert_eq!(health.record(&ExportOutcome::Exported), ExportNews::Nothing);
        assert_eq!(health.record(&failed()), ExportNews::FirstFailure);
        for _ in 0..100 {
            assert_eq!(health.record(&failed()), ExportNews::Nothing);
        }
        assert_eq!(
            health.record(&ExportOutcome::Exported),
            ExportNews::Recovered { failed: 101 }
        );
        assert_eq!(health.record(&ExportOutcome::Exported), ExportNews::Nothing);
        // The next outage is news again.
        assert_eq!(health.record(&failed()), ExportNews::FirstFailure);
    }

    #[test]
    fn the_status_class_of_an_answer() {
        assert_eq!(StatusClass::of(200).name(), "2xx");
        assert_eq!(StatusClass::of(204).name(), "2xx");
        assert_eq!(StatusClass::of(429).name(), "4xx");
        assert_eq!(StatusClass::of(503).name(), "5xx");
        assert_eq!(StatusClass::of(0).name(), "none");
    }
}
