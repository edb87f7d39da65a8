//! Threads that each run their own single-threaded tokio runtime, as wrk's
//! and nginx's event loops do: a connection lives on one thread, and each
//! thread serves its ready connections first in, first out.
//!
//! W2's clients run on this pool, not on a work-stealing runtime. That
//! runtime's per-worker queue holds 256 tasks; the ones that overflow it wait
//! in a shared queue that a worker reads only every 61st task. With 1,000
//! connections ready at once, direct's busiest connection made 3.4 times as
//! many round trips as its least busy one (50 to 172 in 1.5 s), and those
//! waits in the load generator, not the target, set the p99. On this pool
//! the spread is 1.4 times (47 to 68).
//!
//! W2 uses one thread. With two, four threads of this process (two
//! clients, two origin workers) were busy on two cores whenever the target
//! was fast, and a preempted client thread held all its connections for a
//! scheduler slice: at 100 × 64 B and 100 × 1 KiB direct's p99 was
//! 4.4-4.6 ms against a p50 of 0.4-0.6 ms, and a slower target, nginx, had
//! the lower tail. With one, direct's p99 there was 1.7-3.2 ms at the same
//! rate within the noise (118-134 against 121-155 thousand messages/s;
//! quick runs side by side, 2 rounds of 2 repetitions each).

use std::future::Future;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A fixed set of single-threaded runtimes, each on its own thread.
pub struct Pool {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `n` threads (at least one), named `name`.
    pub fn new(n: usize, name: &str) -> std::io::Result<Pool> {
        let mut pool = Pool {
            handles: Vec::new(),
            stops: Vec::new(),
            threads: Vec::new(),
        };
        for _ in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            pool.handles.push(rt.handle().clone());
            pool.stops.push(stop);
            pool.threads
                .push(
                    std::thread::Builder::new()
                        .name(name.to_string())
                        .spawn(move || {
                            let _ = rt.block_on(stopped);
                        })?,
                );
        }
        Ok(pool)
    }

    /// Runs `f` on thread `i` (modulo the pool's size).
    pub fn spawn<F>(&self, i: usize, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[i % self.handles.len()].spawn(f)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_thread_they_are_given_to() {
        let pool = Pool::new(2, "pool-test").expect("pool");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let ids: Vec<_> = (0..4)
            .map(|i| pool.spawn(i, async { std::thread::current().id() }))
            .collect();
        let ids: Vec<_> = rt.block_on(async {
            let mut out = Vec::new();
            for h in ids {
                out.push(h.await.expect("task"));
            }
            out
        });
        assert_eq!(ids[0], ids[2]);
        assert_eq!(ids[1], ids[3]);
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[0], std::thread::current().id());
    }
}
