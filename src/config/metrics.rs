//! The metrics export settings: the standard `OTEL_*` variables that gmail-sync honours
//! (README "Metrics"), their value rules, and how they combine into [`MetricsSettings`].
//! `telemetry::otlp` builds the exporter from the result; nothing else reads these variables
//! (the OTLP exporter would read a few of them from the process environment itself, so every
//! one of those is also given to it explicitly).

use super::{ConfigError, Secret};
use std::fmt;
use std::time::Duration;

pub(super) const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub(super) const METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";
/// The path the OTLP/HTTP specification appends to `OTEL_EXPORTER_OTLP_ENDPOINT` for metrics.
const METRICS_PATH: &str = "v1/metrics";
/// `service.name` when neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES names one.
pub(crate) const DEFAULT_SERVICE_NAME: &str = "gmail-sync";

/// How metrics leave the process, and what they describe.
#[derive(Clone, Debug)]
pub struct MetricsSettings {
    pub export: MetricsExport,
    /// The resource attributes asked for (OTEL_RESOURCE_ATTRIBUTES, then `service.name` from
    /// OTEL_SERVICE_NAME), in order: a later one wins.
    pub resource: Vec<(String, String)>,
    /// POD_NAME: `k8s.pod.name` (unset: the host name, which Kubernetes sets to the pod's).
    pub pod_name: Option<String>,
}

/// Whether metrics are pushed over OTLP.
#[derive(Clone, Debug)]
pub enum MetricsExport {
    /// Nothing is built: no meter provider, no connection, no task.
    Off(ExportOff),
    Otlp(OtlpSettings),
}

/// Why metrics are not exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportOff {
    /// Neither OTEL_EXPORTER_OTLP_ENDPOINT nor OTEL_EXPORTER_OTLP_METRICS_ENDPOINT is set.
    NoEndpoint,
    /// OTEL_SDK_DISABLED=true.
    Disabled,
}

/// OTLP/HTTP with protobuf bodies (the only protocol built in).
#[derive(Clone, Debug)]
pub struct OtlpSettings {
    /// The full URL metrics are POSTed to.
    pub endpoint: String,
    /// Sent with every request; values are secrets (API keys, bearer tokens).
    pub headers: OtlpHeaders,
    /// Bound of one export, the exporter's retries included.
    pub timeout: Duration,
    pub interval: Duration,
    pub temporality: MetricTemporality,
}

impl MetricsSettings {
    /// One line for the startup log and `check-config`: where metrics go, never a header value.
    pub fn describe(&self) -> String {
        match &self.export {
            MetricsExport::Off(ExportOff::NoEndpoint) => {
                format!("not exported ({ENDPOINT} is not set)")
            }
            MetricsExport::Off(ExportOff::Disabled) => {
                "not exported (OTEL_SDK_DISABLED=true)".to_string()
            }
            MetricsExport::Otlp(otlp) => format!(
                "OTLP/HTTP protobuf to {} every {} ms",
                otlp.shown_endpoint(),
                otlp.interval.as_millis()
            ),
        }
    }
}

impl OtlpSettings {
    /// The endpoint as logs and `check-config` show it ([`shown_url`]).
    pub fn shown_endpoint(&self) -> String {
        shown_url(&self.endpoint)
    }
}

/// Scheme, host, port and path of a URL: its user, password or query may hold a credential.
pub fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(url) => format!(
            "{}://{}{}{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.port().map(|p| format!(":{p}")).unwrap_or_default(),
            url.path()
        ),
        Err(_) => "[unparsable URL]".to_string(),
    }
}

/// The aggregation temporality asked of the exporter
/// (OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricTemporality {
    Cumulative,
    Delta,
    LowMemory,
}

/// `key=value` headers; `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct OtlpHeaders(pub Vec<(String, Secret)>);

impl fmt::Debug for OtlpHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| format!("{name}: [redacted]")))
            .finish()
    }
}

/// The protocols of OTEL_EXPORTER_OTLP_PROTOCOL this build speaks: only `http/protobuf`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct HttpProtobuf;

/// The metrics variables, gathered for [`settings`].
pub(super) struct MetricsVariables {
    pub sdk_disabled: bool,
    pub endpoint: Option<String>,
    pub metrics_endpoint: Option<String>,
    pub headers: Option<OtlpHeaders>,
    pub metrics_headers: Option<OtlpHeaders>,
    pub timeout: Duration,
    pub metrics_timeout: Option<Duration>,
    pub interval: Duration,
    pub temporality: MetricTemporality,
    pub resource_attributes: Option<ResourceAttributes>,
    pub service_name: Option<String>,
    pub pod_name: Option<String>,
}

