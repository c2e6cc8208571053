//! Refresh tokens sealed at rest: `keys generate`, `mailbox add --refresh-token-file`, what
//! Redis holds, `mailbox status`, `keys rotate` (the real binary) and the compare-and-set that
//! keeps a rotation from overwriting a token stored meanwhile; on one Redis and on a cluster.

use crate::harness::{Bed, BedOptions, emails};
use gmail_sync::config::Secret;
use gmail_sync::mailbox::Mailbox;
use gmail_sync::store::{KeyLayout, Replaced};
use gmail_sync::vault::{KeyId, Resealed, Vault, VaultError, generate_key_file, sealed_key_id};
use gmail_sync_testbed::bed::RedisChoice;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const KEY_FILE: &str = "GMAIL_SYNC_TOKEN_KEY_FILE";
const PREVIOUS_FILE: &str = "GMAIL_SYNC_TOKEN_KEY_PREVIOUS_FILE";

/// Every command's output, so the test can check that no token ever appears in it.
#[derive(Default)]
struct Transcript(Vec<Output>);

impl Transcript {
    /// `gmail-sync ARGS` with the bed's environment plus `env`, `stdin` fed in.
    fn run(&mut self, bed: &Bed, env: &[(&str, &str)], args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gmail-sync"))
            .args(args)
            .envs(bed.env_with(env))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        self.0.push(out.clone());
        out
    }

