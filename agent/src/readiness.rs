//! Readiness as a list of named checks, each added by the part of the agent it describes:
//! `config` (a snapshot is published), `jwks` (every key source answered), `listener`,
//! `running` (not shutting down), the data path's `datapath` (programs attached), and one
//! `kubernetes-<watcher>` per Kubernetes watcher. The admin server's `/readyz` answers 200 only
//! when every check passes, and names the ones that do not.
//!
//! Shared vocabulary: it depends on nothing else in the crate, so every part can add checks
//! without knowing the admin server.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// A check: `Ok(detail)` when it passes, `Err(reason)` when it does not.
type Probe = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

/// The outcome of one check, as `/readyz`, `/debug/state` and `nodeward status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    /// What passed (`generation 3`), or why not (`2 JWKS sources have not answered yet`).
    pub detail: String,
}

/// The agent's readiness checks. Cheap to evaluate; evaluated on every `/readyz`.
#[derive(Default)]
pub struct Readiness {
    checks: Mutex<Vec<(String, Probe)>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let checks = self.checks.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_list()
            .entries(checks.iter().map(|(name, _)| name))
            .finish()
    }
}

impl Readiness {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check computed on every evaluation (it must not block).
    pub fn add_check(
        &self,
        name: &str,
        probe: impl Fn() -> Result<String, String> + Send + Sync + 'static,
    ) {
        self.checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name.to_owned(), Box::new(probe)));
    }

    /// Adds a check that passes once the returned flag is set (by whoever owns the step).
    /// `waiting` says what is awaited while it is not.
    pub fn add_flag(&self, name: &str, waiting: &str) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&flag);
        let waiting = waiting.to_owned();
        self.add_check(name, move || {
            if seen.load(Ordering::Acquire) {
                Ok("ok".to_owned())
            } else {
                Err(waiting.clone())
            }
        });
        flag
    }

    /// Every check, in the order they were added.
    #[must_use]
    pub fn evaluate(&self) -> Vec<CheckResult> {
        self.checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, probe)| match probe() {
                Ok(detail) => CheckResult {
                    name: name.clone(),
                    ok: true,
                    detail,
                },
                Err(detail) => CheckResult {
                    name: name.clone(),
                    ok: false,
                    detail,
                },
            })
            .collect()
    }

    /// The `/readyz` answer: ready or not, and the body (one `[+]name detail` or
    /// `[-]name reason` line per check, then a verdict line).
    #[must_use]
    pub fn report(&self) -> (bool, String) {
        let results = self.evaluate();
        let ready = results.iter().all(|r| r.ok);
        let mut body = String::new();
        for r in &results {
            let mark = if r.ok { '+' } else { '-' };
            let _ = writeln!(body, "[{mark}]{} {}", r.name, r.detail);
        }
        body.push_str(if ready { "ready\n" } else { "not ready\n" });
        (ready, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passes() {
        let readiness = Readiness::new();
        readiness.add_check("config", || Ok("generation 1".into()));
        let attached = readiness.add_flag("datapath", "programs not attached yet");
        let (ready, body) = readiness.report();
        assert!(!ready);
        assert_eq!(
            body,
            "[+]config generation 1\n[-]datapath programs not attached yet\nnot ready\n"
        );
        attached.store(true, Ordering::Release);
        let (ready, body) = readiness.report();
        assert!(ready, "{body}");
        assert!(body.ends_with("[+]datapath ok\nready\n"), "{body}");
    }

    #[test]
    fn no_checks_is_ready() {
        assert!(Readiness::new().report().0);
    }
}
