//! A convolution's output rows split among threads ([`split_rows`],
//! [`split_row_pairs`]), and the threads that share them: the calling
//! thread and `threads − 1` kept helpers that, after each piece of work,
//! spin on a counter for a while before they sleep. An encode hands out a dozen
//! pieces a few hundred µs apart; a helper woken from sleep (rayon's pool,
//! or a condition variable) starts 50–120 µs late each time (measured: a
//! trivial split took 75–120 µs with 50–1000 µs of serial work between
//! splits), which ate most of the second thread's gain. Spinning costs a
//! core's power for [`SPIN`] after the last piece, no more.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};

/// Below this many multiply-adds per thread (≈ 0.1 ms) a convolution stays
/// on fewer threads: handing rows to another thread (a wake-up, cold
/// caches) would cost more than it saves.
pub const MIN_MACS_PER_THREAD: usize = 4_000_000;

/// Runs `work(rows, chunk)` over the `rows` rows of `body` (`row_len`
/// values each), split into at most `threads` runs of whole rows (no more
/// than the machine's cores), the calling thread computing the first and
/// kept [`Helpers`] the others, and into fewer where each
/// would get less than [`MIN_MACS_PER_THREAD`] of the `macs` the whole work
/// executes.
pub(crate) fn split_rows<T: Send>(
    body: &mut [T],
    rows: usize,
    row_len: usize,
    work_size: (usize, usize),
    work: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync,
) {
    let mut nothing = vec![(); rows];
    split_row_pairs((body, row_len), (&mut nothing, 1), rows, work_size, |rows, chunk, _| {
        work(rows, chunk)
    });
}

/// [`split_rows`] over two buffers of `rows` rows each (`a_len` and
/// `b_len` values a row), split alike: `work(rows, a_chunk, b_chunk)`.
pub(crate) fn split_row_pairs<A: Send, B: Send>(
    (a, a_len): (&mut [A], usize),
    (b, b_len): (&mut [B], usize),
    rows: usize,
    (threads, macs): (usize, usize),
    work: impl Fn(std::ops::Range<usize>, &mut [A], &mut [B]) + Sync,
) {
    let threads = threads.min(macs / MIN_MACS_PER_THREAD).min(cores());
    let Some(helpers) = (threads > 1).then(|| helpers(threads)).flatten() else {
        work(0..rows, a, b);
        return;
    };
    let threads = threads.min(helpers.threads());
    let per_thread = rows.div_ceil(threads);
    /// A part's rows of both buffers, taken by the thread that computes them.
    type Part<'a, A, B> = Mutex<Option<(&'a mut [A], &'a mut [B])>>;
    let chunks: Vec<Part<A, B>> = a
        .chunks_mut(per_thread * a_len)
        .zip(b.chunks_mut(per_thread * b_len))
        .map(|pair| Mutex::new(Some(pair)))
        .collect();
    helpers.run(chunks.len(), &|part| {
        let taken = chunks[part].lock().unwrap_or_else(PoisonError::into_inner).take();
        let (a_chunk, b_chunk) = taken.expect("each part runs once");
        let start = part * per_thread;
        work(start..(start + per_thread).min(rows), a_chunk, b_chunk);
    });
}

/// The machine's cores: more threads than that would only make the
/// spinning helpers take turns with the caller.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The kept threads that help the calling one when work is split
/// `threads` ways: `threads − 1` of them (fewer if the system refuses some:
/// see [`Helpers::threads`]), made once per thread count. None if not one
/// can be started, which is also remembered: the work then stays on one
/// thread.
fn helpers(threads: usize) -> Option<&'static Helpers> {
    static POOLS: Mutex<Vec<(usize, Option<&'static Helpers>)>> = Mutex::new(Vec::new());
    let mut pools = POOLS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(&(_, pool)) = pools.iter().find(|(n, _)| *n == threads) {
        return pool;
    }
    let pool = Helpers::start(threads - 1).map(|helpers| &*Box::leak(Box::new(helpers)));
    pools.push((threads, pool));
    pool
}

/// How long an idle helper spins before it sleeps: longer than the gaps
/// between an encode's splits, short against an image's time.
const SPIN: Duration = Duration::from_millis(2);

/// One piece of work handed to the helpers: `work(part)` for the parts
/// `1..parts` (the caller does part 0). The reference is valid until every
/// helper has reported back (see [`Helpers::run`]).
#[derive(Clone, Copy)]
struct Job {
    work: *const (dyn Fn(usize) + Sync),
    parts: usize,
}

