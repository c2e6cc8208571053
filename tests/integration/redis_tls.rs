//! Redis over TLS with a login: `rediss://`, `GMAIL_SYNC_REDIS_CA_FILE`,
//! `GMAIL_SYNC_REDIS_USERNAME` and `GMAIL_SYNC_REDIS_PASSWORD_FILE` against real TLS-only
//! `redis-server`s (a single one and a cluster with TLS on its bus) whose CA and certificate
//! the test bed makes at start; and what an operator sees when the CA, the password or the
//! scheme is wrong, which never shows the password.

use crate::harness::{Bed, BedOptions, CATCH_UP, emails, settle};
use gmail_sync::config::{Config, RedisTarget};
use gmail_sync::mailbox::Mailbox;
use gmail_sync::store::{Store, StoreError};
use gmail_sync_testbed::bed::RedisChoice;
use gmail_sync_testbed::pki::TestPki;
use gmail_sync_testbed::process::fresh_dir;
use gmail_sync_testbed::redis_server::{self, LOGIN_USER, RedisServer, Security};
use std::collections::HashMap;
use std::process::Command;
use tokio::sync::OnceCell;

/// One TLS-only server with a login for the tests that only connect.
async fn secured_server() -> &'static RedisServer {
    static SERVER: OnceCell<RedisServer> = OnceCell::const_new();
    SERVER
        .get_or_init(|| async {
            let security = Security {
                tls: true,
                login: true,
            };
            tokio::task::spawn_blocking(move || RedisServer::start_with(security))
                .await
                .unwrap()
                .expect("TLS redis-server")
        })
        .await
}

fn config(pairs: &[(&str, String)]) -> Config {
    let env: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    Config::from_lookup(|k| env.get(k).cloned()).expect("valid config")
}

/// The server's variables (URL, CA file, user, password file) with `overrides` on top.
fn secured_config(server: &RedisServer, overrides: &[(&str, String)]) -> Config {
    let mut env: Vec<(String, String)> = vec![("GMAIL_SYNC_REDIS_URL".into(), server.url())];
    env.extend(server.secured().env());
    for (k, v) in overrides {
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v.clone()));
    }
    let pairs: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    config(&pairs)
}

fn ca_file(server: &RedisServer) -> String {
    let pki = server.secured().pki.as_ref().expect("a TLS server");
    pki.ca_file.display().to_string()
}

fn password(server: &RedisServer) -> String {
    let login = server
        .secured()
        .login
        .as_ref()
        .expect("a server with a login");
    login.password.clone()
}

/// A file holding `contents`, in a fresh directory.
fn file_with(name: &str, contents: &str) -> String {
    let path = fresh_dir("redis-tls-files").unwrap().join(name);
    std::fs::write(&path, contents).unwrap();
    path.display().to_string()
}

/// `Store::connect`'s error, which must be a [`StoreError::Connect`].
async fn connect_error(config: &Config) -> String {
    match Store::connect(&config.redis, &config.store).await {
        Ok(_) => panic!("connected to {}", config.redis.describe()),
        Err(e @ StoreError::Connect { .. }) => e.to_string(),
        Err(other) => panic!("not a connect error: {other:?}"),
    }
}

/// The store end to end over TLS: a login from the password file (with its newline) or
/// from the URL, the host as an IP address or a name of the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_works_over_tls_with_a_password_from_a_file_or_the_url() {
    let server = secured_server().await;
    let mailbox = Mailbox::parse("tls-store@example.com").unwrap();
    let with_newline = file_with("password", &format!("{}\n", password(server)));
    let url_login = server.url().replace(
        "rediss://",
        &format!("rediss://{LOGIN_USER}:{}@", password(server)),
    );
    let configs = [
        secured_config(server, &[]),
        secured_config(server, &[("GMAIL_SYNC_REDIS_PASSWORD_FILE", with_newline)]),
        config(&[
            ("GMAIL_SYNC_REDIS_URL", url_login),
            ("GMAIL_SYNC_REDIS_CA_FILE", ca_file(server)),
        ]),
        secured_config(
            server,
            &[(
                "GMAIL_SYNC_REDIS_URL",
                server.url().replace("127.0.0.1", "localhost"),
            )],
        ),
    ];
    for config in configs {
        let store = Store::connect(&config.redis, &config.store)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", config.redis.describe()));
        store.ping().await.unwrap();
        assert_eq!(store.cursor(&mailbox).await.unwrap(), None);
        assert!(!store.is_active(&mailbox).await.unwrap());
        assert!(!format!("{config:?} {}", config.redis.describe()).contains(&password(server)));
    }
}

