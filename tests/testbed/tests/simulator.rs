//! Tests of the Gmail simulator against the Gmail facts in reference/apis.md. The simulator is
//! the oracle of every invariant test, so these pin its semantics down.

use gmail_sync_testbed::gmail::fixtures::{
    GMAIL_METADATA_SCOPE, SERVICE_ACCOUNT_EMAIL, sign_delegation_jwt,
};
use gmail_sync_testbed::gmail::{
    CallEntry, ChangeKind, CostTable, Endpoint, FaultAction, FaultRule, GmailSim, Ledger,
    LedgerEntry, NotificationOutcome, QuotaConfig, QuotaErrorStyle, SimConfig,
};
use gmail_sync_testbed::keys::ServiceAccount;
use gmail_sync_testbed::pubsub;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use std::time::Duration;

const TOKEN: &str = "dev-token";
const A: &str = "alice@example.com";
const B: &str = "bob@example.com";

fn cfg() -> SimConfig {
    SimConfig {
        static_tokens: vec![TOKEN.to_string()],
        ..SimConfig::default()
    }
}

async fn sim() -> GmailSim {
    GmailSim::start(cfg()).await.expect("start sim")
}

struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn get(sim: &GmailSim, token: &str, path: &str, query: &[(&str, &str)]) -> Resp {
    let r = http()
        .get(format!("{}{}", sim.base_url(), path))
        .bearer_auth(token)
        .query(query)
        .send()
        .await
        .expect("request");
    into_resp(r).await
}

