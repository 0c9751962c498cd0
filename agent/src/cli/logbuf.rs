//! The log writer: lines go into a buffer in memory that a thread (`nodeward-log`) writes to
//! standard error every [`FLUSH_EVERY`], or at once when it holds [`MAX_BUFFERED`] bytes; the
//! buffer is written out when the [`FlushGuard`] is dropped (at exit). Envoy buffers its access
//! log the same way (`access_log_flush_interval`).
//!
//! Why not a write per line: the access log writes one line per request, and in the bench's
//! profile (`cargo xtask bench --perf`) a `write(2)` to standard error per request, and the
//! stderr lock between the data-plane workers, were the largest cost of an allowed request. A
//! channel to a writer thread (tracing-appender) moved the write but woke that thread for every
//! line (a fifth of the agent's CPU at 1,000 requests/s). Here a line costs a short lock and a
//! copy; the writer wakes ten times a second.
//!
//! A line is never dropped: a full buffer is written by the logging thread itself.

use std::io::Write as _;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often buffered lines are written out.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Bytes buffered at most before the logging thread writes them itself.
pub const MAX_BUFFERED: usize = 256 * 1024;

struct Inner {
    buffer: Vec<u8>,
    out: Box<dyn std::io::Write + Send>,
}

struct Shared {
    inner: Mutex<Inner>,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Shared {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves bytes, never a broken invariant.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes out what is buffered (under the lock, so lines keep their order).
    fn flush(&self) {
        let mut inner = self.inner();
        if !inner.buffer.is_empty() {
            let Inner { buffer, out } = &mut *inner;
            // Nowhere to report a failing stderr; the lines are dropped as a direct write's
            // would be.
            let _ = out.write_all(buffer);
            let _ = out.flush();
            buffer.clear();
        }
    }
}

/// `MakeWriter` for tracing-subscriber: each event's formatted line is appended to the buffer.
#[derive(Clone)]
pub struct LogBuffer {
    shared: Arc<Shared>,
}

/// Stops the writer thread and writes out what is buffered when dropped.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl LogBuffer {
    /// The buffer, written to standard error, and the guard of its writer thread.
    #[must_use]
    pub fn start() -> (Self, FlushGuard) {
        Self::start_to(Box::new(std::io::stderr()))
    }

    fn start_to(out: Box<dyn std::io::Write + Send>) -> (Self, FlushGuard) {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                buffer: Vec::with_capacity(MAX_BUFFERED),
                out,
            }),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let writer = shared.clone();
        let thread = std::thread::Builder::new()
            .name("nodeward-log".into())
            .spawn(move || loop {
                let stop = writer.stop.lock().unwrap_or_else(PoisonError::into_inner);
                let (stop, _) = writer
                    .wake
                    .wait_timeout(stop, FLUSH_EVERY)
                    .unwrap_or_else(PoisonError::into_inner);
                let stopping = *stop;
                drop(stop);
                writer.flush();
                if stopping {
                    return;
                }
            })
            // Without the thread, lines are still written when the buffer fills and at exit.
            .ok();
        (
            Self {
                shared: shared.clone(),
            },
            FlushGuard { shared, thread },
        )
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        *self
            .shared
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.shared.flush();
    }
}

/// One event's writer.
pub struct LineWriter<'a> {
    shared: &'a Shared,
}

impl std::io::Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let full = {
            let mut inner = self.shared.inner();
            inner.buffer.extend_from_slice(bytes);
            inner.buffer.len() >= MAX_BUFFERED
        };
        if full {
            self.shared.flush();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose bytes the test can read.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Seen {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_keep_their_order_and_reach_the_output_when_full_timed_or_dropped() {
        let seen = Seen::default();
        let (log, guard) = LogBuffer::start_to(Box::new(seen.clone()));
        let mut w = tracing_subscriber::fmt::MakeWriter::make_writer(&log);
        w.write_all(b"one\n").unwrap();
        w.write_all(b"two\n").unwrap();
        // The writer thread writes them within a flush period (bounded wait).
        let deadline = std::time::Instant::now() + FLUSH_EVERY * 50;
        while seen.0.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(FLUSH_EVERY / 4);
        }
        assert_eq!(seen.0.lock().unwrap().as_slice(), b"one\ntwo\n");
        // A full buffer is written by the logging thread itself, at once.
        let big = vec![b'x'; MAX_BUFFERED];
        w.write_all(&big).unwrap();
        assert_eq!(seen.0.lock().unwrap().len(), 8 + MAX_BUFFERED);
        w.write_all(b"three\n").unwrap();
        drop(guard);
        assert!(
            seen.0.lock().unwrap().ends_with(b"xthree\n"),
            "the guard writes out the rest"
        );
    }
}
