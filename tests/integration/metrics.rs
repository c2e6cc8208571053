//! Metrics over OTLP: a worker pushes its instruments to a loopback OTLP/HTTP receiver (the
//! test bed's collector stand-in, `testbed::otlp`), with the values of its own counters; a
//! collector that refuses everything costs one warning and no sync; nothing listens; without
//! an endpoint no export is built at all.

use crate::harness::{Bed, CATCH_UP, emails, eventually, settle};
use crate::processes::listening_sockets;
use gmail_sync_testbed::otlp::OtlpReceiver;
use std::time::Duration;

/// How long a test waits for exports to arrive (they come every 200-500 ms here).
const EXPORTS: Duration = Duration::from_secs(30);

/// Every instrument a worker exports once it has synced (the soonest-expiry gauge appears only
/// while renewals fail).
const INSTRUMENTS: &[&str] = &[
    "gmail_sync.notifications.received",
    "gmail_sync.notifications.acked",
    "gmail_sync.notifications.nacked",
    "gmail_sync.notifications.quarantined",
    "gmail_sync.syncs",
    "gmail_sync.sync.duration",
    "gmail_sync.changes.written",
    "gmail_sync.history.pages",
    "gmail_sync.gmail.calls",
    "gmail_sync.gmail.quota_units",
    "gmail_sync.gmail.rate_limited",
    "gmail_sync.lease.busy",
    "gmail_sync.resyncs",
    "gmail_sync.quota.admissions",
    "gmail_sync.quota.deferrals",
    "gmail_sync.quota.deferrals_by_priority",
    "gmail_sync.quota.blocks",
    "gmail_sync.scheduler.renewals",
    "gmail_sync.scheduler.fallback_syncs",
    "gmail_sync.watch.expiring",
    "gmail_sync.mailboxes.attention",
    "gmail_sync.notification.commit_latency",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instruments_arrive_at_a_local_receiver_with_the_workers_own_values() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let mut bed = Bed::start("otlp").await;
    let mailboxes = emails("otlp", 3);
    bed.add_mailboxes(&mailboxes).await;
    let endpoint = receiver.endpoint();
    let worker = bed
        .start_worker_with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-key=k%3Dv"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=test",
            ),
            ("POD_NAME", "gmail-sync-test-pod"),
        ])
        .await;
    assert!(worker.counters.exports_metrics());
    for m in &mailboxes {
        for _ in 0..3 {
            bed.sim.deliver(m, &["INBOX"]);
        }
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    // Periodic exports, while the worker runs: not only the last one at the stop.
    let written = worker.snapshot().changes_written as f64;
    assert!(
        eventually(EXPORTS, || receiver
            .value("gmail_sync.changes.written", &[])
            == Some(written))
        .await,
        "no export with {written} changes written arrived: {:?}",
        receiver.points("gmail_sync.changes.written")
    );
    let counters = worker.counters.clone();
    let exports_while_running = receiver.requests();
    worker.stop().await.unwrap();
    // The last export, after the drain, carries the final counts.
    assert!(receiver.requests() > exports_while_running);
    let s = counters.snapshot();
    assert_eq!(s.changes_written, 9, "{s:?}");
    assert!(s.syncs > 0 && s.acked_after_sync > 0, "{s:?}");

    let value = |name: &str, attributes: &[(&str, &str)]| {
        receiver
            .value(name, attributes)
            .unwrap_or_else(|| panic!("{name} {attributes:?}: {:?}", receiver.points(name)))
    };
    let reason = |r| [("gmail_sync.ack.reason", r)];
    assert_eq!(
        value("gmail_sync.notifications.received", &[]),
        s.received as f64
    );
    assert_eq!(
        value("gmail_sync.notifications.acked", &reason("after_sync")),
        s.acked_after_sync as f64
    );
    assert_eq!(
        value("gmail_sync.notifications.acked", &reason("without_work")),
        s.acked_without_work as f64
    );
    assert_eq!(
        value("gmail_sync.notifications.nacked", &[]),
        s.nacked as f64
    );
    assert_eq!(
        value("gmail_sync.changes.written", &[]),
        s.changes_written as f64
    );
    assert_eq!(
        value(
            "gmail_sync.syncs",
            &[("gmail_sync.sync.outcome", "committed")]
        ),
        s.syncs as f64
    );
    assert_eq!(value("gmail_sync.mailboxes.attention", &[]), 0.0);
    assert!(s.quota_granted > 0, "the governor admitted nothing: {s:?}");
    assert_eq!(
        value("gmail_sync.quota.admissions", &[]),
        s.quota_granted as f64
    );

    // Gmail calls by method and answer class, quota units by method: as counted.
    let calls = counters.gmail.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.method == "users.history.list" && c.status_class == "2xx"),
        "{calls:?}"
    );
    for c in &calls {
        assert_eq!(
            value(
                "gmail_sync.gmail.calls",
                &[
                    ("gmail.method", c.method),
                    ("http.response.status_class", c.status_class)
                ]
            ),
            c.calls as f64,
            "{c:?}"
        );
    }
    assert_eq!(
        calls.iter().map(|c| c.calls).sum::<u64>(),
        s.gmail_calls,
        "every request counted once by its answer"
    );
    for (method, units) in counters.gmail.quota_units() {
        assert_eq!(
            value("gmail_sync.gmail.quota_units", &[("gmail.method", method)]),
            units as f64
        );
    }
    assert_eq!(
        counters
            .gmail
            .quota_units()
            .iter()
            .map(|(_, u)| u)
            .sum::<u64>(),
        s.gmail_quota_units
    );

    // One sync-duration observation per committed sync, in the documented buckets.
    let durations = receiver.histogram("gmail_sync.sync.duration").unwrap();
    assert_eq!(durations.count, s.syncs);
    assert_eq!(durations.bounds.len(), 16);
    assert_eq!(durations.bucket_counts.iter().sum::<u64>(), s.syncs);
    let commits = receiver
        .histogram("gmail_sync.notification.commit_latency")
        .unwrap();
    assert!(
        commits.count > 0 && commits.count <= s.acked_after_sync,
        "{commits:?} vs {s:?}"
    );

    assert_eq!(
        receiver
            .unit("gmail_sync.notifications.received")
            .as_deref(),
        Some("{notification}")
    );
    assert_eq!(
        receiver.unit("gmail_sync.sync.duration").as_deref(),
        Some("s")
    );
    let names = receiver.metric_names();
    for name in INSTRUMENTS {
        assert!(names.contains(*name), "{name} missing from {names:?}");
    }

    let resource = receiver.resource();
    for wanted in [
        ("service.name", "gmail-sync"),
        ("service.version", env!("CARGO_PKG_VERSION")),
        ("k8s.pod.name", "gmail-sync-test-pod"),
        ("deployment.environment.name", "test"),
        ("telemetry.sdk.name", "opentelemetry"),
    ] {
        assert!(
            resource
                .iter()
                .any(|(k, v)| (k.as_str(), v.as_str()) == wanted),
            "{wanted:?} not in {resource:?}"
        );
    }
    let headers = receiver.last_headers();
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "x-collector-key" && v == "k=v"),
        "{headers:?}"
    );
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-type" && v == "application/x-protobuf"),
        "{headers:?}"
    );
}

