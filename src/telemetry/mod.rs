//! Logs and counters. No port: everything leaves the process as JSON lines on stdout, and, when
//! an OTLP endpoint is configured, as metrics pushed to it (`otlp`).
//!
//! Log lines carry the field names Cloud Logging reads (`severity`, `message`, `time`) plus the
//! event's fields and the fields of every enclosing span (so the per-sync span's mailbox and
//! historyIds appear on each line logged inside it).
//!
//! The hot path only touches atomics ([`Counters`]): the OTLP export reads them at collection
//! time through observable instruments, so counting costs the same with the export on or off.
//! The two histograms the export needs (sync duration, publish → commit) are SDK instruments,
//! recorded only while an export is attached ([`Counters::attach`]).

pub(crate) mod otlp;
mod span_fields;

use crate::gmail::Method;
use serde_json::{Map, Value};
use span_fields::SpanJsonFields;
use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Where log lines go: the worker logs to stdout (collected by the platform); admin commands
/// log to stderr so their stdout carries only their result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
}

/// Installs the JSON logger, filtered by `RUST_LOG` (default `info`).
/// Safe to call more than once (tests run several workers in one process): later calls no-op.
pub fn init_logging(target: LogTarget) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .fmt_fields(SpanJsonFields)
        .event_format(CloudLoggingJson);
    let _ = match target {
        LogTarget::Stdout => builder.with_writer(std::io::stdout).try_init(),
        LogTarget::Stderr => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// One JSON object per line: `severity`, `message`, `time`, `target`, event fields, span fields.
pub struct CloudLoggingJson;

impl<S, N> FormatEvent<S, N> for CloudLoggingJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut obj = Map::new();
        let severity = match *event.metadata().level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            Level::DEBUG | Level::TRACE => "DEBUG",
        };
        obj.insert("severity".into(), severity.into());
        let now = time::OffsetDateTime::now_utc();
        let time = now
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        obj.insert("time".into(), time.into());
        obj.insert("target".into(), event.metadata().target().into());
        // Outer spans first so inner spans and the event itself win on a name clash.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&fields.fields)
                {
                    obj.extend(map);
                }
                obj.insert("span".into(), span.name().into());
            }
        }
        let mut visitor = JsonVisitor(&mut obj);
        event.record(&mut visitor);
        if !obj.contains_key("message") {
            obj.insert("message".into(), Value::String(String::new()));
        }
        let line = serde_json::to_string(&obj).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Process-wide counters, reported by the periodic summary line and read by tests, the
        /// demo and the benchmark. Relaxed atomics: each counter is independent.
        #[derive(Default, Debug)]
        pub struct Counters {
            $( $(#[$doc])* pub $name: AtomicU64, )*
            /// Pub/Sub publish → ack latency of acked notifications.
            pub ack_latency: LatencyHistogram,
            /// Receive → ack latency: the part of the above spent in this worker.
            pub handling_latency: LatencyHistogram,
            /// Gmail requests by method and answer, quota units by method.
            pub gmail: GmailCounters,
            /// The SDK histograms of an OTLP export, once one is attached.
            recorders: OnceLock<otlp::Recorders>,
        }

        #[derive(Default, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct CountersSnapshot {
            $( pub $name: u64, )*
        }

        impl Counters {
            pub fn snapshot(&self) -> CountersSnapshot {
                CountersSnapshot { $( $name: self.$name.load(Relaxed), )* }
            }
        }
    };
}