    fn assert_never_shows(&self, secrets: &[String]) {
        for out in &self.0 {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            for s in secrets {
                assert!(!text.contains(s.as_str()), "a secret in the output: {text}");
            }
        }
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {text}{}", stderr(out)))
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn vault_of(current: &Path, previous: Option<&Path>) -> Vault {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    Vault::from_key_texts(&read(current), previous.map(read).as_deref()).unwrap()
}

async fn raw_credential(bed: &Bed, mailbox: &Mailbox) -> Option<Vec<u8>> {
    redis::cmd("HGET")
        .arg(KeyLayout::new(&bed.prefix, bed.shards).credentials_of(mailbox))
        .arg(mailbox.as_str())
        .query_async(&mut bed.redis().await)
        .await
        .unwrap()
}

/// The whole operator path on one Redis, with a worker running through the rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_sealed_at_rest_and_keys_rotate_online() {
    let bed = Bed::start("vault").await;
    let mut t = Transcript::default();
    let dir = bed.dir.join("keys");
    std::fs::create_dir_all(&dir).unwrap();
    let (old, new, stranger) = (dir.join("old"), dir.join("new"), dir.join("stranger"));

    // keys generate: mode 0600, the id it prints is the key's, and it never overwrites.
    let mut ids: Vec<String> = Vec::new();
    for file in [&old, &new, &stranger] {
        let out = t.run(
            &bed,
            &[],
            &["keys", "generate", "--json", "--out", path_str(file)],
            "",
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let id = json(&out)["key_id"].as_str().unwrap().to_string();
        assert_eq!(id, vault_of(file, None).current_key_id().to_string());
        ids.push(id);
    }
    let key_texts: Vec<String> = [&old, &new, &stranger]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap().trim().to_string())
        .collect();
    let before = std::fs::read(&old).unwrap();
    let out = t.run(
        &bed,
        &[],
        &["keys", "generate", "--out", path_str(&old)],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("never overwritten"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(&old).unwrap(),
        before,
        "the key file is untouched"
    );

    // mailbox add --refresh-token-file: from files and from stdin, sealed with the old key.
    let mailboxes = emails("vault", 3);
    let tokens: Vec<String> = (0..mailboxes.len())
        .map(|i| format!("1//refresh-{}-{i}-do-not-show", bed.prefix))
        .collect();
    let with_old = [(KEY_FILE, path_str(&old))];
    for (i, (email, token)) in mailboxes.iter().zip(&tokens).enumerate() {
        bed.sim.add_mailbox(email);
        let out = if i == 0 {
            t.run(
                &bed,
                &with_old,
                &[
                    "mailbox",
                    "add",
                    "--json",
                    "--refresh-token-file",
                    "-",
                    email,
                ],
                &format!("{token}\n"),
            )
        } else {
            let file = dir.join(format!("token-{i}"));
            std::fs::write(&file, format!("{token}\n")).unwrap();
            t.run(
                &bed,
                &with_old,
                &[
                    "mailbox",
                    "add",
                    "--json",
                    "--refresh-token-file",
                    path_str(&file),
                    email,
                ],
                "",
            )
        };
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(json(&out)["mailbox"], email.as_str());
    }
    let parsed: Vec<Mailbox> = mailboxes
        .iter()
        .map(|m| Mailbox::parse(m).unwrap())
        .collect();
    let old_vault = vault_of(&old, None);
    for (m, token) in parsed.iter().zip(&tokens) {
        let raw = raw_credential(&bed, m).await.expect("a stored credential");
        assert!(
            !raw.windows(token.len()).any(|w| w == token.as_bytes()),
            "Redis holds the token in clear"
        );
        assert_eq!(sealed_key_id(&raw).unwrap(), old_vault.current_key_id());
        assert_eq!(old_vault.open(m, &raw).unwrap().expose(), token);
    }

    // status shows that a token is stored and which key sealed it.
    let out = t.run(
        &bed,
        &[],
        &["mailbox", "status", "--json", &mailboxes[0]],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let status = json(&out);
    assert_eq!(status["credential"]["stored"], true, "{status}");
    assert_eq!(status["credential"]["key_id"], ids[0].as_str(), "{status}");
    let out = t.run(&bed, &[], &["mailbox", "status", &mailboxes[0]], "");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("key id {}", ids[0])),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A wrong key fails clearly, in the library and in `keys rotate`, which then writes nothing.
    let raw = raw_credential(&bed, &parsed[0]).await.unwrap();
    let err = vault_of(&stranger, None)
        .open(&parsed[0], &raw)
        .unwrap_err();
    assert!(matches!(err, VaultError::UnknownKey { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("sealed with key id {}", ids[0]))
            && text.contains(&format!("{KEY_FILE} (id {})", ids[2]))
            && text.contains(PREVIOUS_FILE),
        "{text}"
    );
    let out = t.run(
        &bed,
        &[(KEY_FILE, path_str(&stranger))],
        &["keys", "rotate", "--json"],
        "",
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let summary = json(&out);
    assert_eq!(summary["failed"].as_array().unwrap().len(), 3, "{summary}");
    assert!(
        summary["failed"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("neither GMAIL_SYNC_TOKEN_KEY_FILE"),
        "{summary}"
    );
    assert!(
        stderr(&out).contains(&format!("keep {PREVIOUS_FILE}")),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        raw_credential(&bed, &parsed[0]).await.unwrap(),
        raw,
        "untouched"
    );

    // Rotation, online: a worker runs with both keys configured throughout.
    let rotating = [(KEY_FILE, path_str(&new)), (PREVIOUS_FILE, path_str(&old))];
    let worker = bed.spawn_worker_process("vault-worker", &rotating);
    bed.wait_ready(&[&worker]).await;
    let out = t.run(&bed, &rotating, &["keys", "rotate", "--json"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = json(&out);
    assert_eq!(summary["total"], 3, "{summary}");
    assert_eq!(summary["rotated"], 3, "{summary}");
    assert_eq!(summary["already_current"], 0, "{summary}");
    assert_eq!(summary["current_key_id"], ids[1].as_str(), "{summary}");
    assert!(
        summary["failed"].as_array().unwrap().is_empty(),
        "{summary}"
    );
    assert!(
        stderr(&out).contains("no longer needed"),
        "{}",
        stderr(&out)
    );
    // Every credential is now sealed with the new key, which alone opens it.
    let new_only = vault_of(&new, None);
    for (m, token) in parsed.iter().zip(&tokens) {
        let raw = raw_credential(&bed, m).await.unwrap();
        assert_eq!(sealed_key_id(&raw).unwrap(), new_only.current_key_id());
        assert_eq!(new_only.open(m, &raw).unwrap().expose(), token);
    }
    assert!(worker.is_ready(), "the worker kept running");
    worker.sigterm();
    let exit = worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(exit.and_then(|s| s.code()), Some(0));
    // A second run has nothing left to do, with the previous key gone.
    let out = t.run(&bed, &[(KEY_FILE, path_str(&new))], &["keys", "rotate"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 resealed")
            && String::from_utf8_lossy(&out.stdout).contains("3 already current"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // mailbox remove deletes the credential with the rest of the mailbox.
    let out = t.run(&bed, &[], &["mailbox", "remove", &mailboxes[2]], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(raw_credential(&bed, &parsed[2]).await, None);

    let mut secrets = tokens.clone();
    secrets.extend(key_texts);
    t.assert_never_shows(&secrets);
}

/// What `add --refresh-token-file` refuses, and a bad key file stopping startup (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_input_and_bad_key_files_are_refused() {
    let bed = Bed::start("vaultbad").await;
    let mut t = Transcript::default();
    let dir = bed.dir.join("keys");
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key");
    let (text, _) = generate_key_file();
    std::fs::write(&key, text.as_bytes()).unwrap();
    let short = dir.join("short");
    std::fs::write(&short, "c2hvcnQ=\n").unwrap();
    let [a, b]: [String; 2] = emails("vaultbad", 2).try_into().unwrap();
    let with_key = [(KEY_FILE, path_str(&key))];
    let secret = "1//a-token-never-shown";

    let out = t.run(
        &bed,
        &with_key,
        &["mailbox", "add", "--refresh-token-file", "-", &a, &b],
        secret,
    );
    assert_eq!(out.status.code(), Some(2), "one token per mailbox");
    assert!(stderr(&out).contains("exactly one"), "{}", stderr(&out));
    let out = t.run(
        &bed,
        &[],
        &["mailbox", "add", "--refresh-token-file", "-", &a],
        secret,
    );
    assert_eq!(out.status.code(), Some(2), "no key configured");
    assert!(stderr(&out).contains(KEY_FILE), "{}", stderr(&out));
    for (env, args) in [
        (vec![(KEY_FILE, path_str(&short))], vec!["keys", "rotate"]),
        (vec![(KEY_FILE, path_str(&short))], vec!["run"]),
        (vec![(KEY_FILE, path_str(&short))], vec!["check-config"]),
        (
            vec![
                (KEY_FILE, path_str(&key)),
                (PREVIOUS_FILE, path_str(&short)),
            ],
            vec!["mailbox", "add", "--refresh-token-file", "-", &a],
        ),
    ] {
        let out = t.run(&bed, &env, &args, secret);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let named = env.last().unwrap().0;
        assert!(stderr(&out).contains(named), "{args:?}: {}", stderr(&out));
    }
    for input in ["", "\n", "1//one\n1//two\n"] {
        let out = t.run(
            &bed,
            &with_key,
            &["mailbox", "add", "--refresh-token-file", "-", &a],
            input,
        );
        assert_eq!(out.status.code(), Some(1), "{input:?}");
        assert!(stderr(&out).contains("expected"), "{}", stderr(&out));
    }
    assert_eq!(
        raw_credential(&bed, &Mailbox::parse(&a).unwrap()).await,
        None
    );
    t.assert_never_shows(&[secret.to_string(), text.trim().to_string()]);
}

fn two_keys() -> (Vault, Vault, KeyId) {
    let (old, _) = generate_key_file();
    let (new, new_id) = generate_key_file();
    (
        Vault::from_key_texts(&old, None).unwrap(),
        Vault::from_key_texts(&new, Some(&old)).unwrap(),
        new_id,
    )
}

/// The compare-and-set under `keys rotate`: a token stored while a rotation resealed the old
/// one is kept; a removed one is not brought back.
async fn replaced_meanwhile_is_not_clobbered(bed: &Bed) {
    let store = bed.store().await;
    let (old, rotating, new_id) = two_keys();
    let m = Mailbox::parse(&emails(&bed.label, 1)[0]).unwrap();
    store
        .put_credential(&m, &old.seal(&m, &Secret::new("1//stale")))
        .await
        .unwrap();
    let read = store.credential(&m).await.unwrap().unwrap();
    let Resealed::Resealed(resealed) = rotating.reseal(&m, &read).unwrap() else {
        panic!("sealed with the previous key");
    };
    // Meanwhile `mailbox add` stores a new token.
    let fresh = rotating.seal(&m, &Secret::new("1//fresh"));
    store.put_credential(&m, &fresh).await.unwrap();
    assert_eq!(
        store
            .replace_credential(&m, &read, &resealed)
            .await
            .unwrap(),
        Replaced::Changed
    );
    let kept = store.credential(&m).await.unwrap().unwrap();
    assert_eq!(kept, fresh);
    assert_eq!(rotating.open(&m, &kept).unwrap().expose(), "1//fresh");
    // Unchanged: replaced; a retry of the same swap (its reply lost) finds its own value there
    // and is `Replaced` too.
    let again = rotating.seal(&m, &Secret::new("1//fresh"));
    assert_eq!(sealed_key_id(&again).unwrap(), new_id);
    for _ in 0..2 {
        assert_eq!(
            store.replace_credential(&m, &kept, &again).await.unwrap(),
            Replaced::Replaced
        );
    }
    assert_eq!(store.credential_count().await.unwrap(), 1);
    let (_, page) = store
        .credentials_page(KeyLayout::new(&bed.prefix, bed.shards).shard_of(&m), 0)
        .await
        .unwrap();
    assert_eq!(page, vec![(m.to_string(), again.clone())]);
    // Removed meanwhile: gone, and the swap does not bring it back.
    store.remove(&m).await.unwrap();
    assert_eq!(
        store
            .replace_credential(&m, &again, &resealed)
            .await
            .unwrap(),
        Replaced::Gone
    );
    assert_eq!(store.credential(&m).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_stored_during_a_rotation_is_not_overwritten() {
    let bed = Bed::start("vaultcas").await;
    replaced_meanwhile_is_not_clobbered(&bed).await;
}

/// Redis Cluster: every credential script touches one slot, and `keys rotate` walks all shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_rotation_work_on_a_redis_cluster() {
    let bed = Bed::with(
        "vaultcluster",
        BedOptions {
            redis: RedisChoice::Cluster,
            ..BedOptions::default()
        },
    )
    .await;
    replaced_meanwhile_is_not_clobbered(&bed).await;
    let store = bed.store().await;
    let dir: PathBuf = bed.dir.join("keys");
    std::fs::create_dir_all(&dir).unwrap();
    let (old, new) = (dir.join("old"), dir.join("new"));
    for (path, (text, _)) in [(&old, generate_key_file()), (&new, generate_key_file())] {
        std::fs::write(path, text.as_bytes()).unwrap();
    }
    let old_vault = vault_of(&old, None);
    let mailboxes: Vec<Mailbox> = emails("vaultcluster-m", 12)
        .iter()
        .map(|e| Mailbox::parse(e).unwrap())
        .collect();
    for m in &mailboxes {
        let token = Secret::new(format!("1//{m}"));
        store
            .put_credential(m, &old_vault.seal(m, &token))
            .await
            .unwrap();
    }
    let out = Transcript::default().run(
        &bed,
        &[(KEY_FILE, path_str(&new)), (PREVIOUS_FILE, path_str(&old))],
        &["keys", "rotate", "--json"],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["rotated"], 12);
    let new_only = vault_of(&new, None);
    for m in &mailboxes {
        let sealed = store.credential(m).await.unwrap().unwrap();
        assert_eq!(
            new_only.open(m, &sealed).unwrap().expose(),
            format!("1//{m}")
        );
        store.remove(m).await.unwrap();
        assert_eq!(store.credential(m).await.unwrap(), None);
    }
}
