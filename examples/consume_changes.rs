//! Reads gmail-sync's change streams with a Redis consumer group and prints each entry as a JSON
//! line, acknowledging it after printing (at-least-once, like any consumer group reader).
//!
//! ```sh
//! GMAIL_SYNC_REDIS_URL=redis://127.0.0.1:6379/ cargo run --example consume_changes -- [GROUP] [CONSUMER] [--once]
//! ```
//! Same environment as the worker (`GMAIL_SYNC_REDIS_URL`, `GMAIL_SYNC_KEY_PREFIX`,
//! `GMAIL_SYNC_SHARDS`), so it reads exactly the streams the worker writes. `--once` exits after
//! two seconds without new entries instead of waiting forever.
//!
//! It reads shard by shard with one `XREADGROUP` per stream, which also works on Redis Cluster
//! (each shard stream lives in its own slot). Blocking reads need their own connection: a
//! multiplexed connection would stall every other command behind them.

use gmail_sync::config::{Config, RedisNodes};
use gmail_sync::store::{KeyLayout, single_client};
use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let once = args.iter().any(|a| a == "--once");
    let mut positional = args.iter().filter(|a| !a.starts_with("--"));
    let group = positional
        .next()
        .cloned()
        .unwrap_or_else(|| "example".into());
    let consumer = positional.next().cloned().unwrap_or_else(|| "c1".into());

    let config = Config::from_env()?;
    let RedisNodes::Single(_) = &config.redis.nodes else {
        anyhow::bail!("this example reads a single Redis; set GMAIL_SYNC_REDIS_URL");
    };
    let keys = KeyLayout::new(&config.store.key_prefix, config.store.shards);
    // The worker's client: rediss://, the CA file and the password file work here too.
    let mut con = single_client(&config.redis)?
        .get_multiplexed_async_connection()
        .await?;
    let streams = keys.streams();
    for stream in &streams {
        // Start from the beginning of each stream the first time this group is created.
        let created: redis::RedisResult<()> = con.xgroup_create_mkstream(stream, &group, "0").await;
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(e.into());
        }
    }

    let mut idle_rounds = 0;
    loop {
        let mut got = 0;
        for stream in &streams {
            let opts = StreamReadOptions::default()
                .group(&group, &consumer)
                .count(100)
                .block(if once {
                    10
                } else {
                    1000 / streams.len().max(1)
                });
            let reply: Option<StreamReadReply> =
                con.xread_options(&[stream], &[">"], &opts).await?;
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                for entry in key.ids {
                    let mut fields = serde_json::Map::new();
                    fields.insert("stream".into(), key.key.clone().into());
                    fields.insert("id".into(), entry.id.clone().into());
                    for (field, value) in &entry.map {
                        let value: String =
                            redis::from_redis_value(value.clone()).unwrap_or_default();
                        fields.insert(field.clone(), value.into());
                    }
                    println!("{}", serde_json::Value::Object(fields));
                    let _: i64 = con.xack(&key.key, &group, &[&entry.id]).await?;
                    got += 1;
                }
            }
        }
        if got == 0 {
            idle_rounds += 1;
            if once && idle_rounds >= 20 {
                return Ok(());
            }
            if once {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        } else {
            idle_rounds = 0;
        }
    }
}
