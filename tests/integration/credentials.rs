//! Real Gmail credentials against the simulator's token endpoint (which verifies JWT
//! signatures, `sub`, scopes and refresh tokens) and its fake IAM Credentials `signJwt`:
//! domain-wide delegation signed with a key file and keyless, the startup checks, single-flight
//! token refresh, the mass-failure guard, and no secret in any output.

use crate::harness::{Bed, BedOptions, CATCH_UP, DEV_TOKEN, emails, eventually, settle};
use gmail_sync::mailbox::Mailbox;
use gmail_sync_testbed::gmail::{Endpoint, IamSigner, SimConfig};
use gmail_sync_testbed::keys::ServiceAccount;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const METADATA_SCOPE: &str = "https://www.googleapis.com/auth/gmail.metadata";
const DELEGATE: &str = "gmail-sync-delegate@testbed.iam.gserviceaccount.com";
/// Our code never reads a key file's `token_uri` (GMAIL_SYNC_TOKEN_URL says where to go).
const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

fn scratch_dir(label: &str) -> PathBuf {
    gmail_sync_testbed::process::fresh_dir(label).expect("scratch dir")
}

/// A simulator that accepts delegation JWTs of `sa` for the metadata scope only (what the
/// Workspace admin authorized).
fn delegation_sim(sa: &ServiceAccount) -> SimConfig {
    SimConfig {
        service_account_public_key_pem: Some(sa.public_key_pem.clone()),
        service_account_email: Some(sa.email.clone()),
        delegation_scopes: Some(vec![METADATA_SCOPE.to_string()]),
        ..SimConfig::default()
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn key_file_env(key: &Path, probe: &str) -> Vec<(String, String)> {
    env(&[
        // Empty counts as unset: no development token next to real credentials.
        ("GMAIL_SYNC_DEV_ACCESS_TOKEN", ""),
        ("GMAIL_SYNC_DELEGATION_KEY_FILE", &key.display().to_string()),
        ("GMAIL_SYNC_PROBE_MAILBOX", probe),
    ])
}

fn cli(bed: &Bed, args: &[&str], overrides: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gmail-sync"))
        .args(args)
        .envs(bed.env_with(overrides))
        .output()
        .expect("run gmail-sync")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every Gmail call was made with a token the simulator issued for that very mailbox (never the
/// development token).
fn gmail_calls_used_issued_tokens(bed: &Bed) {
    let ledger = bed.sim.ledger();
    let gmail_calls: Vec<_> = ledger
        .calls()
        .into_iter()
        .filter(|c| !matches!(c.endpoint, Endpoint::Token | Endpoint::IamSignJwt))
        .collect();
    assert!(!gmail_calls.is_empty());
    for c in gmail_calls {
        let bearer = c.bearer.as_deref().unwrap_or_default();
        assert!(bearer.starts_with("ya29.sim-"), "{c:?}");
        assert_ne!(bearer, DEV_TOKEN);
        assert!(c.status < 400, "{c:?}");
    }
}

/// Domain-wide delegation with a locally generated key: the simulator verifies each assertion's
/// signature, `sub` and scope, and the worker syncs every mailbox as its own user; a key the
/// simulator does not know, or a scope the admin did not authorize, stops `check-config` and
/// `run` with exit 2 and a message saying what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegation_with_a_key_file_syncs_each_mailbox_as_its_user() {
    let sa = ServiceAccount::generate(DELEGATE).unwrap();
    let dir = scratch_dir("deleg");
    let key = sa
        .write_key_file(&dir, "key.json", GOOGLE_TOKEN_URI)
        .unwrap();
    let mailboxes = emails("deleg", 4);
    let mut bed = Bed::with(
        "deleg",
        BedOptions {
            sim: delegation_sim(&sa),
            worker_env: key_file_env(&key, &mailboxes[0]),
            ..BedOptions::default()
        },
    )
    .await;
    for m in &mailboxes {
        bed.sim.add_mailbox(m);
    }
    let ok = cli(&bed, &["check-config", "--json"], &[]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    let check = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(check("redis")["ok"], true, "{report}");
    assert_eq!(check("gmail_credentials")["ok"], true, "{report}");
    assert!(
        check("gmail_credentials")["detail"]
            .as_str()
            .unwrap()
            .contains("minted for the probe mailbox"),
        "{report}"
    );
    assert!(
        report["credentials"]
            .as_str()
            .unwrap()
            .contains("domain-wide delegation"),
        "{report}"
    );

    bed.add_mailboxes(&mailboxes).await;
    let exchanges_before = bed.sim.ledger().calls_to(Endpoint::Token).len();
    let worker = bed.start_worker().await;
    for m in &mailboxes {
        for _ in 0..3 {
            bed.sim.deliver(m, &["INBOX"]);
        }
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    bed.check_against_ledger().await.unwrap();
    gmail_calls_used_issued_tokens(&bed);
    // The worker: its startup probe, then one exchange per mailbox (tokens live an hour).
    let exchanges = bed.sim.ledger().calls_to(Endpoint::Token).len() - exchanges_before;
    assert_eq!(exchanges, mailboxes.len() + 1, "token exchanges");
    worker.stop().await.unwrap();

    // A key the simulator does not know: refused, named, exit 2.
    let stranger = ServiceAccount::generate(DELEGATE).unwrap();
    let wrong = stranger
        .write_key_file(&dir, "wrong.json", GOOGLE_TOKEN_URI)
        .unwrap();
    let wrong = wrong.display().to_string();
    let out = cli(
        &bed,
        &["check-config"],
        &[("GMAIL_SYNC_DELEGATION_KEY_FILE", &wrong)],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("Invalid JWT Signature"),
        "{}",
        text(&out)
    );
    let out = cli(
        &bed,
        &["run"],
        &[("GMAIL_SYNC_DELEGATION_KEY_FILE", &wrong)],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // A scope the admin did not authorize: refused with what to do in the Admin console.
    let out = cli(
        &bed,
        &["check-config"],
        &[(
            "GMAIL_SYNC_GMAIL_SCOPES",
            "https://www.googleapis.com/auth/gmail.readonly",
        )],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("unauthorized_client") && said.contains("Domain-wide delegation"),
        "{said}"
    );

    // No output shows key material (a line from the middle of either private key).
    let key_line = |sa: &ServiceAccount| sa.private_key_pem.lines().nth(5).unwrap().to_string();
    for out in [&ok, &out] {
        assert!(!text(out).contains(&key_line(&sa)) && !text(out).contains(&key_line(&stranger)));
    }

    // A key file that is not a service-account key: startup refuses it, naming the variable.
    std::fs::write(
        dir.join("client.json"),
        r#"{"installed":{"client_id":"x"}}"#,
    )
    .unwrap();
    let client = dir.join("client.json").display().to_string();
    let out = cli(
        &bed,
        &["check-config"],
        &[("GMAIL_SYNC_DELEGATION_KEY_FILE", &client)],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("GMAIL_SYNC_DELEGATION_KEY_FILE"),
        "{}",
        text(&out)
    );
}

/// Keyless delegation (Workload Identity): no delegation key in the worker; the assertion is
/// signed by IAM Credentials `signJwt`, called with Application Default Credentials (here a
/// caller service-account key, which the fake IAM verifies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_delegation_signs_through_iam_sign_jwt() {
    let delegate = ServiceAccount::generate(DELEGATE).unwrap();
    let caller =
        ServiceAccount::generate("gmail-sync-workload@testbed.iam.gserviceaccount.com").unwrap();
    let dir = scratch_dir("keyless");
    let adc = caller
        .write_key_file(&dir, "adc.json", GOOGLE_TOKEN_URI)
        .unwrap();
    let mut sim = delegation_sim(&delegate);
    sim.iam_signer = Some(IamSigner {
        service_account: delegate.email.clone(),
        private_key_pem: delegate.private_key_pem.clone(),
        key_id: delegate.key_id.clone(),
        caller_public_key_pem: caller.public_key_pem.clone(),
    });
    let mailboxes = emails("keyless", 3);
    let adc = adc.display().to_string();
    let mut bed = Bed::with(
        "keyless",
        BedOptions {
            sim,
            worker_env: env(&[
                ("GMAIL_SYNC_DEV_ACCESS_TOKEN", ""),
                ("GMAIL_SYNC_DELEGATION_SERVICE_ACCOUNT", DELEGATE),
                ("GMAIL_SYNC_PROBE_MAILBOX", &mailboxes[0]),
                ("GOOGLE_APPLICATION_CREDENTIALS", &adc),
            ]),
            ..BedOptions::default()
        },
    )
    .await;
    for m in &mailboxes {
        bed.sim.add_mailbox(m);
    }
    // ADC is read from the environment: the worker and the admin command run as processes
    // with GOOGLE_APPLICATION_CREDENTIALS (this test process keeps its own environment).
    let worker = bed.spawn_worker_process("keyless", &[]);
    bed.wait_ready(&[&worker]).await;
    let mut args = vec!["mailbox", "add"];
    args.extend(mailboxes.iter().map(String::as_str));
    let added = cli(&bed, &args, &[]);
    assert_eq!(added.status.code(), Some(0), "{}", text(&added));
    for m in &mailboxes {
        let cursor = bed.cursor(m).await.unwrap().expect("registered");
        bed.baselines.insert(m.clone(), cursor);
    }
    for m in &mailboxes {
        bed.sim.deliver(m, &["INBOX"]);
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    bed.check_against_ledger().await.unwrap();
    gmail_calls_used_issued_tokens(&bed);
    let signed = bed.sim.ledger().calls_to(Endpoint::IamSignJwt).len();
    assert!(signed >= mailboxes.len(), "{signed} signJwt calls");
    assert!(
        bed.sim
            .ledger()
            .calls_to(Endpoint::IamSignJwt)
            .iter()
            .all(|c| c.status == 200)
    );
    worker.terminate(Duration::from_secs(30)).await;

    // The workload may not sign for another account: the startup check says which role.
    let out = cli(
        &bed,
        &["check-config"],
        &[(
            "GMAIL_SYNC_DELEGATION_SERVICE_ACCOUNT",
            "someone-else@testbed.iam.gserviceaccount.com",
        )],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("roles/iam.serviceAccountTokenCreator"),
        "{}",
        text(&out)
    );
}

/// A thousand notifications of one mailbox in one burst: one token exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_for_one_mailbox_costs_one_token_exchange() {
    let sa = ServiceAccount::generate(DELEGATE).unwrap();
    let dir = scratch_dir("flight");
    let key = sa
        .write_key_file(&dir, "key.json", GOOGLE_TOKEN_URI)
        .unwrap();
    let mailbox = emails("flight", 1).remove(0);
    let mut bed = Bed::with(
        "flight",
        BedOptions {
            sim: delegation_sim(&sa),
            worker_env: env(&[
                ("GMAIL_SYNC_DEV_ACCESS_TOKEN", ""),
                ("GMAIL_SYNC_DELEGATION_KEY_FILE", &key.display().to_string()),
            ]),
            ..BedOptions::default()
        },
    )
    .await;
    bed.add_mailboxes(std::slice::from_ref(&mailbox)).await;
    let before = bed
        .sim
        .ledger()
        .calls_to_for(Endpoint::Token, &mailbox)
        .len();
    let worker = bed.start_worker().await;
    let top = bed.sim.burst(&mailbox, 20).last().copied().unwrap();
    for i in 0..1000u64 {
        let payload = format!(
            r#"{{"emailAddress":"{mailbox}","historyId":"{}"}}"#,
            top - i % 20
        );
        bed.publish(payload.as_bytes()).await;
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    bed.check_against_ledger().await.unwrap();
    let exchanges = bed
        .sim
        .ledger()
        .calls_to_for(Endpoint::Token, &mailbox)
        .len()
        - before;
    assert_eq!(exchanges, 1, "token exchanges for one mailbox");
    worker.stop().await.unwrap();
}

/// Every mailbox answers 403 insufficientPermissions (a wrong scope): that is the deployment's
/// fault, so the worker goes not-ready, marks no mailbox, commits and acks nothing, and a
/// worker with the right scope later finds everything (the notifications were kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_failure_marks_no_mailbox_and_keeps_the_notifications() {
    let sa = ServiceAccount::generate(DELEGATE).unwrap();
    let dir = scratch_dir("mass");
    let key = sa
        .write_key_file(&dir, "key.json", GOOGLE_TOKEN_URI)
        .unwrap();
    let mailboxes = emails("mass", 8);
    let mut bed = Bed::with(
        "mass",
        BedOptions {
            // The admin authorized any scope; the deployment asks for the wrong one.
            sim: SimConfig {
                delegation_scopes: None,
                ..delegation_sim(&sa)
            },
            worker_env: key_file_env(&key, &mailboxes[0]),
            ..BedOptions::default()
        },
    )
    .await;
    bed.add_mailboxes(&mailboxes).await;
    let wrong_scope = [
        (
            "GMAIL_SYNC_GMAIL_SCOPES",
            "https://www.googleapis.com/auth/gmail.send",
        ),
        // Short enough that, without the guard, every mailbox would be marked in the test.
        ("GMAIL_SYNC_FAILURE_SETTLE_SECS", "2"),
        // Fallback syncs would hide whether notifications were kept.
        ("GMAIL_SYNC_FALLBACK_SILENCE_SECS", "86400"),
        // The shortest lease: a message this worker still leases when it stops (its Pub/Sub
        // client lives on in this test process) comes back within a minute at the latest.
        ("GMAIL_SYNC_MAX_LEASE_SECS", "60"),
    ];
    let broken = bed.start_worker_with(&wrong_scope).await;
    for m in &mailboxes {
        bed.sim.deliver(m, &["INBOX"]);
    }
    let ready_file = broken.health_dir.join("ready");
    assert!(
        eventually(Duration::from_secs(60), || !ready_file.exists()).await,
        "the worker stayed ready through a mass failure"
    );
    // Past the settle time a few times over: still nothing marked.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let store = bed.store().await;
    for m in &mailboxes {
        let status = store
            .status(&Mailbox::parse(m).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.attention, None, "{m} was marked");
        assert_eq!(status.cursor.get(), bed.baselines[m], "{m}'s cursor moved");
    }
    assert!(
        bed.entries()
            .await
            .iter()
            .all(|e| e.get("kind") != "mailbox_attention"),
        "a lifecycle entry was written"
    );
    let s = broken.snapshot();
    assert_eq!(s.acked_after_sync + s.attention_mailbox, 0, "{s:?}");

    // The scope fixed: everything the broken worker held is found. The fixed worker attaches
    // before the broken one stops: the emulator may route messages to a stream that was just
    // cancelled (shared/reference/emulator.md, "stale streams") unless another is attached.
    let fixed = bed
        .start_worker_with(&[("GMAIL_SYNC_FALLBACK_SILENCE_SECS", "86400")])
        .await;
    broken.stop().await.unwrap();
    // Up to the broken worker's longest lease, then the ordinary catch-up.
    if let Err(e) = bed.wait_caught_up(CATCH_UP + Duration::from_secs(60)).await {
        panic!("{e}; broken {s:?}; fixed {:?}", fixed.snapshot());
    }
    settle(&fixed).await;
    bed.check_against_ledger().await.unwrap();
    fixed.stop().await.unwrap();
}

const CLIENT_ID: &str = "1234-testbed.apps.googleusercontent.com";
const CLIENT_SECRET: &str = "GOCSPX-client-secret-never-log-me";

/// A bed in refresh-token mode: the simulator knows the OAuth client; the worker has its id,
/// its secret (from a file) and a token key.
async fn refresh_token_bed(label: &str, dir: &Path) -> (Bed, PathBuf) {
    let (key_text, _) = gmail_sync::vault::generate_key_file();
    let key = dir.join("token-key");
    std::fs::write(&key, key_text.as_bytes()).unwrap();
    let secret = dir.join("client-secret");
    std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
    let bed = Bed::with(
        label,
        BedOptions {
            sim: SimConfig {
                oauth_client: Some((CLIENT_ID.into(), CLIENT_SECRET.into())),
                ..SimConfig::default()
            },
            worker_env: env(&[
                ("GMAIL_SYNC_DEV_ACCESS_TOKEN", ""),
                ("GMAIL_SYNC_OAUTH_CLIENT_ID", CLIENT_ID),
                (
                    "GMAIL_SYNC_OAUTH_CLIENT_SECRET_FILE",
                    &secret.display().to_string(),
                ),
                ("GMAIL_SYNC_TOKEN_KEY_FILE", &key.display().to_string()),
            ]),
            ..BedOptions::default()
        },
    )
    .await;
    (bed, key)
}

/// `mailbox add EMAIL --refresh-token-file FILE` as an operator runs it, after the owner
/// authorized the app (the simulator learns the refresh token).
fn register_with_refresh_token(
    bed: &mut Bed,
    dir: &Path,
    email: &str,
    token: &str,
    overrides: &[(&str, &str)],
    outputs: &mut Vec<String>,
) {
    if !bed.sim.has_mailbox(email) {
        bed.sim.add_mailbox(email);
    }
    bed.sim.add_refresh_token(token, email);
    let file = dir.join(format!("{email}.token"));
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let out = cli(
        bed,
        &[
            "mailbox",
            "add",
            email,
            "--refresh-token-file",
            &file.display().to_string(),
        ],
        overrides,
    );
    outputs.push(text(&out));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    std::fs::remove_file(file).unwrap();
}

async fn adopt_baselines(bed: &mut Bed, mailboxes: &[String]) {
    for m in mailboxes {
        if !bed.baselines.contains_key(m) {
            let cursor = bed.cursor(m).await.unwrap().expect("registered");
            bed.baselines.insert(m.clone(), cursor);
        }
    }
}

/// Per-user refresh tokens end to end: registration with the token, syncs as each user; a
/// revoked grant puts that mailbox (only) in needs-reauthorization with an event in its
/// stream and no more Gmail calls; re-registering it with a new token resumes from its stored
/// cursor, so the mail of the gap is found (ledger match). No secret appears in any output, in
/// the change stream or in trace-level logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_tokens_end_to_end_with_revocation_and_reauthorization() {
    let dir = scratch_dir("refresh");
    let (mut bed, key) = refresh_token_bed("refresh", &dir).await;
    let mailboxes = emails("refresh", 3);
    let tokens: Vec<String> = (0..3)
        .map(|i| format!("1//refresh-token-{i}-never-log-me"))
        .collect();
    let mut outputs = Vec::new();
    for (m, t) in mailboxes.iter().zip(&tokens) {
        register_with_refresh_token(&mut bed, &dir, m, t, &[], &mut outputs);
    }
    adopt_baselines(&mut bed, &mailboxes).await;
    // check-config with the secret given as a variable: the checks pass, the value is redacted.
    let checked = cli(
        &bed,
        &["check-config", "--json"],
        &[
            ("GMAIL_SYNC_OAUTH_CLIENT_SECRET_FILE", ""),
            ("GMAIL_SYNC_OAUTH_CLIENT_SECRET", CLIENT_SECRET),
            ("RUST_LOG", "trace"),
        ],
    );
    outputs.push(text(&checked));
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked));
    let report: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap();
    let setting = report["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "GMAIL_SYNC_OAUTH_CLIENT_SECRET")
        .cloned()
        .unwrap();
    assert_eq!(setting["value"], "[redacted]", "{report}");
    let worker = bed.spawn_worker_process("refresh", &[("RUST_LOG", "trace")]);
    bed.wait_ready(&[&worker]).await;
    for m in &mailboxes {
        bed.sim.deliver(m, &["INBOX"]);
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    bed.check_against_ledger().await.unwrap();

    // The owner of the first mailbox revokes the app.
    let revoked = &mailboxes[0];
    bed.sim.revoke_refresh_token(&tokens[0]);
    bed.sim.deliver(revoked, &["INBOX"]);
    let store = bed.store().await;
    let m0 = Mailbox::parse(revoked).unwrap();
    let mut marked = false;
    for _ in 0..600 {
        let status = store.status(&m0).await.unwrap().unwrap();
        if status.attention_kind.as_deref() == Some("needs_reauthorization") {
            assert!(status.attention.unwrap().contains("invalid_grant"));
            marked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(marked, "the revoked mailbox was not marked");
    let status = cli(&bed, &["mailbox", "status", revoked, "--json"], &[]);
    outputs.push(text(&status));
    let shown: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(shown["attention_kind"], "needs_reauthorization", "{shown}");
    let human = cli(&bed, &["mailbox", "status", revoked], &[]);
    outputs.push(text(&human));
    assert!(
        text(&human).contains("needs reauthorization"),
        "{}",
        text(&human)
    );
    let event = bed
        .entries()
        .await
        .into_iter()
        .find(|e| e.get("kind") == "mailbox_attention" && e.get("mailbox") == revoked.as_str())
        .expect("a mailbox_attention entry");
    assert_eq!(event.get("attention"), "needs_reauthorization");
    // The others are unaffected; the revoked one costs no more Gmail calls.
    let calls_of_revoked = bed
        .sim
        .ledger()
        .calls_to_for(Endpoint::HistoryList, revoked)
        .len();
    for m in &mailboxes {
        bed.sim.deliver(m, &["INBOX"]);
    }
    bed.wait_caught_up_of(&mailboxes[1..], CATCH_UP)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        bed.sim
            .ledger()
            .calls_to_for(Endpoint::HistoryList, revoked)
            .len(),
        calls_of_revoked,
        "Gmail was called for a mailbox that needs reauthorization"
    );

    // The owner authorizes again; the operator registers the new token: it resumes from the
    // stored cursor and the gap's mail arrives.
    register_with_refresh_token(
        &mut bed,
        &dir,
        revoked,
        "1//refresh-token-0b-never-log-me",
        &[],
        &mut outputs,
    );
    bed.sim.deliver(revoked, &["INBOX"]);
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    bed.check_against_ledger().await.unwrap();
    worker.terminate(Duration::from_secs(30)).await;

    // No secret anywhere: CLI outputs, the worker's trace-level log, the change streams.
    let log = std::fs::read_to_string(worker.log_path()).unwrap();
    let streams = format!(
        "{:?}",
        bed.entries()
            .await
            .iter()
            .map(|e| &e.fields)
            .collect::<Vec<_>>()
    );
    let mut secrets: Vec<String> = tokens.clone();
    secrets.push("1//refresh-token-0b-never-log-me".into());
    secrets.push(CLIENT_SECRET.into());
    secrets.push(std::fs::read_to_string(&key).unwrap().trim().to_string());
    secrets.extend(
        bed.sim
            .ledger()
            .calls()
            .iter()
            .filter_map(|c| c.bearer.clone()),
    );
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "the worker log holds a secret"
        );
        assert!(
            !streams.contains(secret.as_str()),
            "the change stream holds a secret"
        );
        for out in &outputs {
            assert!(
                !out.contains(secret.as_str()),
                "a command printed a secret: {out}"
            );
        }
    }
    // Cloud Logging has no TRACE severity: trace and debug events are both DEBUG.
    assert!(
        log.contains(r#""severity":"DEBUG""#),
        "the log was not at trace level"
    );
}

/// `keys rotate` while a worker syncs (on both keys), then a worker on the new key alone: every
/// mailbox keeps working (new access tokens are minted from the resealed refresh tokens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_under_load_keeps_every_mailbox_working() {
    let dir = scratch_dir("rotate");
    let (mut bed, old_key) = refresh_token_bed("rotate", &dir).await;
    let mailboxes = emails("rotate", 6);
    // Every mailbox is due for a fallback sync 1 s after its last look, whichever process set
    // it (the registration, `during`, `after`): the worker after the rotation must not depend
    // on notifications, which the emulator may keep routing to `during`'s cancelled stream for
    // minutes (shared/reference/emulator.md). With the defaults the first look came 900 s
    // after registration and `after` waited for notifications alone.
    let quick_fallback = [
        ("GMAIL_SYNC_SCHEDULER_TICK_MS", "100"),
        ("GMAIL_SYNC_FALLBACK_SILENCE_SECS", "1"),
        ("GMAIL_SYNC_FALLBACK_JITTER_SECS", "0"),
    ];
    let mut outputs = Vec::new();
    for (i, m) in mailboxes.iter().enumerate() {
        let token = format!("1//rotate-{i}");
        register_with_refresh_token(&mut bed, &dir, m, &token, &quick_fallback, &mut outputs);
    }
    adopt_baselines(&mut bed, &mailboxes).await;
    let (new_text, new_id) = gmail_sync::vault::generate_key_file();
    let new_key = dir.join("token-key-new");
    std::fs::write(&new_key, new_text.as_bytes()).unwrap();
    let (old, new) = (old_key.display().to_string(), new_key.display().to_string());
    let both = [
        ("GMAIL_SYNC_TOKEN_KEY_FILE", new.as_str()),
        ("GMAIL_SYNC_TOKEN_KEY_PREVIOUS_FILE", old.as_str()),
    ];
    let during_env: Vec<(&str, &str)> = both.iter().chain(&quick_fallback).copied().collect();
    let during = bed.start_worker_with(&during_env).await;
    let traffic = {
        let sim = bed.sim.clone();
        let mailboxes = mailboxes.clone();
        tokio::spawn(async move {
            for round in 0..20 {
                for m in &mailboxes {
                    sim.deliver(m, &["INBOX"]);
                }
                // Pacing: mail keeps arriving across the rotation.
                tokio::time::sleep(Duration::from_millis(100 + round % 3)).await;
            }
        })
    };
    // Tokens expire mid-rotation, so the worker must open refresh tokens during it.
    bed.sim.expire_access_tokens(None);
    let rotated = cli(&bed, &["keys", "rotate", "--json"], &both);
    assert_eq!(rotated.status.code(), Some(0), "{}", text(&rotated));
    traffic.await.unwrap();
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&during).await;
    during.stop().await.unwrap();
    let store = bed.store().await;
    for m in &mailboxes {
        let sealed = store
            .credential(&Mailbox::parse(m).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(gmail_sync::vault::sealed_key_id(&sealed).unwrap(), new_id);
    }
    // The old key is gone; access tokens lapse; everything still syncs. The emulator may
    // keep routing new messages to the stream `during` just cancelled (a stale stream: see
    // shared/reference/emulator.md) and hand them over only minutes later, so this worker may
    // be driven by its fallback sync (every mailbox is due 1 s after its last look) rather than
    // by notifications: the token path it proves is the same.
    bed.sim.expire_access_tokens(None);
    let mut after_env = vec![("GMAIL_SYNC_TOKEN_KEY_FILE", new.as_str())];
    after_env.extend_from_slice(&quick_fallback);
    let after = bed.start_worker_with(&after_env).await;
    for m in &mailboxes {
        bed.sim.deliver(m, &["INBOX"]);
    }
    if let Err(behind) = bed.wait_caught_up(CATCH_UP).await {
        panic!(
            "{behind}; the worker on the new key: {:?}",
            after.snapshot()
        );
    }
    bed.check_against_ledger().await.unwrap();
    let s = after.snapshot();
    assert_eq!(s.attention_mailbox, 0, "{s:?}");
    assert_eq!(s.sync_errors_permanent, 0, "{s:?}");
    after.stop().await.unwrap();
}