counters! {
    /// Messages handed to the worker by the subscriber.
    received,
    /// Messages acked after their (bounded) copy went to the quarantine stream: malformed, or
    /// ahead of Gmail's history for too long.
    quarantined,
    /// Of those, notifications whose historyId Gmail's history did not reach within
    /// GMAIL_SYNC_HISTORY_LAG_SECS (forged or far ahead).
    quarantined_history_ahead,
    /// Notifications for mailboxes that are not registered (acked).
    unknown_mailbox,
    /// Notifications for mailboxes marked as needing attention (acked; cursor kept).
    attention_mailbox,
    /// Notifications acked because the cursor already covered them (no Gmail call).
    acked_without_work,
    /// Notifications acked after a sync of this process committed past them.
    acked_after_sync,
    /// Notifications given back to Pub/Sub (nack) for redelivery.
    nacked,
    /// Syncs that called Gmail and committed.
    syncs,
    /// Full resyncs after Gmail answered 404 for the cursor.
    resyncs,
    /// Change entries written to the change streams.
    changes_written,
    /// Pages of users.history.list read.
    history_pages,
    /// Sync attempts that found another worker holding the mailbox lease.
    lease_busy,
    /// Syncs that ended with a retryable error.
    sync_errors_retryable,
    /// Syncs that ended with a permanent error (mailbox marked as needing attention).
    sync_errors_permanent,
    /// Gmail HTTP requests sent (including retries).
    gmail_calls,
    /// Gmail quota units spent (at the costs of the configured `quota::CostTable`).
    gmail_quota_units,
    /// Gmail answers 429 / 403 rate limits.
    gmail_rate_limited,
    /// Gmail 5xx, timeouts and connection failures.
    gmail_transient_errors,
    /// Scheduler ticks (each looks at every shard's schedule once).
    scheduler_ticks,
    /// Watches renewed by the scheduler.
    renewals,
    /// Watch renewals that failed (transient and permanent).
    renewal_failures,
    /// Watch conflicts answered with users.stop and another users.watch.
    watch_conflicts,
    /// Fallback syncs of silent mailboxes.
    fallback_syncs,
    /// Change entries written by fallback syncs (changes whose notification never came).
    fallback_changes,
    /// Mailboxes marked as needing attention by the scheduler.
    attention_marked,
    /// Gauge: watches expiring within the warn horizon while their renewal fails.
    watches_expiring_soon,
    /// Gauge: the soonest of those expirations (epoch ms; 0 = none).
    soonest_watch_expiry_ms,
    /// Gauge: registered mailboxes needing attention, in all shards (read by the scheduler
    /// with the expiring watches).
    mailboxes_attention,
    /// Quota governor: admissions and charges that fit the shared budgets.
    quota_granted,
    /// Deferred by the governor because the user's minute budget is spent.
    quota_deferred_user,
    /// Deferred because the user's in-flight slots are taken.
    quota_deferred_in_flight,
    /// Deferred because the project's minute or day budget is spent.
    quota_deferred_project,
    /// Deferred because a Gmail rate-limit answer blocked the budget.
    quota_deferred_blocked,
    /// Deferrals of notification-driven syncs (the same deferrals, by priority).
    quota_deferred_notification,
    /// Deferrals of watch renewals.
    quota_deferred_renewal,
    /// Deferrals of fallback syncs.
    quota_deferred_fallback,
    /// Gmail rate-limit answers fed back to the governor as blocks.
    quota_blocks,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// A sync committed after `took` (begin to its last commit).
    pub fn sync_committed(&self, took: Duration) {
        Counters::inc(&self.syncs);
        if let Some(r) = self.recorders.get() {
            r.sync_duration.record(took.as_secs_f64(), &[]);
        }
    }

    /// A notification acked because a commit of this process covered it, `latency` after its
    /// Pub/Sub publish time.
    pub(crate) fn committed_after(&self, latency: Duration) {
        if let Some(r) = self.recorders.get() {
            r.commit_latency.record(latency.as_secs_f64(), &[]);
        }
    }

    /// Whether an OTLP export reads these counters (none is built without an endpoint).
    pub fn exports_metrics(&self) -> bool {
        self.recorders.get().is_some()
    }

    /// Lets an OTLP export record its histograms; `false` if these counters already serve
    /// another export (a second `app::run` with the same counters), which then goes without.
    pub(crate) fn attach(&self, recorders: otlp::Recorders) -> bool {
        self.recorders.set(recorders).is_ok()
    }
}

/// The class of an HTTP answer (`http.response.status_class`): `2xx` ... `5xx`, or `none` when
/// no answer came (connection failure, timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StatusClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
    NoAnswer,
}

impl StatusClass {
    const ALL: [StatusClass; 6] = [
        StatusClass::Informational,
        StatusClass::Success,
        StatusClass::Redirection,
        StatusClass::ClientError,
        StatusClass::ServerError,
        StatusClass::NoAnswer,
    ];

