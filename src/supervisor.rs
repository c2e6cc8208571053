//! Starts the worker's long-running tasks the same way and stops the process on the first
//! reason: a shutdown request, or any task ending (a task of a worker ends only on a failure).
//!
//! Two tiers, stopped in order: **workers** (the consumer; next, the scheduler) drain first,
//! while **background** tasks (health heartbeat, summary line) keep running, so the liveness
//! file stays fresh during a drain; then the background tasks stop. Every task is spawned on
//! the app's one `TaskTracker`; a panic is reported with the task's name, never swallowed.

use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tier {
    /// Does the service's work; drained first.
    Worker,
    /// Supports the workers (health, summaries); stopped after them.
    Background,
}

/// How a task ended.
#[derive(Debug)]
pub(crate) enum TaskEnd {
    /// Returned `Ok` (expected only after its stop token fired).
    Returned,
    Failed(anyhow::Error),
    Panicked(String),
}

/// Why the process is stopping.
#[derive(Debug)]
pub(crate) enum StopCause {
    /// SIGTERM/SIGINT (or the caller's token).
    Requested,
    /// A task ended before anyone asked it to.
    TaskEnded { task: &'static str, end: TaskEnd },
}

/// What the supervisor saw, for the exit code and the final log lines.
#[derive(Debug)]
pub(crate) struct Stopped {
    pub(crate) cause: StopCause,
    /// Tasks that failed or panicked while stopping (after the cause).
    pub(crate) failures: Vec<(&'static str, TaskEnd)>,
    /// Tasks still running when their bound ran out.
    pub(crate) stragglers: usize,
}

struct Ended {
    task: &'static str,
    tier: Tier,
    end: TaskEnd,
}

pub(crate) struct Supervisor {
    tracker: TaskTracker,
    stop_workers: CancellationToken,
    stop_background: CancellationToken,
    ended_tx: mpsc::UnboundedSender<Ended>,
    ended_rx: mpsc::UnboundedReceiver<Ended>,
    running: [usize; 2],
}

impl Supervisor {
    pub(crate) fn new(tracker: TaskTracker) -> Supervisor {
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        Supervisor {
            tracker,
            stop_workers: CancellationToken::new(),
            stop_background: CancellationToken::new(),
            ended_tx,
            ended_rx,
            running: [0, 0],
        }
    }

    /// Spawns `task(stop)`; `stop` fires when the process stops (workers) or after the workers
    /// have drained (background).
    pub(crate) fn spawn<F, Fut>(&mut self, name: &'static str, tier: Tier, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let stop = match tier {
            Tier::Worker => self.stop_workers.clone(),
            Tier::Background => self.stop_background.clone(),
        };
        let handle = self.tracker.spawn(task(stop));
        let ended = self.ended_tx.clone();
        self.running[tier as usize] += 1;
        // A second task awaits the first so a panic (JoinError) is reported with the name.
        self.tracker.spawn(async move {
            let end = match handle.await {
                Ok(Ok(())) => TaskEnd::Returned,
                Ok(Err(e)) => TaskEnd::Failed(e),
                Err(e) => TaskEnd::Panicked(e.to_string()),
            };
            // The supervisor outlives its tasks (it waits for each report or its bound).
            let _ = ended.send(Ended {
                task: name,
                tier,
                end,
            });
        });
    }

    /// Runs until `shutdown` or the first task ending, then stops the workers (waiting at most
    /// `worker_drain`), then the background tasks (at most `background_drain`).
    pub(crate) async fn run(
        mut self,
        shutdown: &CancellationToken,
        on_stop: impl FnOnce(&StopCause),
        worker_drain: Duration,
        background_drain: Duration,
    ) -> Stopped {
        let cause = tokio::select! {
            _ = shutdown.cancelled() => StopCause::Requested,
            Some(ended) = self.ended_rx.recv() => {
                self.running[ended.tier as usize] -= 1;
                StopCause::TaskEnded { task: ended.task, end: ended.end }
            }
        };
        on_stop(&cause);
        let mut failures = Vec::new();
        self.stop_workers.cancel();
        let mut stragglers = self
            .wait_tier(Tier::Worker, worker_drain, &mut failures)
            .await;
        self.stop_background.cancel();
        stragglers += self
            .wait_tier(Tier::Background, background_drain, &mut failures)
            .await;
        self.tracker.close();
        Stopped {
            cause,
            failures,
            stragglers,
        }
    }

