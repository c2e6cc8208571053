//! Access tokens cached per mailbox, refreshed by one exchange however many syncs ask at once.
//!
//! Concurrency: the map sits behind a `std::sync::Mutex` held only for lookups and inserts,
//! never across an await. A miss installs a [`Flight`] (a `tokio::sync::OnceCell`) for the
//! mailbox; every caller that arrives while it is pending awaits the same cell, so a burst of
//! syncs for one mailbox costs one token exchange (single flight). The first caller to poll the
//! cell runs the exchange; if that caller is dropped (its sync cancelled), the next waiter runs
//! it instead, which `OnceCell::get_or_init` guarantees. A failed exchange is not cached: the
//! cell holds the error for those already waiting, and the next call starts a new flight.

use super::{AccessToken, AuthError, Mint, Minted, TokenFuture, TokenSource};
use crate::mailbox::Mailbox;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// A token is replaced this long before it expires, so a request never leaves with a token
/// that lapses in flight (Gmail calls time out after at most a few minutes; Google's own
/// libraries refresh 4 minutes early).
pub(crate) const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Tokens kept in memory at most. A replica touches the mailboxes it is notified for; past
/// this many the soonest-expiring are dropped (and minted again when needed). At ~200 bytes an
/// entry this bounds the cache near 2 MiB.
pub(crate) const DEFAULT_CAPACITY: usize = 10_000;

type Flight = Arc<OnceCell<Result<Minted, AuthError>>>;

enum Entry {
    Fresh {
        token: AccessToken,
        refresh_at: Instant,
    },
    Minting(Flight),
}

pub(crate) struct TokenCache<M> {
    mint: M,
    entries: Mutex<HashMap<Mailbox, Entry>>,
    capacity: usize,
}