/// The rules between the variables: a signal-specific one (`..._METRICS_...`) wins over the
/// general one, as the OTLP exporter specification says; no endpoint, or the SDK disabled,
/// means no export.
pub(super) fn settings(v: MetricsVariables) -> Result<MetricsSettings, ConfigError> {
    let endpoint = match (v.metrics_endpoint, v.endpoint) {
        (Some(url), _) => Some(url),
        (None, Some(base)) => Some(metrics_url(&base)),
        (None, None) => None,
    };
    let export = match endpoint {
        _ if v.sdk_disabled => MetricsExport::Off(ExportOff::Disabled),
        None => MetricsExport::Off(ExportOff::NoEndpoint),
        Some(endpoint) => MetricsExport::Otlp(OtlpSettings {
            endpoint,
            headers: v.metrics_headers.or(v.headers).unwrap_or_default(),
            timeout: v.metrics_timeout.unwrap_or(v.timeout),
            interval: v.interval,
            temporality: v.temporality,
        }),
    };
    let mut resource = vec![("service.name".to_string(), DEFAULT_SERVICE_NAME.to_string())];
    resource.extend(v.resource_attributes.map(|a| a.0).unwrap_or_default());
    if let Some(name) = v.service_name {
        resource.push(("service.name".to_string(), name));
    }
    Ok(MetricsSettings {
        export,
        resource,
        pod_name: v.pod_name,
    })
}

/// The base URL with the metrics path appended to its path (a query stays a query).
fn metrics_url(base: &str) -> String {
    let mut url = reqwest::Url::parse(base).expect("checked by `endpoint`");
    let path = format!("{}/{METRICS_PATH}", url.path().trim_end_matches('/'));
    url.set_path(&path);
    url.to_string()
}

// The value rules (see the note above `integer` in config.rs).

/// `true` or `false` (any case).
pub(super) fn boolean(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected `true` or `false`".into()),
    }
}

/// An http:// or https:// URL with a host.
pub(super) fn endpoint(value: &str) -> Result<String, String> {
    let value = value.trim();
    match reqwest::Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {
            Ok(value.to_string())
        }
        _ => Err("expected an http:// or https:// URL of the collector's OTLP/HTTP port".into()),
    }
}

pub(super) fn protocol(value: &str) -> Result<HttpProtobuf, String> {
    match value.trim() {
        "http/protobuf" => Ok(HttpProtobuf),
        "grpc" | "http/json" => Err(format!(
            "expected `http/protobuf`: this build exports OTLP over HTTP with protobuf only (not \
             {}); point the endpoint at the collector's OTLP/HTTP port (4318 by default)",
            value.trim()
        )),
        _ => Err("expected `http/protobuf`".into()),
    }
}

/// `cumulative`, `delta` or `lowmemory` (any case), as the OTLP exporter specification names them.
pub(super) fn temporality(value: &str) -> Result<MetricTemporality, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "cumulative" => Ok(MetricTemporality::Cumulative),
        "delta" => Ok(MetricTemporality::Delta),
        "lowmemory" => Ok(MetricTemporality::LowMemory),
        _ => Err("expected `cumulative`, `delta` or `lowmemory`".into()),
    }
}

/// `key=value,key=value` with URL-encoded values (W3C Baggage style, as the OTLP exporter
/// specification says). The refusal never repeats a value: they are secrets.
pub(super) fn headers(value: &str) -> Result<OtlpHeaders, String> {
    let pairs = key_values(value, "headers")?;
    for (name, value) in &pairs {
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if !name.chars().all(token) {
            return Err(format!(
                "expected header names of letters, digits and -, got {name:?}"
            ));
        }
        if value.chars().any(|c| c.is_ascii_control() || !c.is_ascii()) {
            return Err(format!(
                "the value of header {name:?} has characters a header cannot carry"
            ));
        }
    }
    Ok(OtlpHeaders(
        pairs
            .into_iter()
            .map(|(name, value)| (name, Secret::new(value)))
            .collect(),
    ))
}

/// OTEL_RESOURCE_ATTRIBUTES: `key=value,...`, values URL-encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ResourceAttributes(Vec<(String, String)>);

pub(super) fn resource_attributes(value: &str) -> Result<ResourceAttributes, String> {
    key_values(value, "resource attributes").map(ResourceAttributes)
}

/// Comma-separated `key=value` pairs, keys trimmed and non-empty, values trimmed and
/// percent-decoded.
fn key_values(value: &str, what: &str) -> Result<Vec<(String, String)>, String> {
    let expected = || format!("expected {what} as key=value pairs separated by commas");
    value
        .split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').ok_or_else(expected)?;
            let key = key.trim();
            if key.is_empty() {
                return Err(expected());
            }
            let value = percent_decode(value.trim()).ok_or_else(|| {
                format!("{} (the value of {key:?} is badly URL-encoded)", expected())
            })?;
            Ok((key.to_string(), value))
        })
        .collect()
}

