//! One call of a Lua script: `EVALSHA` with its keys and arguments encoded straight into one
//! command buffer (`redis::Cmd` keeps every argument in a single `Vec<u8>`).
//!
//! Why not `redis::ScriptInvocation`: it holds each key and argument in a `Vec<u8>` of its
//! own and copies them all into a `Cmd` at every call, so a sync's two scripts cost about 35
//! allocations (of about 50 per notification at 1,000 notifications/s). This builds the `Cmd`
//! once and sends it as is; a script Redis does not know yet (`NOSCRIPT`: a restarted or
//! failed-over Redis) is loaded and the same command sent again, as `ScriptInvocation` does.

use redis::{Cmd, FromRedisValue, RedisResult, Script, ToRedisArgs};

/// Arguments and bytes a call's buffer starts with (it grows past them if needed).
const CALL_ARGS: usize = 32;
const CALL_BYTES: usize = 512;

pub(super) struct ScriptCall<'s> {
    script: &'s Script,
    cmd: Cmd,
    /// Keys still to come: every key precedes every argument in `EVALSHA`.
    keys_left: usize,
}

impl<'s> ScriptCall<'s> {
    /// A call of `script` with exactly `keys` keys (`KEYS[1..=keys]`), added with
    /// [`ScriptCall::key`] before any argument.
    pub(super) fn new(script: &'s Script, keys: usize) -> ScriptCall<'s> {
        // Sized for a sync's scripts (`commit` with a few entries: ~20 arguments, ~400 bytes),
        // so the buffer is not regrown while the call is built.
        let mut cmd = Cmd::with_capacity(CALL_ARGS, CALL_BYTES);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
        ScriptCall {
            script,
            cmd,
            keys_left: keys,
        }
    }

    pub(super) fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        assert!(
            self.keys_left > 0,
            "more keys than declared for a script call"
        );
        self.keys_left -= 1;
        self.cmd.arg(key);
        self
    }

    pub(super) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        assert_eq!(self.keys_left, 0, "a script argument before its last key");
        self.cmd.arg(arg);
        self
    }

    /// Sends the call; loads the script first if Redis answers `NOSCRIPT`, then sends it again.
    pub(super) async fn invoke<T: FromRedisValue>(
        &self,
        con: &mut impl redis::aio::ConnectionLike,
    ) -> RedisResult<T> {
        assert_eq!(
            self.keys_left, 0,
            "fewer keys than declared for a script call"
        );
        match self.cmd.query_async(con).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.script.load_async(con).await?;
                self.cmd.query_async(con).await
            }
            done => done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_first_and_are_counted() {
        let script = Script::new("return KEYS[1]");
        let mut call = ScriptCall::new(&script, 2);
        call.key("a").key("b").arg(7u64).arg("x");
        let packed = String::from_utf8(call.cmd.get_packed_command()).unwrap();
        let expected = format!(
            "*7\r\n$7\r\nEVALSHA\r\n$40\r\n{}\r\n$1\r\n2\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\n7\r\n$1\r\nx\r\n",
            script.get_hash()
        );
        assert_eq!(packed, expected);
    }

    #[test]
    #[should_panic(expected = "a script argument before its last key")]
    fn an_argument_before_the_last_key_is_a_bug() {
        let script = Script::new("return 1");
        ScriptCall::new(&script, 1).arg(1u64);
    }
}