impl<M: Mint> TokenCache<M> {
    pub fn new(mint: M, capacity: usize) -> TokenCache<M> {
        TokenCache {
            mint,
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    pub async fn get(&self, mailbox: &Mailbox) -> Result<AccessToken, AuthError> {
        let flight = {
            let mut entries = self.entries.lock().expect("token cache lock");
            match entries.get(mailbox) {
                Some(Entry::Fresh { token, refresh_at }) if Instant::now() < *refresh_at => {
                    return Ok(token.clone());
                }
                Some(Entry::Minting(flight)) => flight.clone(),
                _ => {
                    let flight = Flight::default();
                    entries.insert(mailbox.clone(), Entry::Minting(flight.clone()));
                    flight
                }
            }
        };
        let result = flight.get_or_init(|| self.mint.mint(mailbox)).await.clone();
        let mut entries = self.entries.lock().expect("token cache lock");
        // Only the flight that is still current may settle the entry: an `invalidate` or a
        // newer flight may have replaced it meanwhile.
        let current =
            matches!(entries.get(mailbox), Some(Entry::Minting(f)) if Arc::ptr_eq(f, &flight));
        match result {
            Ok(minted) => {
                if current {
                    let refresh_at =
                        Instant::now() + minted.lifetime.saturating_sub(REFRESH_MARGIN);
                    entries.insert(
                        mailbox.clone(),
                        Entry::Fresh {
                            token: minted.token.clone(),
                            refresh_at,
                        },
                    );
                    Self::bound(&mut entries, self.capacity);
                }
                Ok(minted.token)
            }
            Err(e) => {
                if current {
                    entries.remove(mailbox);
                }
                Err(e)
            }
        }
    }

    /// The minting side, for startup checks that bypass the cache.
    pub fn mint_ref(&self) -> &M {
        &self.mint
    }

    pub fn forget(&self, mailbox: &Mailbox, token: &AccessToken) {
        let mut entries = self.entries.lock().expect("token cache lock");
        if matches!(entries.get(mailbox), Some(Entry::Fresh { token: t, .. }) if t == token) {
            entries.remove(mailbox);
        }
    }

    /// Over capacity: drop stale entries, then the fresh ones that need refreshing soonest.
    /// Pending flights stay (their callers are waiting on them). O(n), and only when full.
    fn bound(entries: &mut HashMap<Mailbox, Entry>, capacity: usize) {
        if entries.len() <= capacity {
            return;
        }
        let now = Instant::now();
        entries.retain(|_, e| !matches!(e, Entry::Fresh { refresh_at, .. } if *refresh_at <= now));
        let excess = entries.len().saturating_sub(capacity);
        if excess == 0 {
            return;
        }
        let mut fresh: Vec<(Instant, Mailbox)> = entries
            .iter()
            .filter_map(|(m, e)| match e {
                Entry::Fresh { refresh_at, .. } => Some((*refresh_at, m.clone())),
                Entry::Minting(_) => None,
            })
            .collect();
        fresh.sort_unstable_by_key(|(at, _)| *at);
        for (_, mailbox) in fresh.into_iter().take(excess) {
            entries.remove(&mailbox);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

impl<M: Mint> TokenSource for TokenCache<M> {
    fn token<'a>(&'a self, mailbox: &'a Mailbox) -> TokenFuture<'a> {
        Box::pin(self.get(mailbox))
    }

    fn invalidate(&self, mailbox: &Mailbox, token: &AccessToken) {
        self.forget(mailbox, token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::MintFuture;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Counts exchanges; each takes 100 ms (paused time) and yields a numbered token.
    #[derive(Default)]
    struct CountingMint {
        calls: AtomicU32,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Mint for Arc<CountingMint> {
        fn mint<'a>(&'a self, _mailbox: &'a Mailbox) -> MintFuture<'a> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                if self.fail.load(Ordering::SeqCst) {
                    return Err(AuthError::Transient("down".into()));
                }
                Ok(Minted {
                    token: AccessToken::new(format!("t{n}")).unwrap(),
                    lifetime: Duration::from_secs(3600),
                })
            })
        }
    }

    fn mailbox(i: usize) -> Mailbox {
        Mailbox::parse(&format!("user{i}@x.com")).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_concurrent_requests_share_one_exchange() {
        let mint = Arc::new(CountingMint::default());
        let cache = Arc::new(TokenCache::new(mint.clone(), 10));
        let m = mailbox(1);
        let waiters: Vec<_> = (0..1000)
            .map(|_| {
                let (cache, m) = (cache.clone(), m.clone());
                tokio::spawn(async move { cache.get(&m).await })
            })
            .collect();
        for w in waiters {
            assert_eq!(w.await.unwrap().unwrap(), AccessToken::new("t1").unwrap());
        }
        assert_eq!(mint.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_refreshed_shortly_before_expiry_and_after_invalidate() {
        let mint = Arc::new(CountingMint::default());
        let cache = TokenCache::new(mint.clone(), 10);
        let m = mailbox(1);
        assert_eq!(
            cache.get(&m).await.unwrap(),
            AccessToken::new("t1").unwrap()
        );
        tokio::time::advance(Duration::from_secs(3600) - REFRESH_MARGIN - Duration::from_secs(1))
            .await;
        assert_eq!(
            cache.get(&m).await.unwrap(),
            AccessToken::new("t1").unwrap()
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            cache.get(&m).await.unwrap(),
            AccessToken::new("t2").unwrap()
        );
        // A 401 with an older token does not throw away the newer one.
        cache.forget(&m, &AccessToken::new("t1").unwrap());
        assert_eq!(
            cache.get(&m).await.unwrap(),
            AccessToken::new("t2").unwrap()
        );
        cache.forget(&m, &AccessToken::new("t2").unwrap());
        assert_eq!(
            cache.get(&m).await.unwrap(),
            AccessToken::new("t3").unwrap()
        );
        assert_eq!(mint.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_shared_by_waiters_but_not_cached() {
        let mint = Arc::new(CountingMint::default());
        mint.fail.store(true, Ordering::SeqCst);
        let cache = Arc::new(TokenCache::new(mint.clone(), 10));
        let m = mailbox(1);
        let a = tokio::spawn({
            let (cache, m) = (cache.clone(), m.clone());
            async move { cache.get(&m).await }
        });
        let b = tokio::spawn({
            let (cache, m) = (cache.clone(), m.clone());
            async move { cache.get(&m).await }
        });
        assert!(a.await.unwrap().is_err());
        assert!(b.await.unwrap().is_err());
        assert_eq!(mint.calls.load(Ordering::SeqCst), 1);
        mint.fail.store(false, Ordering::SeqCst);
        assert_eq!(
            cache.get(&m).await.unwrap(),
            AccessToken::new("t2").unwrap()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_first_caller_hands_the_exchange_to_the_next() {
        let mint = Arc::new(CountingMint::default());
        let cache = Arc::new(TokenCache::new(mint.clone(), 10));
        let m = mailbox(1);
        let first = tokio::spawn({
            let (cache, m) = (cache.clone(), m.clone());
            async move { cache.get(&m).await }
        });
        tokio::time::advance(Duration::from_millis(10)).await;
        let second = tokio::spawn({
            let (cache, m) = (cache.clone(), m.clone());
            async move { cache.get(&m).await }
        });
        tokio::task::yield_now().await;
        first.abort();
        assert!(second.await.unwrap().is_ok());
        assert_eq!(
            cache.get(&m).await.unwrap(),
            AccessToken::new("t2").unwrap()
        );
        assert_eq!(
            mint.calls.load(Ordering::SeqCst),
            2,
            "the abandoned exchange is redone once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded() {
        let mint = Arc::new(CountingMint::default());
        let cache = TokenCache::new(mint.clone(), 100);
        for i in 0..1000 {
            cache.get(&mailbox(i)).await.unwrap();
        }
        assert!(cache.len() <= 100, "{} entries", cache.len());
    }
}