    /// Waits until every task of `tier` has ended or `bound` passed; returns how many are left.
    /// Reports from the other tier that arrive meanwhile are recorded too.
    async fn wait_tier(
        &mut self,
        tier: Tier,
        bound: Duration,
        failures: &mut Vec<(&'static str, TaskEnd)>,
    ) -> usize {
        let deadline = tokio::time::Instant::now() + bound;
        while self.running[tier as usize] > 0 {
            let ended = tokio::select! {
                ended = self.ended_rx.recv() => ended,
                _ = tokio::time::sleep_until(deadline) => None,
            };
            let Some(ended) = ended else { break };
            self.running[ended.tier as usize] -= 1;
            if !matches!(ended.end, TaskEnd::Returned) {
                failures.push((ended.task, ended.end));
            }
        }
        self.running[tier as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_workers_before_background_tasks() {
        let mut s = Supervisor::new(TaskTracker::new());
        let worker_done = Arc::new(AtomicBool::new(false));
        let background_saw_worker_done = Arc::new(AtomicBool::new(false));
        let done = worker_done.clone();
        s.spawn("worker", Tier::Worker, move |stop| async move {
            stop.cancelled().await;
            // Draining takes a while.
            tokio::time::sleep(Duration::from_secs(3)).await;
            done.store(true, Ordering::SeqCst);
            Ok(())
        });
        let (done, saw) = (worker_done.clone(), background_saw_worker_done.clone());
        s.spawn("background", Tier::Background, move |stop| async move {
            stop.cancelled().await;
            saw.store(done.load(Ordering::SeqCst), Ordering::SeqCst);
            Ok(())
        });
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let stopped = s
            .run(
                &shutdown,
                |_| {},
                Duration::from_secs(60),
                Duration::from_secs(10),
            )
            .await;
        assert!(matches!(stopped.cause, StopCause::Requested));
        assert!(stopped.failures.is_empty());
        assert_eq!(stopped.stragglers, 0);
        assert!(background_saw_worker_done.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_task_ending_stops_the_rest_and_names_itself() {
        let mut s = Supervisor::new(TaskTracker::new());
        s.spawn("consumer", Tier::Worker, |stop| async move {
            stop.cancelled().await;
            Ok(())
        });
        s.spawn("scheduler", Tier::Worker, |_| async {
            Err(anyhow::anyhow!("redis is gone"))
        });
        let shutdown = CancellationToken::new();
        let mut seen = None;
        let stopped = s
            .run(
                &shutdown,
                |cause| seen = Some(format!("{cause:?}")),
                Duration::from_secs(60),
                Duration::from_secs(10),
            )
            .await;
        match stopped.cause {
            StopCause::TaskEnded {
                task: "scheduler",
                end: TaskEnd::Failed(e),
            } => assert!(e.to_string().contains("redis is gone")),
            other => panic!("{other:?}"),
        }
        assert!(seen.unwrap().contains("scheduler"));
        assert_eq!(stopped.stragglers, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_is_reported_and_a_stuck_task_is_bounded() {
        let mut s = Supervisor::new(TaskTracker::new());
        s.spawn("stuck", Tier::Worker, |_| async {
            std::future::pending::<()>().await;
            Ok(())
        });
        s.spawn("panics", Tier::Background, |_| async {
            panic!("on purpose, in a test");
        });
        let shutdown = CancellationToken::new();
        let stopped = s
            .run(
                &shutdown,
                |_| {},
                Duration::from_secs(5),
                Duration::from_secs(5),
            )
            .await;
        assert!(matches!(
            stopped.cause,
            StopCause::TaskEnded {
                task: "panics",
                end: TaskEnd::Panicked(_)
            }
        ));
        assert_eq!(
            stopped.stragglers, 1,
            "the stuck worker is left behind, bounded"
        );
    }
}