async fn post(sim: &GmailSim, token: &str, path: &str, body: Value) -> Resp {
    let r = http()
        .post(format!("{}{}", sim.base_url(), path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("request");
    into_resp(r).await
}

async fn into_resp(r: reqwest::Response) -> Resp {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("json body")
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn users(email: &str, rest: &str) -> String {
    format!("/gmail/v1/users/{email}/{rest}")
}

/// Lists history with a static token; panics unless 200.
async fn history(sim: &GmailSim, email: &str, q: &[(&str, &str)]) -> Value {
    let r = get(sim, TOKEN, &users(email, "history"), q).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

fn ids(page: &Value) -> Vec<u64> {
    page["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|r| r["id"].as_str().unwrap().parse().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// Follows nextPageToken to the end; returns all record ids and the last page.
async fn all_pages(sim: &GmailSim, email: &str, start: u64, max: &str) -> (Vec<u64>, Value, usize) {
    let start = start.to_string();
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut q = vec![("startHistoryId", start.as_str()), ("maxResults", max)];
        if let Some(t) = &token {
            q.push(("pageToken", t.as_str()));
        }
        let page = history(sim, email, &q).await;
        pages += 1;
        out.extend(ids(&page));
        match page["nextPageToken"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => return (out, page, pages),
        }
        assert!(pages < 1000, "runaway pagination");
    }
}

async fn wait_until(what: &str, max: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + max;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_boundaries() {
    let sim = sim().await;
    let h0 = sim.add_mailbox(A);
    // 0 records: `history` absent, no token, current historyId.
    let page = history(&sim, A, &[("startHistoryId", &h0.to_string())]).await;
    assert_eq!(page, json!({"historyId": h0.to_string()}));

    let mut changes = Vec::new();
    for _ in 0..5 {
        sim.deliver(A, &["INBOX", "UNREAD"]);
        changes.push(sim.current_history_id(A));
    }
    // Exactly maxResults records: one page, no token.
    let page = history(
        &sim,
        A,
        &[("startHistoryId", &h0.to_string()), ("maxResults", "5")],
    )
    .await;
    assert_eq!(ids(&page), changes);
    assert!(page.get("nextPageToken").is_none(), "{page}");
    assert_eq!(
        page["historyId"],
        json!(sim.current_history_id(A).to_string())
    );

    // maxResults + 1 records: two pages (5 + 1).
    sim.touch(A); // invisible: advances the historyId, no record
    sim.deliver(A, &["INBOX"]);
    changes.push(sim.current_history_id(A));
    let (all, last, pages) = all_pages(&sim, A, h0, "5").await;
    assert_eq!(pages, 2);
    assert_eq!(all, changes, "chain covers every record once, in order");
    assert_eq!(
        last["historyId"],
        json!(sim.current_history_id(A).to_string())
    );

    // Default maxResults is 100; larger values clamp to 500.
    let hs = sim.burst(A, 620);
    changes.extend(hs);
    let page = history(&sim, A, &[("startHistoryId", &h0.to_string())]).await;
    assert_eq!(ids(&page).len(), 100);
    let page = history(
        &sim,
        A,
        &[
            ("startHistoryId", &h0.to_string()),
            ("maxResults", "100000"),
        ],
    )
    .await;
    assert_eq!(ids(&page).len(), 500);
    assert!(page["nextPageToken"].is_string());
    for max in ["1", "7", "500", "1000"] {
        let (all, _, _) = all_pages(&sim, A, h0, max).await;
        assert_eq!(all, changes, "maxResults={max}");
    }
    // A page token that is not ours → 400.
    let r = get(
        &sim,
        TOKEN,
        &users(A, "history"),
        &[("startHistoryId", &h0.to_string()), ("pageToken", "bogus")],
    )
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_strictly_after_start_with_gaps() {
    let sim = sim().await;
    let h0 = sim.add_mailbox(A);
    let hs = sim.burst(A, 60);
    assert!(hs.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
    assert!(hs[0] > h0);
    assert!(
        hs.windows(2).any(|w| w[1] - w[0] > 1),
        "historyIds are not contiguous"
    );
    // Records strictly after startHistoryId, even when start is a record id.
    for k in [0usize, 10, 59] {
        let (all, _, _) = all_pages(&sim, A, hs[k], "500").await;
        assert_eq!(all, hs[k + 1..].to_vec(), "after record {k}");
    }
    // A start between two record ids.
    let mid = (hs[20] + 1..hs[21]).next();
    if let Some(mid) = mid {
        let (all, _, _) = all_pages(&sim, A, mid, "500").await;
        assert_eq!(all, hs[21..].to_vec());
    }
    // A start beyond the current id: empty, current historyId.
    let cur = sim.current_history_id(A);
    let page = history(&sim, A, &[("startHistoryId", &(cur + 1000).to_string())]).await;
    assert_eq!(page, json!({"historyId": cur.to_string()}));
    // Missing or invalid startHistoryId → 400.
    for q in [
        vec![],
        vec![("startHistoryId", "abc")],
        vec![("startHistoryId", "-5")],
    ] {
        let r = get(&sim, TOKEN, &users(A, "history"), &q).await;
        assert_eq!(r.status, 400, "{q:?}");
        assert_eq!(r.body["error"]["code"], 400);
        assert_eq!(r.body["error"]["status"], "INVALID_ARGUMENT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_shapes_and_big_history_ids() {
    let sim = sim().await;
    let start: u64 = 9_007_199_254_740_993; // 2^53 + 1: not representable as f64
    sim.add_mailbox_at(A, start);
    let d = sim.deliver_full(A, &["INBOX", "UNREAD"], None);
    assert_eq!(d.id.len(), 16);
    assert!(d.id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        d.thread_id, d.id,
        "a new thread's id is its first message's id"
    );
    let reply = sim.reply(A, &d.thread_id, &["INBOX"]);
    let h_add = sim.add_labels(A, &d.id, &["STARRED", "UNREAD"]).unwrap();
    assert_eq!(
        sim.add_labels(A, &d.id, &["STARRED"]),
        None,
        "no-op modify: no record"
    );
    let h_rm = sim.remove_labels(A, &d.id, &["UNREAD"]).unwrap();
    let h_del = sim.delete(A, &reply);
    let page = history(&sim, A, &[("startHistoryId", &start.to_string())]).await;
    let h = page["history"].as_array().unwrap();
    assert_eq!(h.len(), 5);
    assert_eq!(
        h[0],
        json!({"id": d.history_id.to_string(),
               "messages": [{"id": d.id, "threadId": d.id}],
               "messagesAdded": [{"message": {"id": d.id, "threadId": d.id, "labelIds": ["INBOX", "UNREAD"]}}]})
    );
    assert_eq!(h[1]["messagesAdded"][0]["message"]["threadId"], json!(d.id));
    assert_eq!(
        h[2],
        json!({"id": h_add.to_string(),
               "messages": [{"id": d.id, "threadId": d.id}],
               "labelsAdded": [{"message": {"id": d.id, "threadId": d.id, "labelIds": ["INBOX", "UNREAD", "STARRED"]},
                                "labelIds": ["STARRED"]}]})
    );
    assert_eq!(
        h[3],
        json!({"id": h_rm.to_string(),
               "messages": [{"id": d.id, "threadId": d.id}],
               "labelsRemoved": [{"message": {"id": d.id, "threadId": d.id, "labelIds": ["INBOX", "STARRED"]},
                                  "labelIds": ["UNREAD"]}]})
    );
    assert_eq!(
        h[4],
        json!({"id": h_del.to_string(),
               "messages": [{"id": reply, "threadId": d.id}],
               "messagesDeleted": [{"message": {"id": reply, "threadId": d.id, "labelIds": ["INBOX"]}}]})
    );
    // historyIds above 2^53 survive exactly (decimal strings).
    let p = get(&sim, TOKEN, &users(A, "profile"), &[]).await;
    assert_eq!(p.status, 200);
    assert_eq!(
        p.body,
        json!({"emailAddress": A, "messagesTotal": 1, "threadsTotal": 1,
               "historyId": sim.current_history_id(A).to_string()})
    );
    assert_eq!(sim.current_history_id(A), h_del);
    // Near u64::MAX / 2.
    let near = u64::MAX / 2 - 1_000_000;
    sim.add_mailbox_at(B, near);
    let hs = sim.burst(B, 10);
    let (all, _, _) = all_pages(&sim, B, near, "3").await;
    assert_eq!(all, hs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_404_after_expiry_and_retention() {
    let sim = sim().await;
    let h0 = sim.add_mailbox(A);
    let hs = sim.burst(A, 5);
    assert_eq!(all_pages(&sim, A, h0, "100").await.0, hs);
    // A cursor older than the mailbox → 404.
    let r = get(
        &sim,
        TOKEN,
        &users(A, "history"),
        &[("startHistoryId", &(h0 - 1).to_string())],
    )
    .await;
    assert_eq!(r.status, 404);
    sim.expire_history(A);
    let r = get(
        &sim,
        TOKEN,
        &users(A, "history"),
        &[("startHistoryId", &h0.to_string())],
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.body,
        json!({"error": {"code": 404, "message": "Requested entity was not found.",
               "errors": [{"message": "Requested entity was not found.", "domain": "global", "reason": "notFound"}],
               "status": "NOT_FOUND"}})
    );
    let r = get(
        &sim,
        TOKEN,
        &users(A, "history"),
        &[("startHistoryId", &hs[3].to_string())],
    )
    .await;
    assert_eq!(r.status, 404, "any cursor older than now");
    // The current id still works, and later changes show up.
    let cur = sim.current_history_id(A);
    assert_eq!(
        history(&sim, A, &[("startHistoryId", &cur.to_string())]).await,
        json!({"historyId": cur.to_string()})
    );
    let later = sim.burst(A, 3);
    assert_eq!(all_pages(&sim, A, cur, "2").await.0, later);

    // Partial expiry: cursors at or after the horizon work.
    sim.expire_history_up_to(A, later[0]);
    assert_eq!(
        all_pages(&sim, A, later[0], "2").await.0,
        later[1..].to_vec()
    );
    let r = get(
        &sim,
        TOKEN,
        &users(A, "history"),
        &[("startHistoryId", &cur.to_string())],
    )
    .await;
    assert_eq!(r.status, 404);

    // Time-based retention.
    let h1 = sim.add_mailbox(B);
    sim.set_history_retention(B, Some(Duration::from_millis(300)));
    let old = sim.burst(B, 2);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let new = sim.burst(B, 2);
    let r = get(
        &sim,
        TOKEN,
        &users(B, "history"),
        &[("startHistoryId", &h1.to_string())],
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(all_pages(&sim, B, old[1], "10").await.0, new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_type_and_label_filters() {
    let sim = sim().await;
    let h0 = sim.add_mailbox(A);
    let m1 = sim.deliver(A, &["INBOX", "UNREAD"]); // added
    let m2 = sim.deliver(A, &["INBOX"]); // added
    let star = sim.add_labels(A, &m1, &["STARRED"]).unwrap(); // labelAdded
    let unread = sim.remove_labels(A, &m1, &["UNREAD"]).unwrap(); // labelRemoved
    let star2 = sim.add_labels(A, &m2, &["STARRED"]).unwrap(); // labelAdded
    let unstar = sim.remove_labels(A, &m2, &["STARRED"]).unwrap(); // labelRemoved (STARRED before)
    let del = sim.delete(A, &m1); // deleted (had STARRED)
    let s = h0.to_string();
    let q = |extra: Vec<(&'static str, &'static str)>| {
        let mut v = vec![("startHistoryId", s.clone())];
        v.extend(extra.into_iter().map(|(k, v)| (k, v.to_string())));
        v
    };
    let run = |q: Vec<(&'static str, String)>| {
        let sim = sim.clone();
        async move {
            let q: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
            ids(&history(&sim, A, &q).await)
        }
    };
    assert_eq!(
        run(q(vec![("historyTypes", "labelAdded")])).await,
        vec![star, star2]
    );
    assert_eq!(
        run(q(vec![
            ("historyTypes", "labelRemoved"),
            ("historyTypes", "messageDeleted")
        ]))
        .await,
        vec![unread, unstar, del]
    );
    let added = run(q(vec![("historyTypes", "messageAdded")])).await;
    assert_eq!(added.len(), 2);
    // labelId: the message carried the label before or after the change.
    assert_eq!(
        run(q(vec![("labelId", "STARRED")])).await,
        vec![star, unread, star2, unstar, del]
    );
    assert_eq!(
        run(q(vec![
            ("labelId", "STARRED"),
            ("historyTypes", "labelRemoved")
        ]))
        .await,
        vec![unread, unstar]
    );
    let r = get(
        &sim,
        TOKEN,
        &users(A, "history"),
        &[("startHistoryId", s.as_str()), ("historyTypes", "bogus")],
    )
    .await;
    assert_eq!(r.status, 400);
    // Filtered pages still report the current historyId.
    let page = history(
        &sim,
        A,
        &[("startHistoryId", s.as_str()), ("labelId", "nope")],
    )
    .await;
    assert_eq!(
        page,
        json!({"historyId": sim.current_history_id(A).to_string()})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_list_and_get() {
    let sim = sim().await;
    sim.add_mailbox(A);
    let r = get(&sim, TOKEN, &users(A, "messages"), &[]).await;
    assert_eq!(
        r.body,
        json!({"resultSizeEstimate": 0}),
        "messages absent when empty"
    );
    let mut ids_delivered = Vec::new();
    for i in 0..12 {
        let labels: &[&str] = if i % 3 == 0 {
            &["INBOX", "STARRED"]
        } else {
            &["INBOX"]
        };
        ids_delivered.push(sim.deliver(A, labels));
    }
    let spam = sim.deliver(A, &["SPAM"]);
    let r = get(&sim, TOKEN, &users(A, "messages"), &[("maxResults", "5")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["resultSizeEstimate"], 12, "SPAM excluded by default");
    let listed: Vec<String> = r.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    let newest: Vec<String> = ids_delivered.iter().rev().take(5).cloned().collect();
    assert_eq!(listed, newest, "newest first");
    assert!(r.body["messages"][0].get("labelIds").is_none());
    // Pagination covers everything once.
    let mut all = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut q = vec![("maxResults", "5".to_string())];
        if let Some(t) = &token {
            q.push(("pageToken", t.clone()));
        }
        let q: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = get(&sim, TOKEN, &users(A, "messages"), &q).await;
        for m in r.body["messages"].as_array().unwrap() {
            all.push(m["id"].as_str().unwrap().to_string());
        }
        match r.body["nextPageToken"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    let mut expected = ids_delivered.clone();
    expected.reverse();
    assert_eq!(all, expected);
    let r = get(
        &sim,
        TOKEN,
        &users(A, "messages"),
        &[("labelIds", "STARRED")],
    )
    .await;
    assert_eq!(r.body["resultSizeEstimate"], 4);
    let r = get(
        &sim,
        TOKEN,
        &users(A, "messages"),
        &[("includeSpamTrash", "true")],
    )
    .await;
    assert_eq!(r.body["resultSizeEstimate"], 13);
    assert_eq!(r.body["messages"][0]["id"], json!(spam));

    // messages.get
    let id = &ids_delivered[0];
    let r = get(
        &sim,
        TOKEN,
        &users(A, &format!("messages/{id}")),
        &[("format", "minimal")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["id"], json!(id));
    assert_eq!(r.body["threadId"], json!(id));
    assert_eq!(r.body["labelIds"], json!(["INBOX", "STARRED"]));
    assert!(r.body["historyId"].is_string());
    assert!(r.body["internalDate"].is_string());
    assert!(r.body["sizeEstimate"].is_u64());
    assert!(r.body.get("payload").is_none());
    let r = get(
        &sim,
        TOKEN,
        &users(A, &format!("messages/{id}")),
        &[("format", "metadata")],
    )
    .await;
    assert!(r.body["snippet"].is_string());
    assert!(r.body["payload"]["headers"].is_array());
    sim.delete(A, id);
    let r = get(
        &sim,
        TOKEN,
        &users(A, &format!("messages/{id}")),
        &[("format", "minimal")],
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["errors"][0]["reason"], "notFound");
    let r = get(&sim, TOKEN, &users(A, "messages/0123456789abcdef"), &[]).await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_basics() {
    let sim = sim().await;
    sim.add_mailbox(A);
    let r = http()
        .get(format!("{}{}", sim.base_url(), users(A, "profile")))
        .send()
        .await
        .unwrap();
    let r = into_resp(r).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error"]["status"], "UNAUTHENTICATED");
    assert_eq!(r.body["error"]["errors"][0]["reason"], "required");
    let r = get(&sim, "nope", &users(A, "profile"), &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error"]["errors"][0]["reason"], "authError");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Request had invalid authentication credentials.")
    );
    // Static tokens: any mailbox by name; `me` cannot be resolved.
    assert_eq!(
        get(&sim, TOKEN, &users(A, "profile"), &[]).await.status,
        200
    );
    assert_eq!(
        get(&sim, TOKEN, &users("me", "profile"), &[]).await.status,
        400
    );
    // Unknown mailbox.
    let r = get(&sim, TOKEN, &users("ghost@example.com", "profile"), &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["errors"][0]["reason"], "failedPrecondition");
}

async fn token_form(sim: &GmailSim, form: &[(&str, &str)]) -> Resp {
    let r = http()
        .post(sim.token_url())
        .form(form)
        .send()
        .await
        .unwrap();
    into_resp(r).await
}

async fn jwt_grant(sim: &GmailSim, assertion: &str) -> Resp {
    token_form(
        sim,
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion),
        ],
    )
    .await
}

fn jwt(key: &str, sub: &str, aud: &str, iat_offset: i64, lifetime: u64) -> String {
    sign_delegation_jwt(
        key,
        SERVICE_ACCOUNT_EMAIL,
        sub,
        GMAIL_METADATA_SCOPE,
        aud,
        iat_offset,
        lifetime,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_delegation_jwt() {
    // Keys made for this run (no key material is committed): the service account's, and an
    // unrelated one whose JWTs must be refused.
    let sa = ServiceAccount::generate(SERVICE_ACCOUNT_EMAIL).unwrap();
    let other = ServiceAccount::generate(SERVICE_ACCOUNT_EMAIL).unwrap();
    let sa_key = sa.private_key_pem.as_str();
    let other_key = other.private_key_pem.as_str();
    let sim = GmailSim::start(SimConfig {
        service_account_public_key_pem: Some(sa.public_key_pem.clone()),
        service_account_email: Some(SERVICE_ACCOUNT_EMAIL.to_string()),
        ..cfg()
    })
    .await
    .unwrap();
    sim.add_mailbox(A);
    sim.add_mailbox(B);
    let aud = sim.token_url();
    let r = jwt_grant(&sim, &jwt(sa_key, A, &aud, 0, 3600)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["expires_in"], 3600);
    assert_eq!(r.body["scope"], GMAIL_METADATA_SCOPE);
    let tok = r.body["access_token"].as_str().unwrap().to_string();
    // Works for `sub` (by name and as `me`), not for another mailbox.
    let p = get(&sim, &tok, &users("me", "profile"), &[]).await;
    assert_eq!(p.status, 200);
    assert_eq!(p.body["emailAddress"], A);
    assert_eq!(get(&sim, &tok, &users(A, "profile"), &[]).await.status, 200);
    let r = get(&sim, &tok, &users(B, "profile"), &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.body["error"]["message"],
        format!("Delegation denied for {A}")
    );

    let refused = |r: &Resp, what: &str| {
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        assert_eq!(r.body["error"], "invalid_grant", "{what}");
        assert!(r.body["error_description"].is_string());
    };
    refused(
        &jwt_grant(&sim, &jwt(other_key, A, &aud, 0, 3600)).await,
        "other key",
    );
    refused(
        &jwt_grant(&sim, &jwt(sa_key, A, &aud, -7200, 3600)).await,
        "expired",
    );
    refused(
        &jwt_grant(&sim, &jwt(sa_key, A, &aud, 0, 7200)).await,
        "too long-lived",
    );
    refused(
        &jwt_grant(
            &sim,
            &jwt(sa_key, A, "https://oauth2.googleapis.com/token", 0, 3600),
        )
        .await,
        "wrong aud",
    );
    refused(
        &jwt_grant(&sim, &jwt(sa_key, "ghost@example.com", &aud, 0, 3600)).await,
        "unknown sub",
    );
    refused(&jwt_grant(&sim, "not.a.jwt").await, "garbage");
    let wrong_iss = sign_delegation_jwt(
        sa_key,
        "intruder@example.iam.gserviceaccount.com",
        A,
        GMAIL_METADATA_SCOPE,
        &aud,
        0,
        3600,
    )
    .unwrap();
    refused(&jwt_grant(&sim, &wrong_iss).await, "wrong iss");
    // Delegation withdrawn → unauthorized_client.
    sim.set_delegation_allowed(B, false);
    let r = jwt_grant(&sim, &jwt(sa_key, B, &aud, 0, 3600)).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error"], "unauthorized_client");
    let r = token_form(&sim, &[("grant_type", "password")]).await;
    assert_eq!(r.body["error"], "unsupported_grant_type");

    // The ledger records token calls with the grant's mailbox and outcome.
    let ledger = sim.ledger();
    let tokens = ledger.calls_to(Endpoint::Token);
    assert_eq!(tokens.len(), 10);
    assert_eq!(tokens[0].status, 200);
    assert_eq!(tokens[0].mailbox.as_deref(), Some(A));
    assert!(tokens[1..].iter().all(|c| c.status != 200));
    assert_eq!(sim.tokens_issued(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refresh_and_expiry() {
    let sim = GmailSim::start(SimConfig {
        token_lifetime: Duration::from_secs(1),
        refresh_tokens: vec![("rt-a".to_string(), A.to_string())],
        ..cfg()
    })
    .await
    .unwrap();
    sim.add_mailbox(A);
    sim.add_mailbox(B);
    sim.add_refresh_token("rt-b", B);
    let refresh = |rt: &'static str| {
        let sim = sim.clone();
        async move {
            token_form(
                &sim,
                &[
                    ("grant_type", "refresh_token"),
                    ("client_id", "cid"),
                    ("client_secret", "secret"),
                    ("refresh_token", rt),
                ],
            )
            .await
        }
    };
    let r = refresh("rt-a").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["expires_in"], 1);
    let tok_a = r.body["access_token"].as_str().unwrap().to_string();
    assert_eq!(
        get(&sim, &tok_a, &users("me", "profile"), &[]).await.body["emailAddress"],
        A
    );
    // Expired access token → 401 authError.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = get(&sim, &tok_a, &users(A, "profile"), &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.body["error"]["errors"][0],
        json!({"message": r.body["error"]["message"], "domain": "global", "reason": "authError",
               "location": "Authorization", "locationType": "header"})
    );
    assert_eq!(r.body["error"]["status"], "UNAUTHENTICATED");
    assert!(r.headers.contains_key("www-authenticate"));
    // Revoked refresh token → invalid_grant, and its access tokens stop working.
    let r = refresh("rt-b").await;
    let tok_b = r.body["access_token"].as_str().unwrap().to_string();
    sim.revoke_refresh_token("rt-b");
    assert_eq!(
        get(&sim, &tok_b, &users(B, "profile"), &[]).await.status,
        401
    );
    let r = refresh("rt-b").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"], "invalid_grant");
    let r = refresh("unknown").await;
    assert_eq!(r.body["error"], "invalid_grant");
    // Forced expiry.
    let tok = refresh("rt-a").await.body["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    sim.expire_access_tokens(Some(A));
    assert_eq!(get(&sim, &tok, &users(A, "profile"), &[]).await.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_per_user_and_project() {
    let sim = GmailSim::start(SimConfig {
        quota: QuotaConfig {
            per_user_per_minute: Some(10),
            ..QuotaConfig::default()
        },
        ..cfg()
    })
    .await
    .unwrap();
    sim.add_mailbox(A);
    sim.add_mailbox(B);
    let h = sim.current_history_id(A).to_string();
    for _ in 0..5 {
        // 5 × history.list (2 units) = 10 units.
        history(&sim, A, &[("startHistoryId", &h)]).await;
    }
    assert_eq!(sim.quota_used(A), 10);
    let r = get(&sim, TOKEN, &users(A, "profile"), &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.body["error"]["status"], "RESOURCE_EXHAUSTED");
    assert_eq!(r.body["error"]["errors"][0]["reason"], "rateLimitExceeded");
    assert_eq!(r.body["error"]["errors"][0]["domain"], "usageLimits");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Retry after 20")
    );
    // Other users are unaffected.
    assert_eq!(
        get(&sim, TOKEN, &users(B, "profile"), &[]).await.status,
        200
    );
    // 403 style.
    sim.set_quota_error_style(QuotaErrorStyle::Forbidden);
    let r = get(&sim, TOKEN, &users(A, "profile"), &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.body["error"]["errors"][0]["reason"],
        "userRateLimitExceeded"
    );
    assert!(r.headers.contains_key("retry-after"));
    // Project limit.
    sim.set_quota(QuotaConfig {
        per_project_per_minute: Some(13),
        ..QuotaConfig::default()
    });
    assert_eq!(
        get(&sim, TOKEN, &users(B, "profile"), &[]).await.status,
        200
    ); // 12
    assert_eq!(
        get(&sim, TOKEN, &users(B, "profile"), &[]).await.status,
        200
    ); // 13
    let r = get(&sim, TOKEN, &users(B, "profile"), &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.body["error"]["errors"][0]["reason"], "rateLimitExceeded");
    // Refused calls are not charged.
    let ledger = sim.ledger();
    assert_eq!(ledger.quota_units(), 13);
    assert!(
        ledger
            .calls()
            .iter()
            .filter(|c| c.status != 200)
            .all(|c| c.cost == 0)
    );
    sim.reset_quota();
    assert_eq!(
        get(&sim, TOKEN, &users(B, "profile"), &[]).await.status,
        200
    );
}

/// The 2026 table: `messages.get` costs 20; the project's day budget answers 403
/// `dailyLimitExceeded` (either style); the per-user 429 says "User-rate limit exceeded".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_table_2026_and_the_daily_project_budget() {
    let sim = GmailSim::start(SimConfig {
        quota: QuotaConfig {
            per_user_per_minute: Some(30),
            per_project_per_day: Some(45),
            table: CostTable::Y2026,
            ..QuotaConfig::default()
        },
        ..cfg()
    })
    .await
    .unwrap();
    sim.add_mailbox(A);
    sim.add_mailbox(B);
    let id = sim.deliver(A, &["INBOX"]);
    let get_message = |who: &'static str, id: String| {
        let sim = sim.clone();
        async move {
            get(
                &sim,
                TOKEN,
                &users(who, &format!("messages/{id}")),
                &[("format", "minimal")],
            )
            .await
        }
    };
    assert_eq!(get_message(A, id.to_string()).await.status, 200);
    assert_eq!(sim.quota_used(A), 20);
    // 20 + 20 > 30: the user's minute.
    let r = get_message(A, id.to_string()).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.body["error"]["errors"][0]["reason"], "rateLimitExceeded");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("User-rate limit exceeded.")
    );
    // B: 20 more (40 of the day's 45), then the day is spent for everyone.
    let h = sim.current_history_id(B).to_string();
    for _ in 0..10 {
        history(&sim, B, &[("startHistoryId", &h)]).await;
    }
    // 40 + 5 × 1: the rest of the day's 45.
    for _ in 0..5 {
        assert_eq!(
            get(&sim, TOKEN, &users(B, "profile"), &[]).await.status,
            200
        );
    }
    let r = get(&sim, TOKEN, &users(B, "profile"), &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.body["error"]["errors"][0]["reason"], "dailyLimitExceeded");
    assert!(r.headers.contains_key("retry-after"));
    let ledger = sim.ledger();
    assert_eq!(ledger.quota_units(), 45);
    assert_eq!(
        ledger.calls_to(Endpoint::MessagesGet)[0].cost,
        20,
        "charged at the 2026 table's cost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_per_user() {
    let sim = GmailSim::start(SimConfig {
        quota: QuotaConfig {
            max_concurrent_per_user: Some(2),
            ..QuotaConfig::default()
        },
        ..cfg()
    })
    .await
    .unwrap();
    sim.add_mailbox(A);
    sim.add_mailbox(B);
    sim.inject(
        FaultRule::new(Some(Endpoint::GetProfile), FaultAction::Hang)
            .for_mailbox(A)
            .times(2),
    );
    let mut hung = Vec::new();
    for _ in 0..2 {
        let sim = sim.clone();
        hung.push(tokio::spawn(async move {
            get(&sim, TOKEN, &users(A, "profile"), &[]).await
        }));
    }
    wait_until("two calls in flight", Duration::from_secs(10), || {
        sim.in_flight(A) == 2
    })
    .await;
    let r = get(&sim, TOKEN, &users(A, "profile"), &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.body["error"]["message"],
        "Too many concurrent requests for user"
    );
    assert_eq!(
        get(&sim, TOKEN, &users(B, "profile"), &[]).await.status,
        200
    );
    // The clients give up: the slots are released and the calls recorded as 499.
    for h in hung {
        h.abort();
    }
    wait_until("slots released", Duration::from_secs(10), || {
        sim.in_flight(A) == 0
    })
    .await;
    assert_eq!(
        get(&sim, TOKEN, &users(A, "profile"), &[]).await.status,
        200
    );
    let ledger = sim.ledger();
    let a_calls = ledger.calls_for(A);
    assert_eq!(a_calls.iter().filter(|c| c.status == 499).count(), 2);
    assert_eq!(a_calls.iter().filter(|c| c.status == 429).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_rules() {
    let sim = sim().await;
    let h0 = sim.add_mailbox(A);
    sim.add_mailbox(B);
    let s = h0.to_string();
    let q = [("startHistoryId", s.as_str())];
    sim.inject(
        FaultRule::new(
            Some(Endpoint::HistoryList),
            FaultAction::too_many_requests(7),
        )
        .for_mailbox(A)
        .times(2),
    );
    for _ in 0..2 {
        let r = get(&sim, TOKEN, &users(A, "history"), &q).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.headers["retry-after"], "7");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Retry after ")
        );
    }
    assert_eq!(
        get(&sim, TOKEN, &users(A, "history"), &q).await.status,
        200,
        "count-limited"
    );
    assert!(sim.faults().is_empty());

    let id = sim.inject(FaultRule::new(
        Some(Endpoint::GetProfile),
        FaultAction::status(503),
    ));
    for m in [A, B] {
        let r = get(&sim, TOKEN, &users(m, "profile"), &[]).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.body["error"]["status"], "UNAVAILABLE");
    }
    assert_eq!(
        get(&sim, TOKEN, &users(A, "history"), &q).await.status,
        200,
        "other endpoint"
    );
    assert!(sim.remove_fault(id));

    sim.inject(
        FaultRule::new(
            None,
            FaultAction::rate_limit_403("rateLimitExceeded", Some(3)),
        )
        .times(1),
    );
    let r = get(
        &sim,
        TOKEN,
        &users(B, "history"),
        &[("startHistoryId", "1")],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.body["error"]["errors"][0]["reason"], "rateLimitExceeded");
    assert_eq!(r.headers["retry-after"], "3");

    sim.inject(FaultRule::new(None, FaultAction::forbidden("domainPolicy")).times(1));
    let r = get(&sim, TOKEN, &users(A, "profile"), &[]).await;
    assert_eq!(r.body["error"]["errors"][0]["reason"], "domainPolicy");

    sim.inject(FaultRule::new(None, FaultAction::ExpiredToken).times(1));
    let r = get(&sim, TOKEN, &users(A, "profile"), &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error"]["errors"][0]["reason"], "authError");

    sim.inject(FaultRule::new(None, FaultAction::status(500)).times(1));
    assert_eq!(
        get(&sim, TOKEN, &users(A, "profile"), &[]).await.status,
        500
    );

    sim.inject(FaultRule::new(None, FaultAction::latency(Duration::from_millis(50))).times(1));
    assert_eq!(
        get(&sim, TOKEN, &users(A, "profile"), &[]).await.status,
        200
    );

    // A hang until the client gives up.
    sim.inject(FaultRule::new(Some(Endpoint::Watch), FaultAction::Hang).times(1));
    let err = http()
        .post(format!("{}{}", sim.base_url(), users(A, "watch")))
        .bearer_auth(TOKEN)
        .json(&json!({"topicName": "projects/p/topics/t"}))
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .expect_err("hangs");
    assert!(err.is_timeout());

    // Faults are recorded, uncharged, in the ledger.
    let ledger = sim.ledger();
    let faulted: Vec<_> = ledger.calls().into_iter().filter(|c| c.faulted).collect();
    assert!(faulted.len() >= 9, "{}", faulted.len());
    assert!(
        faulted
            .iter()
            .filter(|c| c.status != 200)
            .all(|c| c.cost == 0)
    );
    // The latency-faulted call was served and charged.
    assert!(faulted.iter().any(|c| c.status == 200 && c.cost == 1));
    sim.clear_faults();
    assert!(sim.faults().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_validation_without_pubsub() {
    let sim = sim().await;
    let h0 = sim.add_mailbox(A);
    for bad in [
        json!({}),
        json!({"topicName": "topics/x"}),
        json!({"topicName": "projects//topics/t"}),
    ] {
        let r = post(&sim, TOKEN, &users(A, "watch"), bad.clone()).await;
        assert_eq!(r.status, 400, "{bad}");
    }
    let r = post(&sim, TOKEN, &users(A, "watch"), json!({"topicName": "projects/p/topics/t", "labelIds": ["INBOX"], "labelFilterBehavior": "include"})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["historyId"], json!(h0.to_string()));
    let exp: u64 = r.body["expiration"].as_str().unwrap().parse().unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let week = 7 * 24 * 3600 * 1000;
    assert!(exp > now_ms + week - 60_000 && exp <= now_ms + week + 60_000);
    assert_eq!(sim.watch_topic(A).as_deref(), Some("projects/p/topics/t"));
    // Without a Pub/Sub endpoint, the watch's notification is recorded as not published.
    wait_until("notification recorded", Duration::from_secs(10), || {
        !sim.ledger().notifications_for(A).is_empty()
    })
    .await;
    let l = sim.ledger();
    assert_eq!(
        l.notifications_for(A)[0].outcome,
        NotificationOutcome::NoEndpoint
    );
    assert_eq!(sim.notifications_sent(), 0);
    let r = post(&sim, TOKEN, &users(A, "stop"), Value::Null).await;
    assert_eq!(r.status, 204);
    assert_eq!(r.body, Value::Null);
    assert_eq!(sim.watch_topic(A), None);
}

fn parse_notification(p: &[u8]) -> (String, Value) {
    let v: Value = serde_json::from_slice(p).expect("notification json");
    (
        v["emailAddress"].as_str().unwrap().to_string(),
        v["historyId"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_through_the_emulator_fold_bursts() {
    let emulator = pubsub::shared().await.expect("pubsub emulator");
    let t = pubsub::unique_topic(emulator, "gmail-sim-notify", 10)
        .await
        .unwrap();
    let sim = GmailSim::start(SimConfig {
        pubsub_endpoint: Some(emulator.endpoint()),
        ..cfg()
    })
    .await
    .unwrap();
    sim.add_mailbox(A);
    let r = post(
        &sim,
        TOKEN,
        &users(A, "watch"),
        json!({"topicName": t.topic}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let watch_hid = r.body["historyId"].as_str().unwrap().to_string();
    // The watch's own notification.
    wait_until("watch notification", Duration::from_secs(20), || {
        sim.notifications_sent() >= 1
    })
    .await;
    // Let the 1 s window pass, then a burst of many changes at once.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let burst = sim.burst(A, 200);
    let latest = *burst.last().unwrap();
    wait_until("burst notifications", Duration::from_secs(20), || {
        sim.ledger()
            .notifications_for(A)
            .iter()
            .any(|n| n.history_id == latest)
    })
    .await;
    let payloads = pubsub::drain(
        &emulator.endpoint(),
        &t.subscription,
        Duration::from_secs(3),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let got: Vec<(String, Value)> = payloads.iter().map(|p| parse_notification(p)).collect();
    assert!(got.iter().all(|(e, h)| e == A && h.is_string()), "{got:?}");
    assert_eq!(
        got[0].1,
        json!(watch_hid),
        "watch sends one notification at once"
    );
    let after: Vec<u64> = got[1..]
        .iter()
        .map(|(_, h)| h.as_str().unwrap().parse().unwrap())
        .collect();
    assert!(
        (1..=2).contains(&after.len()),
        "a burst within one second folds into ≤ 2 notifications: {after:?}"
    );
    assert_eq!(
        *after.last().unwrap(),
        latest,
        "the last carries the latest historyId"
    );
    let ledger = sim.ledger();
    let notes = ledger.notifications_for(A);
    assert_eq!(notes.len(), got.len());
    assert!(
        notes
            .iter()
            .all(|n| matches!(n.outcome, NotificationOutcome::Published(_)))
    );
    assert_eq!(sim.notifications_sent(), got.len() as u64);

    // After stop, changes publish nothing.
    assert_eq!(
        post(&sim, TOKEN, &users(A, "stop"), Value::Null)
            .await
            .status,
        204
    );
    sim.burst(A, 5);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sim.ledger().notifications_for(A).len(), notes.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_history_id_as_number() {
    let emulator = pubsub::shared().await.expect("pubsub emulator");
    let t = pubsub::unique_topic(emulator, "gmail-sim-number", 10)
        .await
        .unwrap();
    let sim = GmailSim::start(SimConfig {
        pubsub_endpoint: Some(emulator.endpoint()),
        notify_history_id_as_number: true,
        ..cfg()
    })
    .await
    .unwrap();
    sim.add_mailbox_at(A, 9_007_199_254_740_993);
    let r = post(
        &sim,
        TOKEN,
        &users(A, "watch"),
        json!({"topicName": t.topic}),
    )
    .await;
    assert_eq!(r.status, 200);
    wait_until("watch notification", Duration::from_secs(20), || {
        sim.notifications_sent() >= 1
    })
    .await;
    let payloads = pubsub::drain(
        &emulator.endpoint(),
        &t.subscription,
        Duration::from_secs(2),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(payloads.len(), 1);
    // The raw payload carries the exact integer (no float rounding).
    let raw = String::from_utf8(payloads[0].clone()).unwrap();
    assert_eq!(
        raw,
        format!(r#"{{"emailAddress":"{A}","historyId":9007199254740993}}"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_drops_are_recorded() {
    let sim = GmailSim::start(SimConfig {
        notify_drop_probability: 1.0,
        notify_min_interval: Duration::from_millis(50),
        ..cfg()
    })
    .await
    .unwrap();
    sim.add_mailbox(A);
    assert_eq!(
        post(
            &sim,
            TOKEN,
            &users(A, "watch"),
            json!({"topicName": "projects/p/topics/t"})
        )
        .await
        .status,
        200
    );
    wait_until("dropped", Duration::from_secs(10), || {
        sim.ledger().notifications_for(A).len() == 1
    })
    .await;
    assert_eq!(
        sim.ledger().notifications_for(A)[0].outcome,
        NotificationOutcome::Dropped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_records_every_change_and_call() {
    let sim = sim().await;
    let h0 = sim.add_mailbox(A);
    let m = sim.deliver(A, &["INBOX", "UNREAD"]);
    let r = sim.reply(A, &m, &["INBOX"]);
    sim.add_labels(A, &m, &["STARRED"]);
    sim.remove_labels(A, &m, &["UNREAD"]);
    sim.touch(A);
    sim.delete(A, &r);
    let burst = sim.burst(A, 20);
    // Changes: one per mutation, in order, matching history records.
    let ledger = sim.ledger();
    let changes = ledger.changes_for(A);
    assert_eq!(changes.len(), 26);
    let kinds: Vec<ChangeKind> = changes.iter().take(6).map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        [
            ChangeKind::MessageAdded,
            ChangeKind::MessageAdded,
            ChangeKind::LabelAdded,
            ChangeKind::LabelRemoved,
            ChangeKind::Invisible,
            ChangeKind::MessageDeleted
        ]
    );
    assert_eq!(changes[1].thread_id, m);
    assert_eq!(changes[2].label_ids, ["STARRED"]);
    assert_eq!(changes[2].labels_after, ["INBOX", "UNREAD", "STARRED"]);
    assert_eq!(changes[3].labels_after, ["INBOX", "STARRED"]);
    assert_eq!(changes.last().unwrap().history_id, *burst.last().unwrap());
    let (all, _, _) = all_pages(&sim, A, h0, "500").await;
    let recorded: Vec<u64> = changes
        .iter()
        .filter(|c| c.has_record())
        .map(|c| c.history_id)
        .collect();
    assert_eq!(
        all, recorded,
        "history records = ledger changes with records"
    );
    // Final state matches replaying the ledger.
    let mut replay: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for c in &changes {
        match c.kind {
            ChangeKind::MessageAdded | ChangeKind::LabelAdded | ChangeKind::LabelRemoved => {
                replay.insert(c.message_id.clone(), c.labels_after.clone());
            }
            ChangeKind::MessageDeleted => {
                replay.remove(&c.message_id);
            }
            ChangeKind::Invisible => {}
        }
    }
    assert_eq!(replay, sim.messages(A));

    // Calls: every call, with endpoint, mailbox, bearer, cost and status.
    let before = sim.ledger().calls().len();
    let hs = h0.to_string();
    get(&sim, TOKEN, &users(A, "profile"), &[]).await;
    get(
        &sim,
        TOKEN,
        &users(A, "history"),
        &[("startHistoryId", &hs)],
    )
    .await;
    get(&sim, TOKEN, &users(A, "messages"), &[]).await;
    let live = sim
        .messages(A)
        .keys()
        .next()
        .expect("a live message")
        .clone();
    get(&sim, TOKEN, &users(A, &format!("messages/{live}")), &[]).await;
    get(&sim, TOKEN, &users(A, &format!("messages/{r}")), &[]).await; // deleted → 404, charged
    post(
        &sim,
        TOKEN,
        &users(A, "watch"),
        json!({"topicName": "projects/p/topics/t"}),
    )
    .await;
    post(&sim, TOKEN, &users(A, "stop"), Value::Null).await;
    get(&sim, "bad", &users(A, "profile"), &[]).await;
    let ledger = sim.ledger();
    let calls = &ledger.calls()[before..];
    let got: Vec<(Endpoint, u64, u16)> = calls
        .iter()
        .map(|c| (c.endpoint, c.cost, c.status))
        .collect();
    assert_eq!(
        got,
        [
            (Endpoint::GetProfile, 1, 200),
            (Endpoint::HistoryList, 2, 200),
            (Endpoint::MessagesList, 5, 200),
            (Endpoint::MessagesGet, 5, 200),
            (Endpoint::MessagesGet, 5, 404),
            (Endpoint::Watch, 100, 200),
            (Endpoint::Stop, 50, 204),
            (Endpoint::GetProfile, 0, 401),
        ]
    );
    assert!(
        calls[..7]
            .iter()
            .all(|c| c.mailbox.as_deref() == Some(A) && c.bearer.as_deref() == Some(TOKEN))
    );
    assert_eq!(calls[7].bearer.as_deref(), Some("bad"));
    assert_eq!(calls[7].error_reason.as_deref(), Some("authError"));
    assert!(calls.iter().all(|c| c.ended >= c.started));
    // 168 units for these calls + 2 for the history.list of all_pages above.
    assert_eq!(ledger.quota_units_for(A), 168 + 2);
    // Order: calls and changes interleave as they happened.
    assert!(matches!(
        ledger.entries.first(),
        Some(LedgerEntry::Change(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_api() {
    let sim = sim().await;
    let c = http();
    let url = |p: &str| format!("{}/_sim{}", sim.base_url(), p);
    let r: Value = c
        .post(url("/mailboxes"))
        .json(&json!({"email": A, "historyId": "9007199254740993"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["historyId"], "9007199254740993");
    let dup = c
        .post(url("/mailboxes"))
        .json(&json!({"email": A}))
        .send()
        .await
        .unwrap();
    assert_eq!(dup.status(), 409);
    let d: Value = c
        .post(url(&format!("/mailboxes/{A}/deliver")))
        .json(&json!({"labelIds": ["INBOX"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = d["id"].as_str().unwrap();
    let m: Value = c
        .post(url(&format!("/mailboxes/{A}/messages/{id}/modify")))
        .json(&json!({"addLabelIds": ["STARRED"], "removeLabelIds": ["INBOX"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["historyIds"].as_array().unwrap().len(), 2);
    let b: Value = c
        .post(url(&format!("/mailboxes/{A}/burst")))
        .json(&json!({"n": 5}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(b["historyIds"].as_array().unwrap().len(), 5);
    let f = c
        .post(url("/faults"))
        .json(&json!({"endpoint": "getProfile", "mailbox": A,
                      "action": {"kind": "status", "status": 503, "retryAfter": 2}, "remaining": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(f.status(), 200);
    let r = get(&sim, TOKEN, &users(A, "profile"), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "2");
    let mb: Value = c
        .get(url(&format!("/mailboxes/{A}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        mb["historyId"],
        json!(sim.current_history_id(A).to_string())
    );
    let l: Value = c
        .get(url("/ledger?from=0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(l["entries"].as_array().unwrap().len(), sim.ledger_len());
    assert_eq!(l["entries"][0]["type"], "change");
    let s: Value = c
        .get(url("/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["changes"], 8);
    assert_eq!(s["calls"], 1);
    let e = c
        .post(url(&format!("/mailboxes/{A}/expire")))
        .send()
        .await
        .unwrap();
    assert_eq!(e.status(), 200);
    let r = get(
        &sim,
        TOKEN,
        &users(A, "history"),
        &[("startHistoryId", "9007199254740993")],
    )
    .await;
    assert_eq!(r.status, 404);
    let missing = c
        .post(url("/mailboxes/nobody@example.com/touch"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_binary_serves() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gmail-sim"))
        .args([
            "--static-token",
            "t",
            "--mailbox",
            "x@example.com=42",
            "--watch-processing-ms",
            "250",
            "--watch-lifetime-secs=3600",
        ])
        .env_remove("PUBSUB_EMULATOR_HOST")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gmail-sim");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("startup line in time")
        .unwrap()
        .expect("a line");
    let base = line
        .strip_prefix("gmail-sim listening on ")
        .expect("startup line")
        .to_string();
    let c = http();
    c.post(format!("{base}/_sim/mailboxes/x@example.com/deliver"))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let h: Value = c
        .get(format!(
            "{base}/gmail/v1/users/x@example.com/history?startHistoryId=42"
        ))
        .bearer_auth("t")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["history"].as_array().unwrap().len(), 1);
    let knob: Value = c
        .post(format!("{base}/_sim/watch"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(knob["processingMs"], 250);
    let w: Value = c
        .post(format!("{base}/gmail/v1/users/x@example.com/watch"))
        .bearer_auth("t")
        .json(&json!({"topicName": T1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let exp: u64 = w["expiration"].as_str().unwrap().parse().unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        exp > now_ms + 3_500_000 && exp <= now_ms + 3_600_000,
        "{exp}"
    );
    child.start_kill().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
}

// ---- users.watch / users.stop: one push client per mailbox ----

const T1: &str = "projects/p/topics/t1";
const T2: &str = "projects/p/topics/t2";
const CONFLICT: &str =
    "Only one user push notification client allowed per developer (call /stop then try again)";

async fn watch_on(sim: &GmailSim, email: &str, topic: &str) -> Resp {
    post(
        sim,
        TOKEN,
        &users(email, "watch"),
        json!({"topicName": topic}),
    )
    .await
}

fn expiration_of(r: &Resp) -> u64 {
    r.body["expiration"].as_str().unwrap().parse().unwrap()
}

fn assert_conflict(r: &Resp) {
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["code"], 400);
    assert_eq!(r.body["error"]["message"], CONFLICT);
    assert_eq!(r.body["error"]["status"], "FAILED_PRECONDITION");
    assert_eq!(r.body["error"]["errors"][0]["reason"], "failedPrecondition");
    assert_eq!(r.body["error"]["errors"][0]["domain"], "global");
    assert_eq!(r.body["error"]["errors"][0]["message"], CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_watch_for_one_mailbox_is_refused() {
    let sim = GmailSim::start(SimConfig {
        watch_processing: Duration::from_millis(1000),
        ..cfg()
    })
    .await
    .unwrap();
    sim.add_mailbox(A);
    sim.add_mailbox(B);
    let first = {
        let sim = sim.clone();
        tokio::spawn(async move { watch_on(&sim, A, T1).await })
    };
    wait_until("first watch in processing", Duration::from_secs(10), || {
        sim.watch_in_progress(A)
    })
    .await;
    // A racing watch of the same mailbox (same topic, as a second replica would send it).
    let second = watch_on(&sim, A, T1).await;
    assert_conflict(&second);
    // The state is per mailbox: another mailbox is watched meanwhile.
    let other = watch_on(&sim, B, T1).await;
    assert_eq!(other.status, 200, "{}", other.body);
    let first = first.await.unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(!sim.watch_in_progress(A));
    assert_eq!(sim.watch_topic(A).as_deref(), Some(T1));
    assert_eq!(sim.watch_expiration(A), Some(expiration_of(&first)));

    let ledger = sim.ledger();
    let calls = ledger.watch_calls_for(A);
    let got: Vec<(u16, Option<&str>, u64, bool)> = calls
        .iter()
        .map(|c| (c.status, c.error_reason.as_deref(), c.cost, c.faulted))
        .collect();
    // Completion order: the refused call answers first. Both passed the quota check: charged.
    assert_eq!(
        got,
        [
            (400, Some("failedPrecondition"), 100, false),
            (200, None, 100, false)
        ]
    );
    let overlaps = ledger.overlapping_calls(Endpoint::Watch);
    assert_eq!(overlaps.len(), 1, "{overlaps:?}");
    let (m, earlier, later) = &overlaps[0];
    assert_eq!(m, A);
    assert_eq!((earlier.status, later.status), (200, 400));
    assert!(later.started < earlier.ended);
    assert_eq!(ledger.calls_by_mailbox(Endpoint::Watch)[B].len(), 1);

    // Sequential renewals after it are fine.
    assert_eq!(watch_on(&sim, A, T1).await.status, 200);

    // A request refused by validation never enters processing.
    let bad = post(&sim, TOKEN, &users(A, "watch"), json!({"topicName": "x"})).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["error"]["errors"][0]["reason"], "invalidArgument");
    assert!(!sim.watch_in_progress(A));

    // A client that gives up during processing clears the state; its watch registers nothing.
    sim.set_watch_processing(Duration::from_secs(5));
    let before = sim.watch_expiration(A);
    let err = http()
        .post(format!("{}{}", sim.base_url(), users(A, "watch")))
        .bearer_auth(TOKEN)
        .json(&json!({"topicName": T1}))
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .expect_err("processing outlasts the client");
    assert!(err.is_timeout());
    wait_until("cancelled watch released", Duration::from_secs(10), || {
        !sim.watch_in_progress(A)
    })
    .await;
    assert_eq!(sim.watch_expiration(A), before);
    wait_until("cancelled call recorded", Duration::from_secs(10), || {
        sim.ledger()
            .watch_calls_for(A)
            .iter()
            .any(|c| c.status == 499)
    })
    .await;
    sim.set_watch_processing(Duration::ZERO);
    assert_eq!(watch_on(&sim, A, T1).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_topic_rules_renewal_and_stop() {
    let sim = GmailSim::start(SimConfig {
        notify_min_interval: Duration::from_millis(10),
        ..cfg()
    })
    .await
    .unwrap();
    let h0 = sim.add_mailbox(A);
    assert_eq!(sim.watch_expiration(A), None);
    let w1 = watch_on(&sim, A, T1).await;
    assert_eq!(w1.status, 200, "{}", w1.body);
    let exp1 = expiration_of(&w1);
    assert_eq!(sim.watch_expiration(A), Some(exp1));
    wait_until("first watch notification", Duration::from_secs(10), || {
        sim.ledger().notifications_for(A).len() == 1
    })
    .await;

    // Another topic while the watch is active: refused, the watch is untouched.
    let other = watch_on(&sim, A, T2).await;
    assert_conflict(&other);
    assert_eq!(sim.watch_topic(A).as_deref(), Some(T1));
    assert_eq!(sim.watch_expiration(A), Some(exp1));

    // Same topic: a renewal with a later expiration and the immediate notification.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let w2 = watch_on(&sim, A, T1).await;
    assert_eq!(w2.status, 200, "{}", w2.body);
    assert_eq!(w2.body["historyId"], json!(h0.to_string()));
    let exp2 = expiration_of(&w2);
    assert!(exp2 > exp1, "{exp2} > {exp1}");
    assert_eq!(sim.watch_expiration(A), Some(exp2));
    wait_until("renewal notification", Duration::from_secs(10), || {
        sim.ledger().notifications_for(A).len() == 2
    })
    .await;
    let notes = sim.ledger();
    let notes = notes.notifications_for(A);
    assert!(notes.iter().all(|n| n.topic == T1 && n.history_id == h0));

    // Without watch processing time, concurrent same-topic watches serialize: all succeed.
    let mut racing = Vec::new();
    for _ in 0..4 {
        let sim = sim.clone();
        racing.push(tokio::spawn(async move { watch_on(&sim, A, T1).await }));
    }
    for r in racing {
        assert_eq!(r.await.unwrap().status, 200);
    }

    // stop, then any topic works.
    assert_eq!(
        post(&sim, TOKEN, &users(A, "stop"), Value::Null)
            .await
            .status,
        204
    );
    assert_eq!(sim.watch_expiration(A), None);
    assert_eq!(sim.watch_topic(A), None);
    let w3 = watch_on(&sim, A, T2).await;
    assert_eq!(w3.status, 200, "{}", w3.body);
    assert_eq!(sim.watch_topic(A).as_deref(), Some(T2));
    assert_eq!(sim.watch_expiration(A), Some(expiration_of(&w3)));
    let reasons: Vec<Option<String>> = sim
        .ledger()
        .watch_calls_for(A)
        .iter()
        .map(|c| c.error_reason.clone())
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| r.is_some()).count(),
        1,
        "{reasons:?}"
    );

    // An expired watch no longer holds its topic.
    let short = GmailSim::start(SimConfig {
        watch_lifetime: Duration::from_millis(100),
        ..cfg()
    })
    .await
    .unwrap();
    short.add_mailbox(A);
    assert_eq!(watch_on(&short, A, T1).await.status, 200);
    assert_conflict(&watch_on(&short, A, T2).await);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(watch_on(&short, A, T2).await.status, 200);
    assert_eq!(short.watch_topic(A).as_deref(), Some(T2));
}

fn call_at(endpoint: Endpoint, mailbox: Option<&str>, from_ms: u64, to_ms: u64) -> LedgerEntry {
    let t = |ms| std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms);
    LedgerEntry::Call(CallEntry {
        endpoint,
        mailbox: mailbox.map(str::to_string),
        bearer: None,
        cost: 0,
        status: 200,
        error_reason: None,
        faulted: false,
        batch: None,
        started: t(from_ms),
        ended: t(to_ms),
    })
}

#[test]
fn overlapping_calls_from_intervals() {
    let ledger = Ledger {
        entries: vec![
            call_at(Endpoint::Watch, Some(A), 0, 10),
            call_at(Endpoint::Watch, Some(A), 10, 20), // touches the first: no overlap
            call_at(Endpoint::Watch, Some(B), 0, 100),
            call_at(Endpoint::Watch, Some(B), 50, 60),
            call_at(Endpoint::Watch, Some(B), 55, 200),
            call_at(Endpoint::Watch, None, 0, 1000), // no mailbox: ignored
            call_at(Endpoint::Stop, Some(A), 5, 15), // another endpoint
        ],
    };
    let got: Vec<(String, u64, u64)> = ledger
        .overlapping_calls(Endpoint::Watch)
        .into_iter()
        .map(|(m, a, b)| {
            let ms = |c: &CallEntry| {
                c.started
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64
                    - 1_700_000_000_000
            };
            (m, ms(&a), ms(&b))
        })
        .collect();
    assert_eq!(
        got,
        [
            (B.to_string(), 0, 50),
            (B.to_string(), 0, 55),
            (B.to_string(), 50, 55)
        ]
    );
    assert!(ledger.overlapping_calls(Endpoint::Stop).is_empty());
    assert!(ledger.overlapping_calls(Endpoint::GetProfile).is_empty());
    assert_eq!(ledger.watch_calls_for(A).len(), 2);
    let by = ledger.calls_by_mailbox(Endpoint::Watch);
    assert_eq!(
        by.iter()
            .map(|(m, c)| (m.as_str(), c.len()))
            .collect::<Vec<_>>(),
        [(A, 2), (B, 3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_calls_seen_on_the_wire() {
    let sim = sim().await;
    sim.add_mailbox(A);
    sim.add_mailbox(B);
    for _ in 0..3 {
        assert_eq!(watch_on(&sim, A, T1).await.status, 200);
        assert_eq!(
            get(&sim, TOKEN, &users(A, "profile"), &[]).await.status,
            200
        );
    }
    assert!(sim.ledger().overlapping_calls(Endpoint::Watch).is_empty());
    assert!(
        sim.ledger()
            .overlapping_calls(Endpoint::GetProfile)
            .is_empty()
    );
    // Two slow calls of A at once (and one of B at the same time, another mailbox).
    sim.inject(
        FaultRule::new(
            Some(Endpoint::GetProfile),
            FaultAction::latency(Duration::from_millis(500)),
        )
        .times(3),
    );
    let mut calls = Vec::new();
    for m in [A, A, B] {
        let sim = sim.clone();
        calls.push(tokio::spawn(async move {
            get(&sim, TOKEN, &users(m, "profile"), &[]).await.status
        }));
    }
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let overlaps = sim.ledger().overlapping_calls(Endpoint::GetProfile);
    assert_eq!(overlaps.len(), 1, "{overlaps:?}");
    assert_eq!(overlaps[0].0, A);
    assert!(overlaps[0].1.faulted && overlaps[0].2.faulted);
    assert!(sim.ledger().overlapping_calls(Endpoint::Watch).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_watch_and_stop_failures_per_mailbox() {
    let sim = sim().await;
    sim.add_mailbox(A);
    sim.add_mailbox(B);
    assert_eq!(watch_on(&sim, A, T1).await.status, 200);
    assert_eq!(watch_on(&sim, B, T1).await.status, 200);

    // users.stop for a mailbox whose grant is gone: 401, then 403; the watch stays.
    let f =
        sim.inject(FaultRule::new(Some(Endpoint::Stop), FaultAction::ExpiredToken).for_mailbox(A));
    for _ in 0..2 {
        let r = post(&sim, TOKEN, &users(A, "stop"), Value::Null).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.body["error"]["errors"][0]["reason"], "authError");
    }
    assert!(sim.remove_fault(f));
    sim.inject(
        FaultRule::new(
            Some(Endpoint::Stop),
            FaultAction::forbidden("insufficientPermissions"),
        )
        .for_mailbox(A)
        .times(1),
    );
    let r = post(&sim, TOKEN, &users(A, "stop"), Value::Null).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.body["error"]["errors"][0]["reason"],
        "insufficientPermissions"
    );
    assert_eq!(sim.watch_topic(A).as_deref(), Some(T1));
    // Other mailboxes are unaffected.
    assert_eq!(
        post(&sim, TOKEN, &users(B, "stop"), Value::Null)
            .await
            .status,
        204
    );

    // users.watch refused for good for one mailbox: Gmail no longer enabled.
    sim.inject(
        FaultRule::new(
            Some(Endpoint::Watch),
            FaultAction::mail_service_not_enabled(),
        )
        .for_mailbox(A),
    );
    for _ in 0..2 {
        let r = watch_on(&sim, A, T1).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.body["error"]["message"], "Mail service not enabled");
        assert_eq!(r.body["error"]["status"], "FAILED_PRECONDITION");
        assert_eq!(r.body["error"]["errors"][0]["reason"], "failedPrecondition");
    }
    // Same body as a mailbox the simulator does not know.
    let unknown = watch_on(&sim, "nobody@example.com", T1).await;
    assert_eq!(unknown.body, watch_on(&sim, A, T1).await.body);
    assert_eq!(watch_on(&sim, B, T1).await.status, 200);
    sim.clear_faults();

    // 403 domainPolicy (the domain disabled Gmail API access).
    sim.inject(
        FaultRule::new(
            Some(Endpoint::Watch),
            FaultAction::forbidden("domainPolicy"),
        )
        .for_mailbox(A),
    );
    let r = watch_on(&sim, A, T1).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.body["error"]["errors"][0]["reason"], "domainPolicy");
    assert_eq!(r.body["error"]["status"], "PERMISSION_DENIED");
    sim.clear_faults();

    // A scripted conflict without timing.
    sim.inject(
        FaultRule::new(Some(Endpoint::Watch), FaultAction::watch_conflict())
            .for_mailbox(A)
            .times(1),
    );
    assert_conflict(&watch_on(&sim, A, T1).await);
    assert!(!sim.watch_in_progress(A));
    assert_eq!(watch_on(&sim, A, T1).await.status, 200);

    // Injected refusals are recorded as faulted and uncharged.
    let ledger = sim.ledger();
    let refused: Vec<_> = ledger
        .calls_for(A)
        .into_iter()
        .filter(|c| c.faulted)
        .collect();
    assert_eq!(refused.len(), 2 + 1 + 3 + 1 + 1);
    assert!(refused.iter().all(|c| c.cost == 0 && c.status >= 400));
    let reasons: Vec<&str> = refused
        .iter()
        .filter_map(|c| c.error_reason.as_deref())
        .collect();
    assert_eq!(
        reasons,
        [
            "authError",
            "authError",
            "insufficientPermissions",
            "failedPrecondition",
            "failedPrecondition",
            "failedPrecondition",
            "domainPolicy",
            "failedPrecondition"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_knobs_over_the_control_api() {
    let sim = sim().await;
    sim.add_mailbox(A);
    let c = http();
    let url = |p: &str| format!("{}/_sim{}", sim.base_url(), p);
    let set: Value = c
        .post(url("/watch"))
        .json(&json!({"processingMs": 1500}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(set["processingMs"], 1500);
    let mailbox = |c: reqwest::Client| {
        let u = url(&format!("/mailboxes/{A}"));
        async move {
            c.get(u)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let before = mailbox(c.clone()).await;
    assert_eq!(before["watchInProgress"], false);
    assert_eq!(before["watchExpiration"], Value::Null);
    let first = {
        let sim = sim.clone();
        tokio::spawn(async move { watch_on(&sim, A, T1).await })
    };
    wait_until("watch in processing", Duration::from_secs(10), || {
        sim.watch_in_progress(A)
    })
    .await;
    assert_eq!(mailbox(c.clone()).await["watchInProgress"], true);
    assert_conflict(&watch_on(&sim, A, T1).await);
    let first = first.await.unwrap();
    assert_eq!(first.status, 200);
    let after = mailbox(c.clone()).await;
    assert_eq!(after["watchInProgress"], false);
    assert_eq!(after["watchExpiration"], first.body["expiration"]);
    assert_eq!(after["watchTopic"], T1);
    let list: Value = c
        .get(url("/mailboxes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["watchExpiration"], first.body["expiration"]);
    // An empty body reads the knob; 0 makes watch atomic again.
    let read: Value = c
        .post(url("/watch"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read["processingMs"], 1500);
    c.post(url("/watch"))
        .json(&json!({"processingMs": 0}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    // Fault rules for the new constructors round-trip through JSON.
    let rule = FaultRule::new(
        Some(Endpoint::Watch),
        FaultAction::mail_service_not_enabled(),
    )
    .for_mailbox(A)
    .times(1);
    c.post(url("/faults"))
        .json(&rule)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    assert_eq!(sim.faults()[0].1, rule);
    assert_eq!(watch_on(&sim, A, T1).await.status, 400);
    assert_eq!(watch_on(&sim, A, T1).await.status, 200);
}

/// `messages.get` metadata: `metadataHeaders` selects headers (case-insensitive), `minimal`
/// has none; the ledger's messageAdded entry carries the same metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_metadata_is_deterministic_and_selectable() {
    let sim = sim().await;
    sim.add_mailbox(A);
    let root = sim.deliver(A, &["INBOX"]);
    let reply = sim.reply(A, &root, &["INBOX"]);
    let r = get(
        &sim,
        TOKEN,
        &users(A, &format!("messages/{reply}")),
        &[
            ("format", "metadata"),
            ("metadataHeaders", "in-reply-to"),
            ("metadataHeaders", "From"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let headers = r.body["payload"]["headers"].as_array().unwrap();
    let names: Vec<&str> = headers
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["From", "In-Reply-To"],
        "message order, only those asked for"
    );
    assert_eq!(
        headers[1]["value"],
        json!(format!("<{root}@gmail-sim.invalid>"))
    );
    let ledger = sim.ledger();
    let added = ledger.changes_for(A);
    let meta = added[1]
        .message
        .as_ref()
        .expect("messageAdded carries its metadata");
    assert_eq!(meta.header("From"), headers[0]["value"].as_str());
    assert_eq!(r.body["snippet"], json!(meta.snippet));
    assert_eq!(
        r.body["internalDate"],
        json!(meta.internal_date_ms.to_string())
    );
    let all = get(
        &sim,
        TOKEN,
        &users(A, &format!("messages/{reply}")),
        &[("format", "metadata")],
    )
    .await;
    assert_eq!(
        all.body["payload"]["headers"].as_array().unwrap().len(),
        meta.headers.len()
    );
    let minimal = get(
        &sim,
        TOKEN,
        &users(A, &format!("messages/{reply}")),
        &[("format", "minimal")],
    )
    .await;
    assert!(minimal.body.get("payload").is_none());
}

fn batch_body(boundary: &str, targets: &[String]) -> String {
    let mut body = String::new();
    for (i, t) in targets.iter().enumerate() {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Type: application/http\r\nContent-ID: <item-{i}>\r\n\r\nGET {t} HTTP/1.1\r\n\r\n\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    body
}

async fn send_batch(sim: &GmailSim, body: String) -> (u16, String, String) {
    let r = http()
        .post(format!("{}/batch/gmail/v1", sim.base_url()))
        .bearer_auth(TOKEN)
        .header("Content-Type", "multipart/mixed; boundary=\"bb_1\"")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ct, r.text().await.unwrap())
}

/// The batch endpoint: one part per request through the whole pipeline (faults per part, one
/// ledger entry each, charged like direct calls), 404 for a deleted message, > 100 parts → 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_answers_each_part_through_the_pipeline() {
    let sim = sim().await;
    sim.add_mailbox(A);
    let ids: Vec<String> = (0..3).map(|_| sim.deliver(A, &["INBOX"])).collect();
    sim.delete(A, &ids[1]);
    sim.inject(
        FaultRule::new(
            Some(Endpoint::MessagesGet),
            FaultAction::too_many_requests(1),
        )
        .for_mailbox(A)
        .times(1),
    );
    let targets: Vec<String> = ids
        .iter()
        .map(|id| {
            format!(
                "/gmail/v1/users/{}/messages/{id}?format=metadata&metadataHeaders=Subject",
                A.replace('@', "%40")
            )
        })
        .collect();
    let (status, ct, text) = send_batch(&sim, batch_body("bb_1", &targets)).await;
    assert_eq!(status, 200);
    let boundary = ct
        .split("boundary=")
        .nth(1)
        .expect("a boundary")
        .to_string();
    let parts: Vec<&str> = text.split(&format!("--{boundary}")).skip(1).collect();
    assert_eq!(
        parts.len(),
        4,
        "three parts and the closing delimiter: {text}"
    );
    assert!(
        parts[0].contains("Content-ID: <response-item-0>") && parts[0].contains("HTTP/1.1 429")
    );
    assert!(parts[0].contains("Retry-After: 1"), "{}", parts[0]);
    assert!(
        parts[1].contains("Content-ID: <response-item-1>") && parts[1].contains("HTTP/1.1 404")
    );
    assert!(parts[2].contains("HTTP/1.1 200") && parts[2].contains("\"Subject\""));
    assert!(!parts[2].contains("\"From\""));
    assert_eq!(parts[3].trim(), "--");
    let ledger = sim.ledger();
    let gets = ledger.calls_to_for(Endpoint::MessagesGet, A);
    let seen: Vec<(u16, u64, Option<u64>)> =
        gets.iter().map(|c| (c.status, c.cost, c.batch)).collect();
    assert_eq!(
        seen,
        [(429, 0, Some(1)), (404, 5, Some(1)), (200, 5, Some(1))]
    );
    assert_eq!(ledger.calls_to(Endpoint::Batch).len(), 1);
    assert_eq!(ledger.calls_to(Endpoint::Batch)[0].cost, 0);

    let too_many: Vec<String> = (0..101).map(|_| targets[0].clone()).collect();
    let (status, _, _) = send_batch(&sim, batch_body("bb_1", &too_many)).await;
    assert_eq!(status, 400);
    assert_eq!(
        sim.ledger().calls_to_for(Endpoint::MessagesGet, A).len(),
        3,
        "nothing per part"
    );
}
