//! `gmail-sync check-config [--json]`: the effective configuration (secrets redacted), then the
//! same startup checks `run` makes before it consumes anything: Redis answers, the Pub/Sub
//! subscription is usable with these credentials, and a Gmail token can be minted with the
//! chosen credential mode. Exit 0 if all pass, 2 if any fails (each failure says what to fix).

use crate::app::{STARTUP_DEADLINE, check_credentials, connect_store, credentials};
use crate::config::{Config, MetricsExport, variables};
use serde::Serialize;

#[derive(Serialize)]
struct Setting {
    name: &'static str,
    /// The value in effect; `[redacted]` for a secret that is set.
    value: Option<String>,
    /// `environment`, `default` or `unset`.
    source: &'static str,
}

#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

/// The effective metrics setup (`config::MetricsSettings`), never a header value.
#[derive(Serialize)]
struct Metrics {
    /// One line: where metrics go, or why they do not.
    summary: String,
    /// The URL metrics are pushed to, without credentials; `None`: not exported.
    endpoint: Option<String>,
    protocol: Option<&'static str>,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    temporality: Option<String>,
    /// The names of the headers sent (their values are secrets).
    headers: Vec<String>,
    /// The resource attributes asked for, in order (a later one wins); `telemetry.sdk.*`,
    /// `service.version` and `k8s.pod.name` are added at startup.
    resource: Vec<(String, String)>,
}

fn metrics(config: &Config) -> Metrics {
    let m = &config.metrics;
    let otlp = match &m.export {
        MetricsExport::Otlp(otlp) => Some(otlp),
        MetricsExport::Off(_) => None,
    };
    Metrics {
        summary: m.describe(),
        endpoint: otlp.map(|o| o.shown_endpoint()),
        protocol: otlp.map(|_| "http/protobuf"),
        interval_ms: otlp.map(|o| o.interval.as_millis() as u64),
        timeout_ms: otlp.map(|o| o.timeout.as_millis() as u64),
        temporality: otlp.map(|o| format!("{:?}", o.temporality).to_lowercase()),
        headers: otlp
            .map(|o| o.headers.0.iter().map(|(name, _)| name.clone()).collect())
            .unwrap_or_default(),
        resource: m.resource.clone(),
    }
}

#[derive(Serialize)]
struct Report {
    credentials: String,
    metrics: Metrics,
    settings: Vec<Setting>,
    checks: Vec<Check>,
}

/// What each variable is set to, as `run` sees it.
fn settings(config: &Config, lookup: &dyn Fn(&str) -> Option<String>) -> Vec<Setting> {
    variables()
        .iter()
        .map(|v| {
            let given = lookup(v.name).filter(|value| !value.trim().is_empty());
            let (value, source) = match (given, v.default) {
                (Some(value), _) => (Some(value), "environment"),
                (None, Some(default)) => (Some(default.to_string()), "default"),
                (None, None) => (None, "unset"),
            };
            let value = match value {
                // A Redis URL may hold a password: the part without it is still useful.
                Some(_)
                    if v.name == "GMAIL_SYNC_REDIS_URL"
                        || v.name == "GMAIL_SYNC_REDIS_CLUSTER_NODES" =>
                {
                    Some(config.redis.describe())
                }
                // So may a collector's URL (a password, an API key in the query).
                Some(url)
                    if v.name == "OTEL_EXPORTER_OTLP_ENDPOINT"
                        || v.name == "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT" =>
                {
                    Some(crate::config::shown_url(&url))
                }
                Some(_) if v.secret => Some("[redacted]".to_string()),
                other => other,
            };
            Setting {
                name: v.name,
                value,
                source,
            }
        })
        .collect()
}

async fn checks(config: &Config) -> Vec<Check> {
    let mut checks = Vec::new();
    let store = match connect_store(config).await {
        Ok(store) => {
            checks.push(Check {
                name: "redis",
                ok: true,
                detail: format!("{} answers", config.redis.describe()),
            });
            Some(store)
        }
        Err(e) => {
            checks.push(Check {
                name: "redis",
                ok: false,
                detail: format!("{e:#}"),
            });
            None
        }
    };
    match &config.subscription {
        Some(subscription) => {
            let checked = crate::consumer::subscription::check(
                &config.pubsub,
                subscription,
                STARTUP_DEADLINE,
            )
            .await;
            checks.push(Check {
                name: "pubsub",
                ok: checked.is_ok(),
                detail: match checked {
                    Ok(()) => format!("{subscription} is usable"),
                    Err(e) => format!(
                        "{e} (check GMAIL_SYNC_SUBSCRIPTION, and that the workload's identity \
                         has roles/pubsub.subscriber on it)"
                    ),
                },
            });
        }
        None => checks.push(Check {
            name: "pubsub",
            ok: false,
            detail: "GMAIL_SYNC_SUBSCRIPTION is not set (required by `run`)".into(),
        }),
    }
    // Credentials read refresh tokens from Redis; without Redis the grant modes still build
    // (the check mints no per-user token).
    let Some(store) = store else {
        checks.push(Check {
            name: "gmail_credentials",
            ok: false,
            detail: "not checked: Redis is needed first".into(),
        });
        return checks;
    };
    let verified = match credentials(config, &store) {
        Ok(credentials) => check_credentials(config, &credentials).await,
        Err(e) => Err(e),
    };
    checks.push(match verified {
        Ok(verified) => Check {
            name: "gmail_credentials",
            ok: true,
            detail: verified.join("; "),
        },
        Err(e) => Check {
            name: "gmail_credentials",
            ok: false,
            detail: e.to_string(),
        },
    });
    checks
}

pub(crate) async fn execute(config: &Config, json: bool) -> i32 {
    let lookup = |name: &str| std::env::var(name).ok();
    let report = Report {
        credentials: config.auth.describe(),
        metrics: metrics(config),
        settings: settings(config, &lookup),
        checks: checks(config).await,
    };
    let failed = report.checks.iter().any(|c| !c.ok);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("the report serializes")
        );
    } else {
        println!("Gmail credentials: {}", report.credentials);
        println!("Metrics: {}", report.metrics.summary);
        println!("Settings:");
        for s in &report.settings {
            println!(
                "  {} = {} ({})",
                s.name,
                s.value.as_deref().unwrap_or("-"),
                s.source
            );
        }
        println!("Checks:");
        for c in &report.checks {
            println!(
                "  [{}] {}: {}",
                if c.ok { "ok" } else { "FAILED" },
                c.name,
                c.detail
            );
        }
    }
    // Failures also on stderr, where scripts and humans look for errors.
    for c in report.checks.iter().filter(|c| !c.ok) {
        eprintln!("gmail-sync: check {} failed: {}", c.name, c.detail);
    }
    if failed { 2 } else { 0 }
}
