//! The time braze-sync reads for leases, claims, reports and export dates, and the nonces that
//! make its object names unique: the wall clock and the OS's randomness, or, on a thread that
//! set them, a virtual clock that runs with tokio's (paused) time and a seeded nonce stream, so
//! a simulated world expires leases, passes hours in milliseconds and replays the same names
//! from the same seed (`testkit/sim`); or a fixed instant, so a test's steps read the time it
//! set however long they take.
//!
//! It also runs the blocking work of a run (the producer's read → map → diff, the finalizer's
//! departures): [`spawn_blocking`] and the [`Blocking`] it hands the work, whose
//! [`Blocking::block_on`] waits for the runtime (an S3 read, a channel send). On the wall
//! clock that is tokio's blocking pool and `Handle::block_on`. Under a virtual clock the work
//! runs *in turns* with the runtime thread: a thread of its own that runs only while the
//! runtime thread waits for it, and hands back each time it waits for a future, which it polls
//! with the waker of the task that awaits it. The runtime never runs beside the work, so how
//! far the work gets before virtual time moves is decided by the code, not by the OS's
//! scheduler, and a simulated world replays byte for byte.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use chrono::{DateTime, Utc};
use tokio::runtime::Handle;

thread_local! {
    /// `(wall time at anchor, tokio instant at anchor)` when this thread runs a virtual clock.
    static VIRTUAL: Cell<Option<(DateTime<Utc>, tokio::time::Instant)>> = const { Cell::new(None) };
    /// The seeded nonce stream's state, when this thread runs one.
    static NONCES: Cell<Option<u64>> = const { Cell::new(None) };
    /// The instant [`now`] reads on this thread while the clock is held still.
    static FIXED: Cell<Option<DateTime<Utc>>> = const { Cell::new(None) };
}

/// A nonce for an object name: random, or the next of this thread's seeded stream.
pub fn nonce() -> u32 {
    match NONCES.with(Cell::get) {
        Some(state) => {
            let next = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            NONCES.with(|n| n.set(Some(next)));
            let mut z = next;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as u32
        }
        None => rand::random(),
    }
}

/// Makes [`nonce`] on this thread a stream seeded by `seed`.
pub fn set_nonce_seed(seed: u64) {
    NONCES.with(|n| n.set(Some(seed)));
}

/// The current time: the wall clock, or this thread's virtual or fixed clock.
pub fn now() -> DateTime<Utc> {
    if let Some(at) = FIXED.with(Cell::get) {
        return at;
    }
    match VIRTUAL.with(Cell::get) {
        Some((base, at)) => {
            let elapsed = tokio::time::Instant::now().saturating_duration_since(at);
            base + chrono::Duration::from_std(elapsed).unwrap_or_default()
        }
        None => Utc::now(),
    }
}

/// Milliseconds since the Unix epoch of [`now`].
pub fn now_ms() -> i64 {
    now().timestamp_millis()
}

/// Makes [`now`] on this thread read `base` plus the tokio time elapsed from this call (a
/// simulation on a current-thread runtime with paused time). Call inside the runtime.
pub fn set_virtual(base: DateTime<Utc>) {
    FIXED.with(|f| f.set(None));
    VIRTUAL.with(|v| v.set(Some((base, tokio::time::Instant::now()))));
}

/// Makes [`now`] on this thread read `at`, and nothing else, until the clock is set again or
/// cleared: a test whose assertions name instants holds the clock still, so a loaded machine
/// (or the wall clock's place in its hour) cannot move them.
pub fn set_fixed(at: DateTime<Utc>) {
    VIRTUAL.with(|v| v.set(None));
    FIXED.with(|f| f.set(Some(at)));
}

/// Back to the wall clock on this thread.
pub fn clear_virtual() {
    VIRTUAL.with(|v| v.set(None));
    FIXED.with(|f| f.set(None));
    NONCES.with(|n| n.set(None));
}

/// What blocking work waits with: the runtime's handle and, under a virtual clock, the turns
/// it takes with the runtime thread. Clone it into the work's own threads (readers, workers).
#[derive(Clone)]
pub struct Blocking {
    handle: Handle,
    turns: Option<Arc<Turns>>,
}

impl std::fmt::Debug for Blocking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blocking")
            .field("in_turns", &self.turns.is_some())
            .finish()
    }
}

impl Blocking {
    /// Blocking work on `handle`'s runtime, free-running (tokio's blocking pool, a CLI thread).
    pub fn new(handle: Handle) -> Self {
        Self {
            handle,
            turns: None,
        }
    }

    /// Waits for `fut`, from a thread outside the runtime (never from async code).
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        match &self.turns {
            None => self.handle.block_on(fut),
            Some(turns) => {
                // The work's own threads (readers, diff workers) read the runtime's time too.
                let _runtime = self.handle.enter();
                if VIRTUAL.with(Cell::get).is_none() {
                    VIRTUAL.with(|v| v.set(turns.clock));
                }
                turns.block_on(fut)
            }
        }
    }

    /// `reader` as a blocking [`std::io::Read`] (each read waits through [`Blocking::block_on`]).
    pub fn reader<R: tokio::io::AsyncRead + Unpin>(&self, reader: R) -> BlockingReader<R> {
        BlockingReader {
            src: reader,
            blocking: self.clone(),
        }
    }
}

