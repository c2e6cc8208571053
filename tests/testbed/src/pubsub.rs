//! Google's Pub/Sub emulator (the real one, from the Cloud SDK) for tests, plus admin, publish
//! and drain helpers built on the official `google-cloud-pubsub` crate.
//!
//! One emulator per test binary ([`shared`]); every test makes its own topic and subscription
//! ([`unique_topic`]). Emulator quirks that matter to tests (see the project's emulator notes):
//! after a StreamingPull stream is cancelled (a process exit, or a client shutdown — that
//! includes [`drain`]), the emulator may keep routing new messages of that subscription to the
//! dead stream, so don't expect a later subscriber on the same subscription to receive new
//! messages promptly; start consumers before publishing; ack-deadline expiry costs ≥ 10 s.
//!
//! Clients are never cached in statics: tests run on separate tokio runtimes and a client's
//! background tasks die with the runtime that built them. Only the emulator process is shared.

use crate::process::{ChildGuard, find_on_path, free_port, fresh_dir, is_executable};
use anyhow::{Context, Result, anyhow, bail};
use google_cloud_pubsub::client::{Publisher, Subscriber, SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::ShutdownBehavior;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The project of every topic and subscription the test bed creates (the emulator accepts any).
pub const PROJECT: &str = "gmail-sync-test";

/// How long the emulator may take to start (JVM start; 1 s warm, 3–4 s cold, slower on a busy
/// 2-core CI machine).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound for a single admin or publish call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

const LAUNCHER_REL: &str = "platform/pubsub-emulator/bin/cloud-pubsub-emulator";
const DEBIAN_SDK_ROOT: &str = "/usr/lib/google-cloud-sdk";

fn install_hint() -> String {
    format!(
        "install the Pub/Sub emulator: the Debian package google-cloud-cli-pubsub-emulator \
         (sudo apt-get install -y google-cloud-cli-pubsub-emulator, from Google's Cloud SDK apt \
         repository) or `gcloud components install pubsub-emulator`; or set PUBSUB_EMULATOR_BIN \
         to the cloud-pubsub-emulator launcher (<sdk root>/{LAUNCHER_REL}). It needs a Java \
         runtime (java on PATH or JAVA_HOME), e.g. sudo apt-get install -y default-jre-headless"
    )
}

/// Path of the emulator launcher: `$PUBSUB_EMULATOR_BIN`, else `<sdk root>/platform/
/// pubsub-emulator/bin/cloud-pubsub-emulator` with the SDK root from `$CLOUDSDK_ROOT_DIR`, else
/// `/usr/lib/google-cloud-sdk` (Debian package), else `gcloud info` (if gcloud exists).
/// Also checks that Java is available. The error says how to install what is missing.
pub fn emulator_bin() -> Result<PathBuf> {
    let launcher = find_launcher()?;
    let java_home_ok = std::env::var_os("JAVA_HOME")
        .filter(|v| !v.is_empty())
        .is_some_and(|h| is_executable(&PathBuf::from(h).join("bin/java")));
    if !java_home_ok && find_on_path("java").is_none() {
        bail!(
            "the Pub/Sub emulator launcher {launcher:?} needs java, which is not on PATH \
             (and JAVA_HOME is not set to a JDK/JRE); {}",
            install_hint()
        );
    }
    Ok(launcher)
}

fn find_launcher() -> Result<PathBuf> {
    if let Some(v) = std::env::var_os("PUBSUB_EMULATOR_BIN").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        if is_executable(&p) {
            return Ok(p);
        }
        bail!(
            "PUBSUB_EMULATOR_BIN={p:?} is not an executable file; {}",
            install_hint()
        );
    }
    let mut tried = Vec::new();
    if let Some(root) = std::env::var_os("CLOUDSDK_ROOT_DIR").filter(|v| !v.is_empty()) {
        tried.push(PathBuf::from(root).join(LAUNCHER_REL));
    }
    tried.push(PathBuf::from(DEBIAN_SDK_ROOT).join(LAUNCHER_REL));
    if let Some(p) = tried.iter().find(|p| is_executable(p)) {
        return Ok(p.clone());
    }
    if let Some(gcloud) = find_on_path("gcloud") {
        // gcloud info takes ~1 s (Python); only reached when the usual places are empty.
        let out = Command::new(gcloud)
            .args(["info", "--format=value(installation.sdk_root)"])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output();
        if let Ok(out) = out {
            let root = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !root.is_empty() {
                let p = PathBuf::from(root).join(LAUNCHER_REL);
                if is_executable(&p) {
                    return Ok(p);
                }
                tried.push(p);
            }
        }
    }
    bail!(
        "Google's Pub/Sub emulator not found (looked at {tried:?}); {}",
        install_hint()
    )
}

