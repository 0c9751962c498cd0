//! The real `nodeward` binary as a test drives it: [`Agent`] starts it (on loopback in the
//! machine's namespace, or inside a [`crate::netns::TestNode`] through the command the node
//! prepares), waits for its admin server, GETs admin endpoints, reads its log and sends signals.
//! It stops the agent when dropped, also on panic: SIGTERM so it removes what it made, SIGKILL
//! after 5 s.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A response: status, head (status line and headers), body.
pub type Response = (u16, String, String);

/// One HTTP/1.1 exchange with `Connection: close` from this process's namespace; `None` when
/// nothing answers.
#[must_use]
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, head.to_owned(), body.to_owned()))
}

/// A running agent; see the module documentation.
pub struct Agent {
    child: Child,
    admin: SocketAddr,
    /// The namespace its admin server is reached in; `None`: this process's.
    netns: Option<String>,
    log: PathBuf,
}

impl Agent {
    /// Starts `command` (`nodeward run …`, or a wrapper that execs it, like `setpriv`) with its
    /// stdout and stderr appended to `log`. `admin` is its `--admin` address, reached inside
    /// `netns` when given. Does not wait: see [`Agent::wait_for`], [`Agent::wait_ready`].
    #[must_use]
    pub fn spawn(mut command: Command, admin: SocketAddr, netns: Option<&str>, log: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = file.try_clone().expect("log file handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        Self {
            child,
            admin,
            netns: netns.map(str::to_owned),
            log: log.to_owned(),
        }
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    #[must_use]
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// Its log so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once it holds `needle`, or after 5 s: the agent writes its buffered lines
    /// every 100 ms.
    #[must_use]
    pub fn log_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log();
            if log.contains(needle) || Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `method path` with `body` to the admin server; `None` when nothing answers.
    #[must_use]
    pub fn request(&self, method: &str, path: &str, body: &str) -> Option<Response> {
        match &self.netns {
            None => http(self.admin, method, path, body),
            Some(ns) => crate::netns::in_netns(ns, || http(self.admin, method, path, body)),
        }
    }

    /// `GET path` from the admin server.
    #[must_use]
    pub fn get(&self, path: &str) -> Option<Response> {
        self.request("GET", path, "")
    }

    /// `/debug/state` as JSON (panics unless 200 and JSON).
    #[must_use]
    pub fn state(&self) -> Value {
        let (status, _, body) = self.get("/debug/state").expect("/debug/state answers");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/debug/state is not JSON ({e}): {body}"))
    }

    /// The value of the sample `name` (with its labels, as printed) in `/metrics`; 0 when absent.
    #[must_use]
    pub fn metric(&self, name: &str) -> u64 {
        let body = self
            .get("/metrics")
            .map(|(_, _, body)| body)
            .unwrap_or_default();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Panics with the agent's log when `condition` does not hold within `timeout`, or the
    /// agent exits meanwhile.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&Self) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if condition(self) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "nodeward run exited ({status}) while waiting for {what}; its log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}; the agent's log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `/healthz` to answer 200 (the admin server is up).
    pub fn wait_healthy(&mut self, timeout: Duration) {
        self.wait_for("the admin server to answer /healthz", timeout, |agent| {
            agent
                .get("/healthz")
                .is_some_and(|(status, _, _)| status == 200)
        });
    }

    /// Waits for `/readyz` to answer 200 (data path attached, policies loaded, JWKS fetched).
    pub fn wait_ready(&mut self, timeout: Duration) {
        self.wait_for("/readyz 200 (ready)", timeout, |agent| {
            agent
                .get("/readyz")
                .is_some_and(|(status, _, _)| status == 200)
        });
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        assert!(
            self.signal_term(),
            "kill -TERM {}: {}",
            self.pid(),
            std::io::Error::last_os_error()
        );
    }

    /// SIGTERM; whether it was delivered. The child is not reaped yet, so its pid is still its.
    fn signal_term(&self) -> bool {
        libc::pid_t::try_from(self.pid())
            // SAFETY: kill(2) has no memory preconditions.
            .is_ok_and(|pid| unsafe { libc::kill(pid, libc::SIGTERM) } == 0)
    }

    /// Waits (at most `bound`) for the agent to exit; panics with its log when it does not.
    pub fn wait_exit(&mut self, bound: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the agent") {
                return status;
            }
            assert!(
                start.elapsed() < bound,
                "nodeward run did not exit within {bound:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `limit` for the agent to exit by itself: its exit code; `None` if it was still
    /// running (it is then killed) or was killed by a signal.
    pub fn exit_code_within(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then its exit code within `wait` (`None`: it had to be killed).
    pub fn terminate(&mut self, wait: Duration) -> Option<i32> {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal_term();
        }
        self.exit_code_within(wait)
    }

    /// SIGKILL: a crash, the agent cleans nothing up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate(Duration::from_secs(5));
        }
    }
}