/// `%XX` escapes decoded (UTF-8); `None` for a broken escape.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;
    use std::collections::HashMap;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        Config::from_lookup(|k| map.get(k).map(|v| v.to_string()))
    }

    fn otlp(c: &Config) -> &OtlpSettings {
        match &c.metrics.export {
            MetricsExport::Otlp(o) => o,
            other => panic!("expected an export, got {other:?}"),
        }
    }

    #[test]
    fn no_endpoint_means_no_export() {
        let c = load(&[]).unwrap();
        assert!(matches!(
            c.metrics.export,
            MetricsExport::Off(ExportOff::NoEndpoint)
        ));
        assert_eq!(
            c.metrics.describe(),
            format!("not exported ({ENDPOINT} is not set)")
        );
    }

    #[test]
    fn the_base_endpoint_gets_the_metrics_path_and_the_metrics_endpoint_is_used_as_given() {
        for base in ["http://collector:4318", "http://collector:4318/"] {
            let c = load(&[(ENDPOINT, base)]).unwrap();
            assert_eq!(otlp(&c).endpoint, "http://collector:4318/v1/metrics");
        }
        let c = load(&[(ENDPOINT, "https://gw.example/otlp/?tenant=a")]).unwrap();
        assert_eq!(
            otlp(&c).endpoint,
            "https://gw.example/otlp/v1/metrics?tenant=a"
        );
        let c = load(&[
            (ENDPOINT, "http://collector:4318"),
            (METRICS_ENDPOINT, "https://other:443/custom"),
        ])
        .unwrap();
        assert_eq!(otlp(&c).endpoint, "https://other:443/custom");
    }

    #[test]
    fn defaults_follow_the_specification() {
        let c = load(&[(ENDPOINT, "http://collector:4318")]).unwrap();
        let o = otlp(&c);
        assert_eq!(o.interval, Duration::from_secs(60));
        assert_eq!(o.timeout, Duration::from_secs(10));
        assert_eq!(o.temporality, MetricTemporality::Cumulative);
        assert!(o.headers.0.is_empty());
        assert_eq!(
            c.metrics.resource,
            vec![("service.name".to_string(), "gmail-sync".to_string())]
        );
    }

    #[test]
    fn signal_specific_variables_win() {
        let c = load(&[
            (ENDPOINT, "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
            ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "b=2"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "5000"),
            ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "2000"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
            ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "Delta"),
        ])
        .unwrap();
        let o = otlp(&c);
        assert_eq!(o.headers.0, vec![("b".to_string(), Secret::new("2"))]);
        assert_eq!(o.timeout, Duration::from_millis(2000));
        assert_eq!(o.interval, Duration::from_millis(500));
        assert_eq!(o.temporality, MetricTemporality::Delta);
    }

    #[test]
    fn sdk_disabled_turns_the_export_off() {
        let c = load(&[
            (ENDPOINT, "http://collector:4318"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ])
        .unwrap();
        assert!(matches!(
            c.metrics.export,
            MetricsExport::Off(ExportOff::Disabled)
        ));
        let c = load(&[
            (ENDPOINT, "http://collector:4318"),
            ("OTEL_SDK_DISABLED", "false"),
        ])
        .unwrap();
        otlp(&c);
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            ("OTEL_SDK_DISABLED", "yes"),
            (ENDPOINT, "collector:4318"),
            (METRICS_ENDPOINT, "ftp://collector/"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
            ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "bad name=1"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
            ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "ten"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "10"),
            (
                "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
                "sometimes",
            ),
            ("OTEL_RESOURCE_ATTRIBUTES", "a=%zz"),
        ] {
            let e = load(&[(name, value)]).unwrap_err();
            assert_eq!(e.name, name, "{e}");
        }
        let e = load(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap_err();
        assert!(e.problem.contains("http/protobuf"), "{e}");
    }

    #[test]
    fn header_values_are_secret() {
        let c = load(&[
            (ENDPOINT, "http://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-api-key=s3cr3t-value,authorization=Bearer%20tok3n",
            ),
        ])
        .unwrap();
        let o = otlp(&c);
        assert_eq!(o.headers.0[1].1.expose(), "Bearer tok3n");
        let shown = format!("{c:?} {}", c.metrics.describe());
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("tok3n"),
            "{shown}"
        );
        assert!(shown.contains("x-api-key"), "{shown}");
        // A refused value is not echoed either.
        let e = load(&[("OTEL_EXPORTER_OTLP_HEADERS", "x=s3cr3t\u{7}")]).unwrap_err();
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
    }

    #[test]
    fn the_endpoint_is_shown_without_credentials() {
        let c = load(&[(
            METRICS_ENDPOINT,
            "https://user:pw@collector:4318/v1/metrics?key=k",
        )])
        .unwrap();
        assert_eq!(
            otlp(&c).shown_endpoint(),
            "https://collector:4318/v1/metrics"
        );
        assert!(!c.metrics.describe().contains("pw"));
    }

    #[test]
    fn service_name_wins_over_resource_attributes_which_win_over_the_default() {
        let c = load(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "service.name=from-attrs, team=mail%2Fsync",
        )])
        .unwrap();
        let last = |c: &Config, key: &str| {
            c.metrics
                .resource
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(last(&c, "service.name").as_deref(), Some("from-attrs"));
        assert_eq!(last(&c, "team").as_deref(), Some("mail/sync"));
        let c = load(&[
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs"),
            ("OTEL_SERVICE_NAME", "from-name"),
            ("POD_NAME", "gmail-sync-7d9f-abcde"),
        ])
        .unwrap();
        assert_eq!(last(&c, "service.name").as_deref(), Some("from-name"));
        assert_eq!(c.metrics.pod_name.as_deref(), Some("gmail-sync-7d9f-abcde"));
    }
}