    pub(crate) fn of(status: u16) -> StatusClass {
        match status {
            100..=199 => StatusClass::Informational,
            200..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirection,
            400..=499 => StatusClass::ClientError,
            500..=599 => StatusClass::ServerError,
            _ => StatusClass::NoAnswer,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            StatusClass::Informational => "1xx",
            StatusClass::Success => "2xx",
            StatusClass::Redirection => "3xx",
            StatusClass::ClientError => "4xx",
            StatusClass::ServerError => "5xx",
            StatusClass::NoAnswer => "none",
        }
    }
}

/// Every Gmail method, in the order of [`GmailCounters`]' slots.
const METHODS: [Method; 6] = [
    Method::GetProfile,
    Method::HistoryList,
    Method::MessagesList,
    Method::MessagesGet,
    Method::Watch,
    Method::Stop,
];

/// The method's name in Gmail's API reference (`gmail.method`).
pub(crate) fn method_name(method: Method) -> &'static str {
    match method {
        Method::GetProfile => "users.getProfile",
        Method::HistoryList => "users.history.list",
        Method::MessagesList => "users.messages.list",
        Method::MessagesGet => "users.messages.get",
        Method::Watch => "users.watch",
        Method::Stop => "users.stop",
    }
}

fn method_slot(method: Method) -> usize {
    METHODS
        .iter()
        .position(|m| *m == method)
        .expect("METHODS lists every method")
}

/// Gmail requests by (method, answer class) and quota units by method: one relaxed add each,
/// on fixed slots (no map, no lock). A batch part counts as one request of its method, as
/// Gmail's quota does.
#[derive(Debug, Default)]
pub struct GmailCounters {
    answers: [[AtomicU64; StatusClass::ALL.len()]; METHODS.len()],
    quota_units: [AtomicU64; METHODS.len()],
}

/// Requests of one method that got one class of answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GmailCallCount {
    pub method: &'static str,
    pub status_class: &'static str,
    pub calls: u64,
}

impl GmailCounters {
    /// `n` requests of `method` answered (or not) with `class`.
    pub(crate) fn answered(&self, method: Method, class: StatusClass, n: u64) {
        let class = StatusClass::ALL
            .iter()
            .position(|c| *c == class)
            .expect("ALL lists every class");
        self.answers[method_slot(method)][class].fetch_add(n, Relaxed);
    }

    /// `units` of quota spent on `method`.
    pub(crate) fn spent(&self, method: Method, units: u64) {
        self.quota_units[method_slot(method)].fetch_add(units, Relaxed);
    }

    /// Every (method, class) with at least one request.
    pub fn calls(&self) -> Vec<GmailCallCount> {
        let mut out = Vec::new();
        for (m, method) in METHODS.iter().enumerate() {
            for (c, class) in StatusClass::ALL.iter().enumerate() {
                let calls = self.answers[m][c].load(Relaxed);
                if calls > 0 {
                    out.push(GmailCallCount {
                        method: method_name(*method),
                        status_class: class.name(),
                        calls,
                    });
                }
            }
        }
        out
    }

    /// Quota units by method name, for every method that spent any.
    pub fn quota_units(&self) -> Vec<(&'static str, u64)> {
        METHODS
            .iter()
            .zip(&self.quota_units)
            .map(|(m, units)| (method_name(*m), units.load(Relaxed)))
            .filter(|(_, units)| *units > 0)
            .collect()
    }
}

/// Log-bucketed latency histogram (4 buckets per power of two, about ±10% resolution):
/// constant memory whatever the traffic.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; 160],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl LatencyHistogram {
    fn bucket(us: u64) -> usize {
        if us < 4 {
            return us as usize;
        }
        let log2 = 63 - us.leading_zeros() as usize;
        let frac = ((us >> (log2 - 2)) & 0b11) as usize;
        (log2 * 4 + frac).min(159)
    }

    fn bucket_floor(i: usize) -> u64 {
        if i < 4 {
            return i as u64;
        }
        let (log2, frac) = (i / 4, (i % 4) as u64);
        (1u64 << log2) + (frac << (log2 - 2))
    }

    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.buckets[Self::bucket(us)].fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// The lower bound of the bucket holding quantile `q` (0.0-1.0), or None if empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_micros(Self::bucket_floor(i)));
            }
        }
        None
    }
}