/// An async reader read from blocking work ([`Blocking::reader`]).
pub struct BlockingReader<R> {
    src: R,
    blocking: Blocking,
}

impl<R: tokio::io::AsyncRead + Unpin> std::io::Read for BlockingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let src = &mut self.src;
        self.blocking
            .block_on(tokio::io::AsyncReadExt::read(src, buf))
    }
}

/// Runs `work` where it may block, handing it the [`Blocking`] it waits with: tokio's blocking
/// pool, or, when the calling thread runs a virtual clock, a thread that takes turns with the
/// runtime thread (see the module docs). Call from async code; await the task for the result.
pub fn spawn_blocking<F, R>(work: F) -> BlockingTask<R>
where
    F: FnOnce(Blocking) -> R + Send + 'static,
    R: Send + 'static,
{
    let handle = Handle::current();
    let Some((base, at)) = VIRTUAL.with(Cell::get) else {
        let blocking = Blocking::new(handle);
        return BlockingTask::Pool(tokio::task::spawn_blocking(move || work(blocking)));
    };
    let nonces = NONCES
        .with(Cell::get)
        .map(|_| (u64::from(nonce()) << 32) | u64::from(nonce()));
    let turns = Arc::new(Turns {
        clock: Some((base, at)),
        ..Turns::default()
    });
    let blocking = Blocking {
        handle: handle.clone(),
        turns: Some(turns.clone()),
    };
    let t = turns.clone();
    let thread = std::thread::Builder::new()
        .name("braze-sync-blocking".into())
        .spawn(move || {
            let _runtime = handle.enter();
            VIRTUAL.with(|v| v.set(Some((base, at))));
            NONCES.with(|n| n.set(nonces));
            if !t.first_turn() {
                return None;
            }
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(blocking)));
            t.finish();
            match out {
                Ok(r) => Some(r),
                Err(p) if p.is::<Abandoned>() => None,
                Err(p) => std::panic::resume_unwind(p),
            }
        });
    match thread {
        Ok(thread) => BlockingTask::Turns(tokio::spawn(TurnsDriver {
            turns,
            thread: Some(thread),
        })),
        Err(e) => BlockingTask::Failed(Some(format!("starting a blocking thread: {e}"))),
    }
}

/// Blocking work started by [`spawn_blocking`]: awaits its result (`Err`: it panicked or could
/// not start). Dropped before it ends: the pool's work runs on; work in turns stops at its
/// next wait (its thread unwinds, as a crashed container's work stops with it).
pub enum BlockingTask<R> {
    /// On tokio's blocking pool.
    Pool(tokio::task::JoinHandle<R>),
    /// In turns with the runtime thread, driven by a task of the runtime ([`TurnsDriver`]).
    Turns(tokio::task::JoinHandle<Result<R, String>>),
    /// The thread could not start.
    Failed(Option<String>),
}

impl<R> Future for BlockingTask<R> {
    type Output = Result<R, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            BlockingTask::Pool(h) => Pin::new(h).poll(cx).map(|r| r.map_err(|e| e.to_string())),
            BlockingTask::Turns(h) => Pin::new(h)
                .poll(cx)
                .map(|r| r.map_err(|e| e.to_string()).and_then(|r| r)),
            BlockingTask::Failed(why) => {
                Poll::Ready(Err(why.take().unwrap_or_else(|| "polled again".into())))
            }
        }
    }
}

impl<R> Drop for BlockingTask<R> {
    fn drop(&mut self) {
        if let BlockingTask::Turns(h) = self {
            h.abort();
        }
    }
}

/// The runtime's side of work in turns: each poll gives the work a turn. Dropped before the
/// work ended (its task aborted), it makes the work unwind at its next wait.
pub struct TurnsDriver<R> {
    turns: Arc<Turns>,
    thread: Option<std::thread::JoinHandle<Option<R>>>,
}

impl<R> Future for TurnsDriver<R> {
    type Output = Result<R, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if !this.turns.take_turn(cx.waker()) {
            return Poll::Pending;
        }
        let Some(t) = this.thread.take() else {
            return Poll::Ready(Err("polled again".into()));
        };
        Poll::Ready(match t.join() {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err("the blocking work was abandoned".into()),
            Err(p) => Err(panic_message(p.as_ref())),
        })
    }
}

impl<R> Drop for TurnsDriver<R> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.turns.abandon();
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    let msg = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_default();
    format!("the blocking work panicked: {msg}")
}

/// The unwinding payload of blocking work whose task was dropped.
struct Abandoned;