/// A worker (started as `main` starts one) syncs through a TLS-only Redis with the password
/// file; the real binary with a wrong password file stops at startup (exit 1) saying that
/// authentication failed, without either password, and with a missing one refuses the
/// configuration (exit 2) naming the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_syncs_through_tls_redis_with_a_password_file() {
    let mut bed = Bed::with(
        "tls",
        BedOptions {
            redis: RedisChoice::Secured,
            ..BedOptions::default()
        },
    )
    .await;
    let env: HashMap<String, String> = bed.env().into_iter().collect();
    assert!(env["GMAIL_SYNC_REDIS_URL"].starts_with("rediss://127.0.0.1:"));
    assert!(env.contains_key("GMAIL_SYNC_REDIS_CA_FILE"));
    assert!(env.contains_key("GMAIL_SYNC_REDIS_PASSWORD_FILE"));
    let mailboxes = emails("tls", 4);
    bed.add_mailboxes(&mailboxes).await;
    let worker = bed.start_worker().await;
    for m in &mailboxes {
        bed.sim.deliver(m, &["INBOX"]);
        bed.sim.burst(m, 2);
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    assert_eq!(bed.check_against_ledger().await.unwrap(), 12);
    worker.stop().await.unwrap();

    let right = bed.redis.secured().login.as_ref().unwrap().password.clone();
    let wrong = "wrong-password-5d1c";
    let bin = env!("CARGO_BIN_EXE_gmail-sync");
    let out = Command::new(bin)
        .arg("run")
        .envs(bed.env())
        .env("GMAIL_SYNC_REDIS_PASSWORD_FILE", file_with("wrong", wrong))
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("authentication at rediss://127.0.0.1:"),
        "{all}"
    );
    assert!(all.contains("GMAIL_SYNC_REDIS_PASSWORD_FILE"), "{all}");
    assert!(!all.contains(wrong) && !all.contains(&right), "{all}");

    let out = Command::new(bin)
        .arg("run")
        .envs(bed.env())
        .env(
            "GMAIL_SYNC_REDIS_PASSWORD_FILE",
            "/nonexistent/redis-password",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("GMAIL_SYNC_REDIS_PASSWORD_FILE") && stderr.contains("readable file"),
        "{stderr}"
    );
}

/// The same pipeline on a three-master cluster that speaks TLS only, on the cluster bus too
/// (`--tls-cluster yes`), with the CA file and the password file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_syncs_through_a_tls_cluster_with_a_password_file() {
    let mut bed = Bed::with(
        "tls-cluster",
        BedOptions {
            redis: RedisChoice::SecuredCluster,
            ..BedOptions::default()
        },
    )
    .await;
    let env: HashMap<String, String> = bed.env().into_iter().collect();
    assert!(
        env["GMAIL_SYNC_REDIS_CLUSTER_NODES"]
            .split(',')
            .all(|n| n.starts_with("rediss://"))
    );
    let mailboxes = emails("tls-cluster", 6);
    bed.add_mailboxes(&mailboxes).await;
    let worker = bed.start_worker().await;
    for m in &mailboxes {
        bed.sim.deliver(m, &["INBOX"]);
        bed.sim.burst(m, 2);
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    assert_eq!(bed.check_against_ledger().await.unwrap(), 18);
    worker.stop().await.unwrap();

    // A cluster with another CA fails the handshake the same way a single node does.
    let other = TestPki::generate(&fresh_dir("tls-cluster-other-ca").unwrap(), "other").unwrap();
    let config = bed.config_with(&[(
        "GMAIL_SYNC_REDIS_CA_FILE",
        other.ca_file.display().to_string().as_str(),
    )]);
    let err = connect_error(&config).await;
    assert!(
        err.contains("TLS handshake with cluster[rediss://"),
        "{err}"
    );
    assert!(err.contains("not signed by a trusted CA"), "{err}");
}

