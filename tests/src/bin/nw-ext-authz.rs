//! The test kit's external authorizers ([`nodeward_tests::extauthz`], Istio's ext-authz sample)
//! as a process, so that a provider can run as a pod of the namespace node. Prints
//! `listening http=ADDR grpc=ADDR` once both listeners are bound, then one JSON line per check
//! received ([`nodeward_tests::extauthz::Check::to_json`]; read back with
//! [`nodeward_tests::extauthz::read_checks`]).
//!
//! Usage: `nw-ext-authz [--http ADDR] [--grpc ADDR] [--allow-service-account SA]
//! [--delay-ms N]`; runs until killed.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use nodeward_tests::extauthz::{Behavior, Check, ExtAuthz};

const USAGE: &str =
    "usage: nw-ext-authz [--http ADDR] [--grpc ADDR] [--allow-service-account SA] [--delay-ms N]";

fn main() -> std::io::Result<()> {
    let mut http = None;
    let mut grpc = None;
    let mut behavior = Behavior::default();
    let mut args = std::env::args().skip(1);
    let bad = |what: &str| std::io::Error::other(format!("{what}\n{USAGE}"));
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| bad(&format!("{flag} needs a value")))?;
        let addr = || {
            value
                .parse::<SocketAddr>()
                .map_err(|e| bad(&format!("{value}: {e}")))
        };
        match flag.as_str() {
            "--http" => http = Some(TcpListener::bind(addr()?)?),
            "--grpc" => grpc = Some(TcpListener::bind(addr()?)?),
            "--allow-service-account" => behavior.allow_service_account = value,
            "--delay-ms" => {
                let ms = value.parse().map_err(|e| bad(&format!("{value}: {e}")))?;
                behavior.delay = Duration::from_millis(ms);
            }
            other => return Err(bad(&format!("unknown flag {other}"))),
        }
    }
    if http.is_none() && grpc.is_none() {
        return Err(bad("give --http, --grpc or both"));
    }
    let show = |l: &Option<TcpListener>| {
        l.as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or_else(|| "-".to_owned(), |a| a.to_string())
    };
    let listening = format!("listening http={} grpc={}", show(&http), show(&grpc));
    let print = |check: &Check| {
        // Stdout is line-buffered: each check is in the log as soon as it is received.
        let _ = writeln!(std::io::stdout(), "{}", check.to_json());
    };
    let _servers = ExtAuthz::start_with(http, grpc, behavior, Some(Box::new(print)));
    writeln!(std::io::stdout(), "{listening}")?;
    loop {
        std::thread::park();
    }
}
