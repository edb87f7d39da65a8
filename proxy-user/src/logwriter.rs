//! The log writer: workers append formatted lines to one buffer, and a
//! thread writes it out in batches, like nginx's `access_log ... buffer=
//! flush=`.
//!
//! Why not `tracing_appender::non_blocking`: its channel wakes the writer
//! thread for every line, and the thread spins (`sched_yield`) before it
//! sleeps. With two access lines per session, `strace -c` over
//! `cargo xtask bench` W4 counted 3.4 `sched_yield` and 1.5 `futex` calls
//! per session. Here a line costs a lock and a copy; the thread is woken
//! once per batch and writes a batch with one `write`.
//!
//! Nothing is dropped: past [`MAX_PENDING`] bytes a worker writes the batch
//! itself. Lines stay in order (every batch is taken and written under one
//! lock). A line reaches stderr at most [`FLUSH_EVERY`] after it was logged,
//! and at once when the [`Flusher`] is dropped.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a batch gathers lines before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// Pending bytes past which the logging thread writes the batch itself.
pub const MAX_PENDING: usize = 1 << 20;

struct Shared {
    /// Lines not yet written.
    pending: Mutex<Vec<u8>>,
    /// Held while a batch is taken and written, so batches keep their order.
    out: Mutex<Box<dyn Write + Send>>,
    /// Set when the [`Flusher`] is dropped.
    closing: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Takes whatever is pending and writes it. Errors are ignored: there is
    /// nowhere left to report them.
    fn write_batch(&self, spare: &mut Vec<u8>) {
        let mut out = lock(&self.out);
        {
            let mut p = lock(&self.pending);
            if p.is_empty() {
                return;
            }
            std::mem::swap(&mut *p, spare);
        }
        let _ = out.write_all(spare);
        let _ = out.flush();
        spare.clear();
        // A burst should not keep its buffer for good.
        spare.shrink_to(64 << 10);
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves bytes, not broken invariants.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `MakeWriter` for `tracing_subscriber::fmt`.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
    thread: std::thread::Thread,
}

/// Writes what is pending and stops the thread when dropped (keep it alive
/// in `main`).
pub struct Flusher {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out`.
pub fn start(out: Box<dyn Write + Send>) -> std::io::Result<(BatchWriter, Flusher)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Vec::with_capacity(64 << 10)),
        out: Mutex::new(out),
        closing: std::sync::atomic::AtomicBool::new(false),
    });
    let s = shared.clone();
    let handle = std::thread::Builder::new()
        .name("sluice-log".into())
        .spawn(move || run(&s))?;
    Ok((
        BatchWriter {
            shared: shared.clone(),
            thread: handle.thread().clone(),
        },
        Flusher {
            shared,
            handle: Some(handle),
        },
    ))
}

fn run(s: &Shared) {
    use std::sync::atomic::Ordering;
    let mut spare = Vec::with_capacity(64 << 10);
    loop {
        let closing = s.closing.load(Ordering::Acquire);
        if lock(&s.pending).is_empty() {
            if closing {
                return;
            }
            // Woken by the first line of the next batch (or spuriously).
            std::thread::park();
            continue;
        }
        if !closing {
            std::thread::sleep(FLUSH_EVERY);
        }
        s.write_batch(&mut spare);
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared
            .closing
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        // Lines logged after the thread's last look.
        self.shared.write_batch(&mut Vec::new());
    }
}

/// One event's writer: `fmt` formats the whole line, then writes it here.
pub struct LineWriter<'a> {
    w: &'a BatchWriter,
}

impl BatchWriter {
    /// Appends whole lines (each ending in `\n`) to the pending batch.
    pub fn append(&self, lines: &[u8]) {
        let (first, full) = {
            let mut p = lock(&self.shared.pending);
            let first = p.is_empty();
            p.extend_from_slice(lines);
            (first, p.len() > MAX_PENDING)
        };
        if full {
            // The thread is behind (stderr blocks): wait for the output.
            self.shared.write_batch(&mut Vec::new());
        } else if first {
            // Cheap when the thread is not parked (no syscall).
            self.thread.unpark();
        }
    }
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.w.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter { w: self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` that the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(n: usize, t: usize) -> Vec<String> {
        (0..n).map(|i| format!("thread {t} line {i}\n")).collect()
    }

    #[test]
    fn every_line_arrives_whole_and_in_order_per_thread() {
        let sink = Sink::default();
        let (w, flusher) = start(Box::new(sink.clone())).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    use tracing_subscriber::fmt::MakeWriter;
                    for l in lines(20_000, t) {
                        w.make_writer().write_all(l.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(flusher);
        let out = String::from_utf8(lock(&sink.0).clone()).unwrap();
        for t in 0..4 {
            let mine: Vec<&str> = out
                .lines()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let want = lines(20_000, t);
            assert_eq!(mine.len(), want.len(), "thread {t} lost lines");
            for (got, want) in mine.iter().zip(&want) {
                assert_eq!(*got, want.trim_end());
            }
        }
        assert_eq!(out.lines().count(), 80_000);
    }

    #[test]
    fn a_line_reaches_the_output_without_a_flush() {
        let sink = Sink::default();
        let (w, _flusher) = start(Box::new(sink.clone())).unwrap();
        use tracing_subscriber::fmt::MakeWriter;
        w.make_writer().write_all(b"hello\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lock(&sink.0).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "line not written in 5 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&*lock(&sink.0), b"hello\n");
    }
}
