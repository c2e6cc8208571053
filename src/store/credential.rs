//! Sealed refresh tokens (see `vault` for the layout), one per mailbox, in the shard's
//! `credentials` hash (field = mailbox). The store keeps bytes and never sees a plaintext.

use super::script::ScriptCall;
use super::{Store, StoreError};
use crate::mailbox::Mailbox;
use redis::Script;
use std::sync::LazyLock;

static REPLACE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("replace_credential.lua")));

/// HSCAN's COUNT hint for walking a shard's credentials (`keys rotate`).
const CREDENTIAL_SCAN_COUNT: usize = 100;

/// What [`Store::replace_credential`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replaced {
    /// The expected value was there and is now the new one.
    Replaced,
    /// Another value is stored now (e.g. `mailbox add` with a new token): nothing written.
    Changed,
    /// The mailbox has no credential any more (removed): nothing written.
    Gone,
}

/// One page of a shard's credentials: where to continue (0 = done) and (field, sealed) pairs.
pub type CredentialPage = (u64, Vec<(String, Vec<u8>)>);

impl Store {
    /// Stores `sealed` as the mailbox's credential, replacing any earlier one.
    pub async fn put_credential(&self, mailbox: &Mailbox, sealed: &[u8]) -> Result<(), StoreError> {
        let _: i64 = self
            .conn
            .retrying(|mut c| {
                let key = self.keys.credentials_of(mailbox);
                async move {
                    redis::cmd("HSET")
                        .arg(key)
                        .arg(mailbox.as_str())
                        .arg(sealed)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(())
    }

    /// The mailbox's sealed credential, if one is stored.
    pub async fn credential(&self, mailbox: &Mailbox) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn
            .retrying(|mut c| {
                let key = self.keys.credentials_of(mailbox);
                async move {
                    redis::cmd("HGET")
                        .arg(key)
                        .arg(mailbox.as_str())
                        .query_async(&mut c)
                        .await
                }
            })
            .await
    }

    /// Replaces the credential with `sealed` only if it is still `expected` (compare and set,
    /// one script on the shard's slot). A retry after a lost reply finds its own value there:
    /// that is `Replaced` too (`sealed` has a fresh random nonce, nobody else wrote it).
    pub async fn replace_credential(
        &self,
        mailbox: &Mailbox,
        expected: &[u8],
        sealed: &[u8],
    ) -> Result<Replaced, StoreError> {
        let mut call = ScriptCall::new(&REPLACE, 1);
        call.key(self.keys.credentials_of(mailbox))
            .arg(mailbox.as_str())
            .arg(expected)
            .arg(sealed);
        let reply: String = self
            .conn
            .retrying(|mut c| {
                let call = &call;
                async move { call.invoke(&mut c).await }
            })
            .await?;
        match reply.as_str() {
            "replaced" => Ok(Replaced::Replaced),
            "changed" if self.credential(mailbox).await?.as_deref() == Some(sealed) => {
                Ok(Replaced::Replaced)
            }
            "changed" => Ok(Replaced::Changed),
            "gone" => Ok(Replaced::Gone),
            other => Err(StoreError::Protocol(format!("replace_credential: {other}"))),
        }
    }

    /// How many credentials are stored, over all shards (`keys rotate`'s progress total).
    pub async fn credential_count(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for shard in 0..self.keys.shards() {
            let n: u64 = self
                .conn
                .retrying(|mut c| {
                    let key = self.keys.credentials(shard);
                    async move { redis::cmd("HLEN").arg(key).query_async(&mut c).await }
                })
                .await?;
            total += n;
        }
        Ok(total)
    }

    /// A page of `shard`'s credentials from HSCAN cursor `scan` (start at 0). HSCAN may return
    /// a credential twice across pages, never miss one present for the whole walk.
    pub async fn credentials_page(
        &self,
        shard: u32,
        scan: u64,
    ) -> Result<CredentialPage, StoreError> {
        let (next, flat): (u64, Vec<Vec<u8>>) = self
            .conn
            .retrying(|mut c| {
                let key = self.keys.credentials(shard);
                async move {
                    redis::cmd("HSCAN")
                        .arg(key)
                        .arg(scan)
                        .arg("COUNT")
                        .arg(CREDENTIAL_SCAN_COUNT)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        let mut page = Vec::with_capacity(flat.len() / 2);
        let mut fields = flat.into_iter();
        while let (Some(field), Some(sealed)) = (fields.next(), fields.next()) {
            let field = String::from_utf8(field)
                .map_err(|_| StoreError::Protocol("credential field is not UTF-8".into()))?;
            page.push((field, sealed));
        }
        Ok((next, page))
    }
}