/// A CA that did not sign the server certificate (another one, or the system's roots) fails
/// the TLS handshake, and the error says so and what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_the_tls_handshake_clearly() {
    let server = secured_server().await;
    let other = TestPki::generate(&fresh_dir("other-ca").unwrap(), "other").unwrap();
    let other_ca = other.ca_file.display().to_string();
    let err = connect_error(&secured_config(
        server,
        &[("GMAIL_SYNC_REDIS_CA_FILE", other_ca.clone())],
    ))
    .await;
    let at = server.url().trim_end_matches('/').to_string();
    assert!(
        err.starts_with(&format!(
            "TLS handshake with {at} failed: the server certificate is not signed by a trusted CA"
        )),
        "{err}"
    );
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(
        err.contains(&format!(
            "check that GMAIL_SYNC_REDIS_CA_FILE ({other_ca}) holds"
        )),
        "{err}"
    );

    let err = connect_error(&config(&[("GMAIL_SYNC_REDIS_URL", server.url())])).await;
    assert!(err.contains("not signed by a trusted CA"), "{err}");
    assert!(err.contains("set GMAIL_SYNC_REDIS_CA_FILE"), "{err}");
}

/// A wrong password (from the file or the URL) or none at all fails with an authentication
/// error naming what to check; no password appears in the error or in `describe()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_password_fails_clearly_and_is_never_shown() {
    let server = secured_server().await;
    let right = password(server);
    let wrong = "not-the-password-8e2b";

    let from_file = secured_config(
        server,
        &[("GMAIL_SYNC_REDIS_PASSWORD_FILE", file_with("wrong", wrong))],
    );
    let in_url = config(&[
        (
            "GMAIL_SYNC_REDIS_URL",
            server
                .url()
                .replace("rediss://", &format!("rediss://{LOGIN_USER}:{wrong}@")),
        ),
        ("GMAIL_SYNC_REDIS_CA_FILE", ca_file(server)),
    ]);
    for (config, source) in [
        (&from_file, "the password in GMAIL_SYNC_REDIS_PASSWORD_FILE"),
        (&in_url, "the password in the URL"),
    ] {
        let err = connect_error(config).await;
        assert!(
            err.contains("failed: Redis refused the user or password"),
            "{err}"
        );
        assert!(err.contains(source), "{err}");
        for shown in [
            err,
            config.redis.describe(),
            format!("{:?}", config.redis),
            format!("{config:?}"),
        ] {
            assert!(!shown.contains(wrong) && !shown.contains(&right), "{shown}");
        }
    }

    let none = config(&[
        ("GMAIL_SYNC_REDIS_URL", server.url()),
        ("GMAIL_SYNC_REDIS_CA_FILE", ca_file(server)),
    ]);
    let err = connect_error(&none).await;
    assert!(
        err.contains("Redis requires a password, none was given"),
        "{err}"
    );
    assert!(err.contains("set GMAIL_SYNC_REDIS_PASSWORD_FILE"), "{err}");
}

/// redis:// on the TLS port and rediss:// on a plain port: the error points at the scheme.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheme_that_does_not_match_the_port_is_explained() {
    let server = secured_server().await;
    let plain_url = server.url().replace("rediss://", "redis://");
    let err = connect_error(&config(&[("GMAIL_SYNC_REDIS_URL", plain_url)])).await;
    assert!(err.contains("closed the connection"), "{err}");
    assert!(
        err.contains("a port that serves TLS needs rediss://"),
        "{err}"
    );

    let plain = redis_server::shared().await.unwrap();
    let tls_url = plain.url().replace("redis://", "rediss://");
    let err = connect_error(&config(&[("GMAIL_SYNC_REDIS_URL", tls_url)])).await;
    assert!(err.contains("no answer from rediss://"), "{err}");
    assert!(
        err.contains("a rediss:// URL on a plain, non-TLS port"),
        "{err}"
    );
}

/// `describe()` of a target whose URL carries a password shows scheme, host and port only.
#[test]
fn describe_never_shows_a_url_password() {
    let c = config(&[(
        "GMAIL_SYNC_REDIS_CLUSTER_NODES",
        "rediss://u:hunter2@10.0.0.1:6380,rediss://u:hunter2@10.0.0.2:6380".into(),
    )]);
    let target: &RedisTarget = &c.redis;
    assert_eq!(
        target.describe(),
        "cluster[rediss://10.0.0.1:6380,rediss://10.0.0.2:6380]"
    );
    assert!(!format!("{target:?}").contains("hunter2"));
}
