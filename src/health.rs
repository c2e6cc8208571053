//! Liveness and readiness without a port: the worker keeps two files fresh, and
//! `gmail-sync health --live|--ready` (a Kubernetes exec probe) checks them.
//!
//! - `live`: the epoch second of the last heartbeat, rewritten every 5 s only while the
//!   dispatcher loop keeps turning (it bumps a counter at least every 5 s);
//! - `ready`: present from the end of the startup checks until shutdown begins, except while
//!   the failure guard sees a mass failure (a configuration problem: see `failure_guard`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// A heartbeat older than this fails the liveness probe.
pub const MAX_HEARTBEAT_AGE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Health {
    dir: PathBuf,
    /// Set for good when shutdown begins: a later readiness check must not bring the file back.
    stopping: Arc<AtomicBool>,
}

/// Whether the worker can do its work, asked every heartbeat period.
pub(crate) type Readiness = Box<dyn Fn() -> Result<(), String> + Send>;

impl Health {
    pub fn new(dir: &Path) -> Health {
        Health {
            dir: dir.to_path_buf(),
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    fn live_file(&self) -> PathBuf {
        self.dir.join("live")
    }

    fn ready_file(&self) -> PathBuf {
        self.dir.join("ready")
    }

    pub fn mark_ready(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| anyhow::anyhow!("GMAIL_SYNC_HEALTH_DIR {}: {e}", self.dir.display()))?;
        self.beat()?;
        std::fs::write(self.ready_file(), b"ready\n")?;
        Ok(())
    }

    pub fn mark_not_ready(&self) {
        self.stopping.store(true, SeqCst);
        let _ = std::fs::remove_file(self.ready_file());
    }

    /// Follows `readiness` while running: the file goes away while it says no, and comes
    /// back when it says yes again (never after shutdown began).
    fn follow(&self, readiness: &Readiness) {
        if self.stopping.load(SeqCst) {
            return;
        }
        let ready_file = self.ready_file();
        match readiness() {
            Ok(()) if !ready_file.exists() => {
                if let Err(e) = std::fs::write(&ready_file, b"ready\n") {
                    tracing::warn!(error = %e, "cannot write the readiness file");
                }
            }
            Err(why) if ready_file.exists() => {
                tracing::warn!(why = %why, "not ready");
                let _ = std::fs::remove_file(ready_file);
            }
            _ => {}
        }
    }

    fn beat(&self) -> std::io::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        // Write then rename: a probe never reads a half-written file.
        let tmp = self.dir.join("live.tmp");
        std::fs::write(&tmp, format!("{now}\n"))?;
        std::fs::rename(tmp, self.live_file())
    }

    /// Rewrites `live` every 5 s while `heartbeat` advances, and keeps `ready` in step with
    /// `readiness`.
    pub(crate) async fn keep_alive(
        self,
        heartbeat: Arc<AtomicU64>,
        readiness: Readiness,
        stop: CancellationToken,
    ) {
        let mut last = heartbeat.load(Relaxed);
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.follow(&readiness);
            let now = heartbeat.load(Relaxed);
            if now != last {
                last = now;
                if let Err(e) = self.beat() {
                    tracing::warn!(error = %e, "cannot write the liveness file");
                }
            }
        }
    }

    /// The probe: Ok if the heartbeat is fresh (and, for readiness, the ready file exists).
    pub fn probe(&self, ready: bool) -> Result<(), String> {
        let raw = std::fs::read_to_string(self.live_file())
            .map_err(|e| format!("no heartbeat file {}: {e}", self.live_file().display()))?;
        let at: u64 = raw
            .trim()
            .parse()
            .map_err(|_| "heartbeat file is corrupt".to_string())?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let age = now.saturating_sub(at);
        if age > MAX_HEARTBEAT_AGE.as_secs() {
            return Err(format!("last heartbeat {age} s ago"));
        }
        if ready && !self.ready_file().exists() {
            return Err("not ready (starting or shutting down)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_follows_the_files() {
        let dir = std::env::temp_dir().join(format!("gmail-sync-health-{}", std::process::id()));
        let h = Health::new(&dir);
        assert!(h.probe(false).is_err());
        h.mark_ready().unwrap();
        assert!(h.probe(false).is_ok());
        assert!(h.probe(true).is_ok());
        h.mark_not_ready();
        assert!(h.probe(true).is_err());
        std::fs::write(dir.join("live"), "1\n").unwrap();
        assert!(h.probe(false).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