/// What the caller and its helpers share.
struct Shared {
    /// Bumped for each job; a helper runs the job when it sees a new value.
    epoch: AtomicUsize,
    /// The current job: written by the caller before it bumps `epoch`,
    /// read by helpers after they see the bump.
    job: UnsafeCell<Job>,
    /// Helpers that have not finished the current job.
    pending: AtomicUsize,
    /// A panic from a helper's part, resumed on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Helpers asleep, and their wake-up call.
    sleepers: Mutex<usize>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the caller holding `Helpers::caller`
// while no helper reads it (all have reported back on the previous job), and
// read by helpers only between the epoch bump and their report.
unsafe impl Sync for Shared {}

/// `count` kept helper threads; one caller at a time.
pub(crate) struct Helpers {
    shared: &'static Shared,
    count: usize,
    /// Held by the thread whose job the helpers run.
    caller: Mutex<()>,
}

impl Helpers {
    /// Starts up to `count` helpers (they live as long as the process): as
    /// many as the system gives threads for, so that none started is lost
    /// when a later one fails (see [`Helpers::threads`]). None if not one
    /// starts.
    pub(crate) fn start(count: usize) -> Option<Self> {
        Self::start_with(count, |name, body| {
            std::thread::Builder::new().name(name).spawn(body).map(drop)
        })
    }

