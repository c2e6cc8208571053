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
    broken.stop().await.unwrap();

    // The scope fixed: everything the broken worker held is found.
    let fixed = bed
        .start_worker_with(&[("GMAIL_SYNC_FALLBACK_SILENCE_SECS", "86400")])
        .await;
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&fixed).await;
    bed.check_against_ledger().await.unwrap();
    fixed.stop().await.unwrap();
}
