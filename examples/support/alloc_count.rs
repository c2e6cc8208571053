//! Allocation counting for the examples' worker processes (`BENCH_COUNT_ALLOCS=1` in the
//! benchmark): the system allocator behind a counter of calls, and a thread that publishes the
//! counts to a file the driver reads before and after a phase's traffic, as it reads the
//! worker's CPU from /proc.
//!
//! Calls, not bytes: the number of `malloc`/`realloc` calls per notification is what the
//! hot-path work changes, and unlike CPU time it does not spread with the machine's load
//! (CPU per notification spreads by ±10 % between runs here, which hides a 5 % change).
//! Counting costs one relaxed atomic add per call; it is always on in the examples (the product's
//! own binary has no counter), the publishing thread only when asked (it wakes every
//! [`PUBLISH_EVERY`], which would show in the context-switch column).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The environment variable naming the file a worker publishes its counts to.
pub const FILE_VAR: &str = "BENCH_ALLOC_FILE";

/// How often the counts are published. The driver reads them at idle moments (after the
/// catch-up before the traffic, and after the idle second that ends a phase), so a reading is
/// at most this stale while almost nothing allocates.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting calls.
pub struct Counting;

// SAFETY: every call is forwarded unchanged to `System`, which upholds GlobalAlloc's contract.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout (every allocation goes through it).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        REALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as `dealloc`; the caller guarantees `new_size` is valid for `layout.align()`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Allocation and reallocation calls so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub allocs: u64,
    pub reallocs: u64,
}

impl Counts {
    pub fn since(self, earlier: Counts) -> Counts {
        Counts {
            allocs: self.allocs.saturating_sub(earlier.allocs),
            reallocs: self.reallocs.saturating_sub(earlier.reallocs),
        }
    }
}

/// In a worker: if [`FILE_VAR`] names a file, publish the counts there every
/// [`PUBLISH_EVERY`] from a thread of its own (the process exits with the worker).
pub fn publish_if_asked() {
    let Some(path) = std::env::var_os(FILE_VAR).map(PathBuf::from) else {
        return;
    };
    std::thread::spawn(move || {
        let partial = path.with_extension("partial");
        loop {
            let line = format!(
                "{} {}\n",
                ALLOCS.load(Ordering::Relaxed),
                REALLOCS.load(Ordering::Relaxed)
            );
            // Written aside and renamed: a reader never sees half a line.
            if std::fs::write(&partial, line).is_ok() {
                let _ = std::fs::rename(&partial, &path);
            }
            std::thread::sleep(PUBLISH_EVERY);
        }
    });
}

/// In the driver: the counts a worker last published to `path`.
pub fn read(path: &std::path::Path) -> Option<Counts> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut numbers = text.split_whitespace().map(|n| n.parse::<u64>().ok());
    Some(Counts {
        allocs: numbers.next()??,
        reallocs: numbers.next()??,
    })
}
