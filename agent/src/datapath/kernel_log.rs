//! Forwarding the kernel programs' aya-log lines into the agent's logs.
//!
//! The programs write a line only when `CONFIG.log_level` asks for it (off by default; see
//! [`nodeward_common::config`]). A dedicated thread waits on the log ring buffer and hands each
//! record to the `log` crate's global logger, which the agent's `tracing` subscriber receives
//! (tracing-subscriber installs the `log` bridge when it is initialized). The thread keeps this
//! work off the data-plane runtime.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
};

use aya::Ebpf;
use aya_log::EbpfLogger;

use super::DatapathError;

/// How long the thread waits for a record before it checks whether it should stop.
const POLL_MS: libc::c_int = 200;

/// The forwarding thread; stopped and joined on drop.
pub struct KernelLog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KernelLog {
    /// Takes the object's log ring buffer and starts forwarding. Records go to the `log` crate's
    /// logger as installed *now*: start the datapath after the tracing subscriber.
    pub fn start(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        let mut logger =
            EbpfLogger::init(ebpf).map_err(|source| DatapathError::Logger { source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("nodeward-bpf-log".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    let mut poll = libc::pollfd {
                        fd: logger.as_fd().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    let ready = unsafe { libc::poll(&raw mut poll, 1, POLL_MS) };
                    if ready > 0 {
                        logger.flush();
                    }
                }
                logger.flush();
            })
            .map_err(|source| DatapathError::LogThread { source })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for KernelLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The thread only polls and logs; a panic there has already been reported.
            let _ = thread.join();
        }
    }
}