/// A running Pub/Sub emulator on a free loopback port. Dropping it kills the JVM.
#[derive(Debug)]
pub struct Emulator {
    port: u16,
    child: ChildGuard,
}

impl Emulator {
    /// Starts the emulator (`--host=127.0.0.1 --port=PORT`, working directory of its own; the
    /// emulator has no data-dir flag and keeps everything in memory) and waits until a TCP
    /// connect works and a CreateTopic on a probe topic succeeds (≤ 60 s; the error carries
    /// the log tail). Retries on a fresh port if the port was taken meanwhile.
    pub async fn start() -> Result<Emulator> {
        let bin = emulator_bin()?;
        let mut last_err = None;
        for _ in 0..2 {
            let dir = fresh_dir("pubsub-emulator")?;
            let port = free_port();
            let mut cmd = Command::new(&bin);
            cmd.current_dir(&dir)
                .arg("--host=127.0.0.1")
                .arg(format!("--port={port}"));
            // Fewer JVM threads and a bounded heap on small CI machines, unless the caller
            // configured the JVM already.
            if std::env::var_os("CLOUD_PUBSUB_EMULATOR_OPTS").is_none() {
                cmd.env("CLOUD_PUBSUB_EMULATOR_OPTS", "-XX:+UseSerialGC -Xmx512m");
            }
            let child = ChildGuard::spawn("pubsub-emulator", cmd, &dir)?;
            let emulator = Emulator { port, child };
            match emulator.wait_ready().await {
                Ok(()) => return Ok(emulator),
                Err(e) => {
                    let port_taken = emulator
                        .child
                        .log_tail(50)
                        .contains("Address already in use");
                    last_err = Some(e);
                    drop(emulator);
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last: String;
        let probe = format!(
            "projects/{PROJECT}/topics/testbed-probe-{}",
            random_suffix()
        );
        loop {
            if let Some(status) = self.child.try_status() {
                bail!(
                    "the Pub/Sub emulator exited during start ({status}); log:\n{}",
                    self.child.log_tail(40)
                );
            }
            let connect = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(("127.0.0.1", self.port)),
            )
            .await;
            match connect {
                Ok(Ok(_)) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let per_try = remaining.min(Duration::from_secs(10));
                    match tokio::time::timeout(per_try, create_topic(&self.endpoint(), &probe))
                        .await
                    {
                        Ok(Ok(())) => return Ok(()),
                        Ok(Err(e)) => last = format!("CreateTopic failed: {e:#}"),
                        Err(_) => last = format!("CreateTopic timed out after {per_try:?}"),
                    }
                }
                Ok(Err(e)) => last = format!("connect: {e}"),
                Err(_) => last = "connect timed out".into(),
            }
            if Instant::now() >= deadline {
                bail!(
                    "the Pub/Sub emulator (pid {}, port {}) was not ready within \
                     {READY_TIMEOUT:?} ({last}); log:\n{}",
                    self.child.pid(),
                    self.port,
                    self.child.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `127.0.0.1:PORT` (the value for `PUBSUB_EMULATOR_HOST`).
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` (for `with_endpoint`: plaintext HTTP/2 and HTTP/1 JSON).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_running()
    }

    /// SIGKILL (never on the [`shared`] emulator: other tests use it).
    pub fn kill(&self) {
        self.child.kill();
    }

    /// The last `n` lines of the emulator's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.child.log_tail(n)
    }
}

/// One emulator per test binary, started on first use and never dropped (the reaper kills it
/// when the test binary exits). Only the process is shared, never a client. A start failure
/// is cached, so every test fails fast with the same message instead of waiting again.
pub async fn shared() -> Result<&'static Emulator> {
    static SHARED: tokio::sync::OnceCell<Result<Emulator, String>> =
        tokio::sync::OnceCell::const_new();
    let entry = SHARED
        .get_or_init(|| async { Emulator::start().await.map_err(|e| format!("{e:#}")) })
        .await;
    entry
        .as_ref()
        .map_err(|e| anyhow!("shared Pub/Sub emulator: {e}"))
}

fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..10)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect()
}

/// `projects/gmail-sync-test/topics/NAME` (a full name is returned unchanged).
pub fn topic_name(topic: &str) -> String {
    if topic.starts_with("projects/") {
        topic.to_owned()
    } else {
        format!("projects/{PROJECT}/topics/{topic}")
    }
}

/// `projects/gmail-sync-test/subscriptions/NAME` (a full name is returned unchanged).
pub fn subscription_name(subscription: &str) -> String {
    if subscription.starts_with("projects/") {
        subscription.to_owned()
    } else {
        format!("projects/{PROJECT}/subscriptions/{subscription}")
    }
}

fn anonymous() -> google_cloud_auth::credentials::Credentials {
    google_cloud_auth::credentials::anonymous::Builder::new().build()
}

fn is_already_exists(e: &google_cloud_pubsub::Error) -> bool {
    e.http_status_code() == Some(409) || e.status().is_some_and(|s| s.code as i32 == 6)
}

async fn bounded<T>(what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("{what}: no answer within {CALL_TIMEOUT:?}"))?
}

/// A `TopicAdmin` client for the emulator at `endpoint` (anonymous credentials).
pub async fn topic_admin(endpoint: &str) -> Result<TopicAdmin> {
    TopicAdmin::builder()
        .with_endpoint(endpoint)
        .with_credentials(anonymous())
        .build()
        .await
        .context("building TopicAdmin")
}

/// A `SubscriptionAdmin` client for the emulator at `endpoint` (anonymous credentials), e.g.
/// for subscriptions with a dead-letter policy or exactly-once delivery.
pub async fn subscription_admin(endpoint: &str) -> Result<SubscriptionAdmin> {
    SubscriptionAdmin::builder()
        .with_endpoint(endpoint)
        .with_credentials(anonymous())
        .build()
        .await
        .context("building SubscriptionAdmin")
}

/// Creates a topic (`topic` is a short name in [`PROJECT`] or a full `projects/P/topics/T`).
/// Idempotent: an existing topic is fine.
pub async fn create_topic(endpoint: &str, topic: &str) -> Result<()> {
    let name = topic_name(topic);
    bounded(&format!("CreateTopic {name}"), async {
        let admin = topic_admin(endpoint).await?;
        match admin.create_topic().set_name(&name).send().await {
            Ok(_) => Ok(()),
            Err(e) if is_already_exists(&e) => Ok(()),
            Err(e) => Err(anyhow!(e).context(format!("CreateTopic {name}"))),
        }
    })
    .await
}

/// Creates a pull subscription on `topic` with the given ack deadline (10–600 s). Names may be
/// short (in [`PROJECT`]) or full. Idempotent: an existing subscription is fine (its settings
/// are not checked).
pub async fn create_subscription(
    endpoint: &str,
    topic: &str,
    subscription: &str,
    ack_deadline_secs: i32,
) -> Result<()> {
    let topic = topic_name(topic);
    let name = subscription_name(subscription);
    bounded(&format!("CreateSubscription {name}"), async {
        let admin = subscription_admin(endpoint).await?;
        match admin
            .create_subscription()
            .set_name(&name)
            .set_topic(&topic)
            .set_ack_deadline_seconds(ack_deadline_secs)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_already_exists(&e) => Ok(()),
            Err(e) => Err(anyhow!(e).context(format!("CreateSubscription {name} on {topic}"))),
        }
    })
    .await
}

/// A topic and its subscription, both full resource names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestTopic {
    /// `projects/gmail-sync-test/topics/<label>-<random>`
    pub topic: String,
    /// `projects/gmail-sync-test/subscriptions/<label>-<random>-sub`
    pub subscription: String,
}

/// A fresh topic and subscription for one test (names `<label>-<random>`, so tests never share
/// them, even across runs against the same emulator).
pub async fn unique_topic(
    emulator: &Emulator,
    label: &str,
    ack_deadline_secs: i32,
) -> Result<TestTopic> {
    let base = format!("{label}-{}", random_suffix());
    let t = TestTopic {
        topic: topic_name(&base),
        subscription: subscription_name(&format!("{base}-sub")),
    };
    let endpoint = emulator.endpoint();
    create_topic(&endpoint, &t.topic).await?;
    create_subscription(&endpoint, &t.topic, &t.subscription, ack_deadline_secs).await?;
    Ok(t)
}

/// A `Publisher` for `topic` (short or full name) on the emulator at `endpoint`.
pub async fn publisher(endpoint: &str, topic: &str) -> Result<Publisher> {
    let name = topic_name(topic);
    bounded("building Publisher", async {
        Publisher::builder(name)
            .with_endpoint(endpoint)
            .with_credentials(anonymous())
            .build()
            .await
            .map_err(anyhow::Error::from)
    })
    .await
}

/// Publishes one message with `data` as its payload and waits for the server's message id.
pub async fn publish_raw(publisher: &Publisher, data: &[u8]) -> Result<String> {
    let msg = Message::new().set_data(bytes::Bytes::copy_from_slice(data));
    bounded("Publish", async {
        publisher.publish(msg).await.context("Publish")
    })
    .await
}

/// A `Subscriber` client for the emulator at `endpoint` (anonymous credentials). `Clone`; one
/// per test is enough.
pub async fn subscriber(endpoint: &str) -> Result<Subscriber> {
    bounded("building Subscriber", async {
        Subscriber::builder()
            .with_endpoint(endpoint)
            .with_credentials(anonymous())
            .build()
            .await
            .map_err(anyhow::Error::from)
    })
    .await
}

/// Attaches a StreamingPull subscriber to `subscription` (short or full name), acks and
/// collects message payloads (in arrival order) until no message arrived for `idle` or
/// `max_total` passed, then shuts the stream down (bounded; pending acks are flushed).
///
/// The idle clock starts at attach time, so allow for the stream to open within `idle`.
/// After a drain the emulator may treat the subscription as attached to a dead stream (see
/// the module docs): use it as the last reader of a subscription.
pub async fn drain(
    endpoint: &str,
    subscription: &str,
    idle: Duration,
    max_total: Duration,
) -> Result<Vec<Vec<u8>>> {
    let name = subscription_name(subscription);
    let client = subscriber(endpoint).await?;
    let mut stream = client
        .subscribe(name.clone())
        .set_max_lease_extension(Duration::from_secs(10))
        .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
        .build();
    let token = stream.shutdown_token();
    let deadline = Instant::now() + max_total;
    let mut out = Vec::new();
    let mut failure = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        match tokio::time::timeout(idle.min(remaining), stream.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(Ok((msg, handler)))) => {
                handler.ack();
                out.push(msg.data.to_vec());
            }
            Ok(Some(Err(e))) => {
                failure = Some(anyhow!(e).context(format!("StreamingPull on {name}")));
                break;
            }
        }
    }
    if tokio::time::timeout(Duration::from_secs(10), token.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(subscription = %name, "drain: subscriber shutdown took over 10 s");
    }
    drop(stream);
    match failure {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