/// Without an endpoint no meter provider, exporter or task is built: nothing can be exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported() {
    let (bed, email) = Bed::with_one_mailbox("otlp-off").await;
    let worker = bed
        .start_worker_with(&[("OTEL_METRIC_EXPORT_INTERVAL", "100")])
        .await;
    bed.sim.deliver(&email, &["INBOX"]);
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    assert!(!worker.counters.exports_metrics());
    // The counters work as before: the summary line carries them.
    assert_eq!(worker.snapshot().changes_written, 1);
    worker.stop().await.unwrap();
}

/// A collector that answers 503 to everything: the worker syncs as usual, logs one warning
/// however many exports fail, logs the recovery once, listens on nothing, and stops with exit
/// code 0 (its last export bounded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_in_trouble_costs_one_warning_and_no_sync() {
    let receiver = OtlpReceiver::start().await.unwrap();
    receiver.fail_with(Some(503));
    let mut bed = Bed::start("otlp-down").await;
    let mailboxes = emails("otlp-down", 2);
    bed.add_mailboxes(&mailboxes).await;
    let endpoint = receiver.endpoint();
    let w = bed.spawn_worker_process(
        "otlp-down",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
        ],
    );
    bed.wait_ready(&[&w]).await;
    for m in &mailboxes {
        bed.sim.deliver(m, &["INBOX"]);
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    assert!(
        eventually(EXPORTS, || receiver.refused() >= 5).await,
        "only {} exports were tried",
        receiver.refused()
    );
    // I8 with the export on: the worker connects out and listens on nothing.
    let listening = listening_sockets(w.pid());
    assert!(listening.is_empty(), "the worker listens: {listening:?}");
    receiver.fail_with(None);
    assert!(eventually(EXPORTS, || receiver.requests() > 0).await);
    w.sigterm();
    assert_eq!(
        w.wait_exit(Duration::from_secs(30))
            .await
            .and_then(|s| s.code()),
        Some(0)
    );
    let log = std::fs::read_to_string(w.log_path()).unwrap();
    let lines_with = |message: &str| {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .count()
    };
    assert_eq!(lines_with("metrics export failed;"), 1, "{log}");
    assert_eq!(lines_with("metrics export works again"), 1, "{log}");
}