    /// [`Helpers::start`] with `spawn(name, body)` starting each thread.
    fn start_with(
        count: usize,
        mut spawn: impl FnMut(String, Box<dyn FnOnce() + Send>) -> std::io::Result<()>,
    ) -> Option<Self> {
        let noop: &'static (dyn Fn(usize) + Sync) = &|_| {};
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(Job { work: noop, parts: 0 }),
            pending: AtomicUsize::new(0),
            panic: Mutex::new(None),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        }));
        let started = (0..count)
            .take_while(|&index| {
                spawn(
                    format!("g_a helper {index}"),
                    Box::new(move || helper(shared, index + 1)),
                )
                .is_ok()
            })
            .count();
        (started > 0).then(|| Self {
            shared,
            count: started,
            caller: Mutex::new(()),
        })
    }

    /// The threads a job can use: the helpers and the caller.
    pub(crate) fn threads(&self) -> usize {
        self.count + 1
    }

    /// Runs `work(part)` for every part in `0..parts` (at most one more
    /// than the helpers), part 0 on the calling thread, and returns when all
    /// are done. A single part, or helpers busy with another thread's job,
    /// run here. A panic in any part is resumed here once all parts stopped.
    pub(crate) fn run(&self, parts: usize, work: &(dyn Fn(usize) + Sync)) {
        assert!(parts <= self.count + 1, "{parts} parts for {} helpers", self.count);
        if parts <= 1 {
            (0..parts).for_each(work);
            return;
        }
        // A panic that went through here poisoned the lock; it guards no data.
        let _caller = match self.caller.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                (0..parts).for_each(work);
                return;
            }
        };
        let shared = self.shared;
        // A helper's panic left by a job whose part 0 panicked too.
        shared.panic.lock().unwrap_or_else(PoisonError::into_inner).take();
        // SAFETY: no helper reads the job now (each reported back on the
        // previous one before its `run` returned); the lifetime is erased
        // because `Wait` below keeps `work` borrowed until all report back.
        unsafe {
            let work: *const (dyn Fn(usize) + Sync + '_) = work;
            *shared.job.get() = Job {
                work: std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync)>(work),
                parts,
            };
        }
        shared.pending.store(self.count, Ordering::SeqCst);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if *shared.sleepers.lock().unwrap_or_else(PoisonError::into_inner) > 0 {
            shared.wake.notify_all();
        }
        /// Waits for the helpers even while part 0 unwinds.
        struct Wait(&'static Shared);
        impl Drop for Wait {
            fn drop(&mut self) {
                let mut spins = 0u32;
                while self.0.pending.load(Ordering::Acquire) != 0 {
                    // A helper that lost its core needs this one back.
                    if spins < 10_000 {
                        spins += 1;
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
            }
        }
        let wait = Wait(shared);
        work(0);
        drop(wait);
        if let Some(panic) = shared.panic.lock().unwrap_or_else(PoisonError::into_inner).take() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// A helper's life: wait for a new epoch (spinning, then asleep), run its
/// part if the job has one, report back.
fn helper(shared: &'static Shared, part: usize) {
    let mut seen = 0;
    loop {
        let started = Instant::now();
        while shared.epoch.load(Ordering::Acquire) == seen {
            if started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut sleepers = shared.sleepers.lock().unwrap_or_else(PoisonError::into_inner);
            *sleepers += 1;
            while shared.epoch.load(Ordering::SeqCst) == seen {
                sleepers = shared.wake.wait(sleepers).unwrap_or_else(PoisonError::into_inner);
            }
            *sleepers -= 1;
        }
        seen = shared.epoch.load(Ordering::Acquire);
        // SAFETY: the caller wrote the job before bumping the epoch and keeps
        // it, and the closure it points to, until this helper reports back.
        let job = unsafe { *shared.job.get() };
        if part < job.parts {
            // SAFETY: as above.
            let work = unsafe { &*job.work };
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| work(part))) {
                *shared.panic.lock().unwrap_or_else(PoisonError::into_inner) = Some(panic);
            }
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every part runs exactly once, on as many threads as there are
    /// parts, for any number of parts up to the helpers + 1, many times in
    /// a row (with and without pauses long enough for the helpers to sleep).
    #[test]
    fn every_part_runs_once() {
        let helpers = Helpers::start(3).unwrap();
        for round in 0..200 {
            if round % 50 == 49 {
                std::thread::sleep(SPIN * 2);
            }
            for parts in 0..=4 {
                let runs: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
                let threads = Mutex::new(std::collections::HashSet::new());
                helpers.run(parts, &|part| {
                    runs[part].fetch_add(1, Ordering::Relaxed);
                    threads.lock().unwrap().insert(std::thread::current().id());
                    // Long enough that no one thread can take every part.
                    std::thread::sleep(Duration::from_micros(200));
                });
                let counts: Vec<usize> = runs.iter().map(|r| r.load(Ordering::Relaxed)).collect();
                let want: Vec<usize> = (0..4).map(|p| usize::from(p < parts)).collect();
                assert_eq!(counts, want, "round {round}, {parts} parts");
                assert_eq!(threads.into_inner().unwrap().len(), parts, "round {round}");
            }
        }
    }

    /// When the system refuses a thread, the helpers started before it
    /// serve (and are the pool's size); none started is no pool.
    #[test]
    fn helpers_that_started_serve_when_one_cannot() {
        let mut calls = 0;
        let helpers = Helpers::start_with(3, |name, body| {
            calls += 1;
            if calls == 3 {
                return Err(std::io::Error::other("no more threads"));
            }
            std::thread::Builder::new().name(name).spawn(body).map(drop)
        })
        .unwrap();
        assert_eq!((calls, helpers.threads()), (3, 3));
        let runs: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        let threads = Mutex::new(std::collections::HashSet::new());
        helpers.run(3, &|part| {
            runs[part].fetch_add(1, Ordering::Relaxed);
            threads.lock().unwrap().insert(std::thread::current().id());
            std::thread::sleep(Duration::from_micros(200));
        });
        assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 1));
        assert_eq!(threads.into_inner().unwrap().len(), 3);
        assert!(Helpers::start_with(2, |_, _| Err(std::io::Error::other("none"))).is_none());
    }

    /// A panic in a helper's part reaches the caller; after it, and after
    /// the caller's own part panicked with a helper's, the helper still
    /// takes its part.
    #[test]
    fn a_panic_reaches_the_caller() {
        let helpers = Helpers::start(1).unwrap();
        let done = AtomicUsize::new(0);
        let caller = std::thread::current().id();
        let count = |part| {
            assert_eq!(
                std::thread::current().id() == caller,
                part == 0,
                "part {part} on its thread"
            );
            done.fetch_add(1, Ordering::Relaxed);
        };
        let caught = catch_unwind(AssertUnwindSafe(|| {
            helpers.run(2, &|part| assert_ne!(part, 1, "part 1 fails"));
        }));
        let message = caught.unwrap_err();
        assert!(format!("{:?}", message.downcast_ref::<String>()).contains("part 1 fails"));
        helpers.run(2, &count);
        assert_eq!(done.load(Ordering::Relaxed), 2);
        let caught = catch_unwind(AssertUnwindSafe(|| helpers.run(2, &|part| panic!("part {part} fails"))));
        assert!(caught.is_err());
        helpers.run(2, &count);
        assert_eq!(done.load(Ordering::Relaxed), 4);
    }
}