/// Whose turn it is between the runtime thread and one piece of blocking work.
#[derive(Default)]
pub struct Turns {
    /// The virtual clock of the thread that started the work.
    clock: Option<(DateTime<Utc>, tokio::time::Instant)>,
    state: Mutex<TurnState>,
    changed: Condvar,
}

#[derive(Default)]
struct TurnState {
    /// The work's turn (else the runtime's).
    work: bool,
    /// Turns given to the work so far.
    round: u64,
    /// The waker of the task awaiting the work.
    waker: Option<Waker>,
    finished: bool,
    abandoned: bool,
}

impl Turns {
    fn lock(&self) -> MutexGuard<'_, TurnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, s: MutexGuard<'a, TurnState>) -> MutexGuard<'a, TurnState> {
        self.changed.wait(s).unwrap_or_else(|e| e.into_inner())
    }

    /// The runtime thread's side: gives the work a turn and waits until the work hands back.
    /// `true` once the work has finished.
    fn take_turn(&self, waker: &Waker) -> bool {
        let mut s = self.lock();
        if !s.finished {
            s.waker = Some(waker.clone());
            s.work = true;
            s.round += 1;
            self.changed.notify_all();
            while s.work && !s.finished {
                s = self.wait(s);
            }
        }
        s.finished
    }

    /// The work's thread, before it starts: waits for the first turn (`false`: abandoned).
    fn first_turn(&self) -> bool {
        let mut s = self.lock();
        while !s.work && !s.abandoned {
            s = self.wait(s);
        }
        !s.abandoned
    }

    fn finish(&self) {
        let mut s = self.lock();
        s.finished = true;
        s.work = false;
        self.changed.notify_all();
    }

    /// The task was dropped: the work stops at its next wait; returns once it has.
    fn abandon(&self) {
        let mut s = self.lock();
        s.abandoned = true;
        self.changed.notify_all();
        while !s.finished && s.round > 0 {
            s = self.wait(s);
        }
    }

    /// The work's side of a wait: polls `fut` in its turns, handing the turn back each time it
    /// is pending; unwinds once the task was dropped.
    fn block_on<F: Future>(&self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        let mut s = self.lock();
        loop {
            while !s.work && !s.abandoned {
                s = self.wait(s);
            }
            if s.abandoned {
                drop(s);
                std::panic::resume_unwind(Box::new(Abandoned));
            }
            let (round, waker) = (
                s.round,
                s.waker.clone().unwrap_or_else(|| Waker::noop().clone()),
            );
            drop(s);
            let polled = fut.as_mut().poll(&mut Context::from_waker(&waker));
            s = self.lock();
            if let Poll::Ready(out) = polled {
                return out;
            }
            if s.round == round {
                s.work = false;
                self.changed.notify_all();
            }
            while s.round == round && !s.abandoned {
                s = self.wait(s);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn virtual_time_follows_tokio_time() {
        let base = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        set_virtual(base);
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        assert_eq!(now(), base + chrono::Duration::hours(1));
        clear_virtual();
        assert!(now() > base + chrono::Duration::days(300));
    }

    #[tokio::test(start_paused = true)]
    async fn blocking_work_takes_turns_with_a_virtual_clock() {
        let base = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        set_virtual(base);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<i64>(1);
        let work = spawn_blocking(move |b| {
            for _ in 0..3 {
                b.block_on(tokio::time::sleep(std::time::Duration::from_secs(60)));
                // The work reads the virtual clock, and the runtime waits while it runs.
                b.block_on(tx.send(now().timestamp() - base.timestamp()))
                    .unwrap();
            }
            "done"
        });
        let mut seen = Vec::new();
        while let Some(t) = rx.recv().await {
            seen.push(t);
        }
        assert_eq!(seen, [60, 120, 180]);
        assert_eq!(work.await.unwrap(), "done");
        assert_eq!(now(), base + chrono::Duration::minutes(3));
        clear_virtual();
    }

    #[tokio::test(start_paused = true)]
    async fn blocking_work_in_turns_stops_when_its_task_is_dropped() {
        set_virtual(Utc::now());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        let work = spawn_blocking(move |b| {
            for i in 0.. {
                b.block_on(tx.send(i)).unwrap();
            }
        });
        assert_eq!(rx.recv().await, Some(0));
        drop(work);
        // The work's thread unwound and dropped its sender.
        let mut rest = Vec::new();
        while let Some(i) = rx.recv().await {
            rest.push(i);
        }
        assert!(rest.len() <= 2, "{rest:?}");
        clear_virtual();
    }

    #[tokio::test]
    async fn a_fixed_clock_holds_still_until_set_again() {
        let at = DateTime::parse_from_rfc3339("2026-01-01T00:59:59.999Z")
            .unwrap()
            .with_timezone(&Utc);
        set_fixed(at);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(now(), at);
        assert_eq!(now_ms(), at.timestamp_millis());
        set_fixed(at + chrono::Duration::hours(1));
        assert_eq!(now(), at + chrono::Duration::hours(1));
        clear_virtual();
        assert!(now() > at + chrono::Duration::days(300));
    }
}