/// Logs one summary line every `every` until `stop`.
pub async fn log_summaries(
    counters: std::sync::Arc<Counters>,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => log_summary(&counters, "summary"),
        }
    }
}

/// One line with every counter and the publish → ack latency quantiles.
pub fn log_summary(counters: &Counters, message: &str) {
    let s = counters.snapshot();
    let ms = |h: &LatencyHistogram, q| h.quantile(q).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    tracing::info!(
        received = s.received,
        acked_without_work = s.acked_without_work,
        acked_after_sync = s.acked_after_sync,
        nacked = s.nacked,
        quarantined = s.quarantined,
        quarantined_history_ahead = s.quarantined_history_ahead,
        unknown_mailbox = s.unknown_mailbox,
        attention_mailbox = s.attention_mailbox,
        syncs = s.syncs,
        resyncs = s.resyncs,
        changes_written = s.changes_written,
        history_pages = s.history_pages,
        lease_busy = s.lease_busy,
        sync_errors_retryable = s.sync_errors_retryable,
        sync_errors_permanent = s.sync_errors_permanent,
        gmail_calls = s.gmail_calls,
        gmail_quota_units = s.gmail_quota_units,
        gmail_rate_limited = s.gmail_rate_limited,
        gmail_transient_errors = s.gmail_transient_errors,
        renewals = s.renewals,
        renewal_failures = s.renewal_failures,
        watch_conflicts = s.watch_conflicts,
        fallback_syncs = s.fallback_syncs,
        fallback_changes = s.fallback_changes,
        watches_expiring_soon = s.watches_expiring_soon,
        mailboxes_attention = s.mailboxes_attention,
        // tracing takes at most 32 fields: the governor's deferrals as one sum (the counters
        // by reason and priority are in the snapshot).
        quota_deferred =
            s.quota_deferred_notification + s.quota_deferred_renewal + s.quota_deferred_fallback,
        quota_blocks = s.quota_blocks,
        ack_latency_p50_ms = ms(&counters.ack_latency, 0.5),
        ack_latency_p99_ms = ms(&counters.ack_latency, 0.99),
        handling_latency_p50_ms = ms(&counters.handling_latency, 0.5),
        handling_latency_p99_ms = ms(&counters.handling_latency, 0.99),
        "{message}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log lines `body` writes, formatted as [`init_logging`]'s logger formats them (into
    /// memory, with no filter), one JSON value per line.
    pub(super) fn log_lines(body: impl FnOnce()) -> Vec<Value> {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(SpanJsonFields)
            .event_format(CloudLoggingJson)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, body);
        let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn log_lines_carry_cloud_logging_fields_and_span_fields() {
        let lines = log_lines(|| {
            let span = tracing::info_span!("sync", mailbox = "abc", from = 7u64);
            span.in_scope(|| tracing::warn!(changes = 3u64, "sync failed, will retry"));
        });
        let line = &lines[0];
        assert_eq!(line["severity"], "WARNING");
        assert_eq!(line["message"], "sync failed, will retry");
        assert_eq!(line["mailbox"], "abc");
        assert_eq!(line["from"], 7);
        assert_eq!(line["changes"], 3);
        assert_eq!(line["span"], "sync");
        assert!(
            time::OffsetDateTime::parse(
                line["time"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339
            )
            .is_ok()
        );
    }

    #[test]
    fn histogram_quantiles_are_close() {
        let h = LatencyHistogram::default();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).unwrap().as_micros() as f64;
        let p99 = h.quantile(0.99).unwrap().as_micros() as f64;
        assert!((40_000.0..=50_000.0).contains(&p50), "{p50}");
        assert!((80_000.0..=99_000.0).contains(&p99), "{p99}");
        assert_eq!(h.count(), 100);
    }

    #[test]
    fn bucket_floor_is_inverse_of_bucket() {
        // Buckets 4..8 are unused: values 4..8 already get four buckets per power of two.
        for i in (0..4).chain(8..150) {
            assert_eq!(
                LatencyHistogram::bucket(LatencyHistogram::bucket_floor(i)),
                i
            );
        }
    }
}
