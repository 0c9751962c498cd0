//! `nodeward jwt decode` and `nodeward jwt verify`: look inside a token, and check one against
//! a key set with the same code the enforcer uses.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde_json::json;

use super::check::Output;
use crate::authn::fetch::{FetchConfig, Fetcher};
use crate::authn::jwks::KeySet;
use crate::authn::token::{self, unix_now, Decoded};
use crate::authn::JwtError;

#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    /// Print a token's header, claims and times. No verification: says so.
    Decode(DecodeArgs),
    /// Verify a token's signature, issuer, audience and times against a JWKS.
    ///
    /// Exit status: 0 valid, 1 invalid (with Envoy's reason), 2 bad input.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// The token, or `-` to read it from standard input.
    pub token: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The token, or `-` to read it from standard input.
    pub token: String,
    /// The key set: a file, or an http(s) URL to fetch it from.
    #[arg(long, value_name = "FILE|URL")]
    pub jwks: String,
    /// The issuer the token must have (default: whatever it says).
    #[arg(long)]
    pub issuer: Option<String>,
    /// An allowed audience; repeatable (none: any audience).
    #[arg(long = "audience", value_name = "AUD")]
    pub audiences: Vec<String>,
    /// The time to judge exp/nbf at, Unix seconds; default now.
    #[arg(long, value_name = "UNIX_SECONDS")]
    pub now: Option<u64>,
    /// Fetch timeout for a URL.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Bad input to the jwt commands (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum JwtCliError {
    /// Standard input could not be read.
    #[error("reading the token from standard input: {0}")]
    Stdin(std::io::Error),
    /// The JWKS file could not be read.
    #[error("reading JWKS file {path}: {source}")]
    JwksFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The JWKS is not usable.
    #[error("JWKS {source_name}: {error}")]
    Jwks { source_name: String, error: String },
}

fn read_token(arg: &str) -> Result<String, JwtCliError> {
    if arg == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(JwtCliError::Stdin)?;
        Ok(text.trim().to_owned())
    } else {
        Ok(arg.trim().to_owned())
    }
}

fn print(text: &str) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// Runs a jwt subcommand; returns the exit status.
#[must_use]
pub fn run(command: &JwtCommand) -> u8 {
    let result = match command {
        JwtCommand::Decode(args) => decode(args),
        JwtCommand::Verify(args) => verify(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

/// `2026-11-22T14:00:00Z (in 1h 2m)`.
fn when(secs: u64, now: u64) -> String {
    let at = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs));
    // The two largest units are enough for a person: "8years 2months".
    let rel = |d: u64| {
        let full = humantime::format_duration(Duration::from_secs(d)).to_string();
        full.split(' ').take(2).collect::<Vec<_>>().join(" ")
    };
    if secs >= now {
        format!("{at} (in {})", rel(secs - now))
    } else {
        format!("{at} ({} ago)", rel(now - secs))
    }
}

fn decode(args: &DecodeArgs) -> Result<u8, JwtCliError> {
    let token = read_token(&args.token)?;
    let now = unix_now();
    let decoded = match token::decode(&token) {
        Ok(d) => d,
        Err(e) => {
            print(&format!("not a decodable JWT: {e}"));
            return Ok(1);
        }
    };
    let principal = format!("{}/{}", decoded.issuer, decoded.subject);
    match args.output {
        Output::Json => print(
            &serde_json::to_string_pretty(&json!({
                "verified": false,
                "header": decoded.header,
                "claims": decoded.claims,
                "principal": principal,
                "expired": decoded.exp.map(|e| e < now),
            }))
            .unwrap_or_default(),
        ),
        Output::Text => {
            let mut out = String::from("NOT VERIFIED: decoded only; no signature, issuer, audience or time check was made.\n");
            let _ = writeln!(
                out,
                "header:    {}",
                serde_json::Value::Object(decoded.header.clone())
            );
            let _ = writeln!(
                out,
                "claims:    {}",
                serde_json::to_string_pretty(&decoded.claims)
                    .unwrap_or_default()
                    .replace('\n', "\n           ")
            );
            for (name, value) in [
                ("issued", decoded.iat),
                ("not before", decoded.nbf),
                ("expires", decoded.exp),
            ] {
                if let Some(v) = value {
                    let _ = writeln!(out, "{:<10} {}", format!("{name}:"), when(v, now));
                }
            }
            let _ = write!(out, "principal: {principal}");
            print(&out);
        }
    }
    Ok(0)
}

fn load_keys(args: &VerifyArgs) -> Result<KeySet, JwtCliError> {
    if args.jwks.starts_with("http://") || args.jwks.starts_with("https://") {
        return fetch_jwks(&args.jwks, args.timeout);
    }
    let bytes = std::fs::read(&args.jwks).map_err(|source| JwtCliError::JwksFile {
        path: args.jwks.clone().into(),
        source,
    })?;
    KeySet::parse(&bytes).map_err(|e| JwtCliError::Jwks {
        source_name: args.jwks.clone(),
        error: e.to_string(),
    })
}

fn check(
    decoded: &Decoded<'_>,
    args: &VerifyArgs,
    keys: &KeySet,
    now: u64,
) -> Result<(), JwtError> {
    if args
        .issuer
        .as_ref()
        .is_some_and(|iss| *iss != decoded.issuer)
    {
        return Err(JwtError::UnknownIssuer);
    }
    decoded.check_time(now)?;
    decoded.check_audience(&args.audiences)?;
    decoded.check_signature(keys)
}

fn verify(args: &VerifyArgs) -> Result<u8, JwtCliError> {
    let token = read_token(&args.token)?;
    let keys = load_keys(args)?;
    let now = args.now.unwrap_or_else(unix_now);
    let result = if token.is_empty() {
        Err(JwtError::Missing)
    } else {
        token::decode(&token).and_then(|d| check(&d, args, &keys, now).map(|()| d))
    };
    let (code, value) = match &result {
        Ok(d) => (
            0,
            json!({"valid": true, "principal": format!("{}/{}", d.issuer, d.subject), "kid": d.kid, "alg": format!("{:?}", d.alg)}),
        ),
        Err(e) => (
            1,
            json!({"valid": false, "error": e, "status": e.status(), "body": e.body()}),
        ),
    };
    match args.output {
        Output::Json => print(&serde_json::to_string_pretty(&value).unwrap_or_default()),
        Output::Text => match &result {
            Ok(d) => print(&format!(
                "valid: principal {}/{} (kid {}, {:?}), keys from {}",
                d.issuer,
                d.subject,
                d.kid.as_deref().unwrap_or("-"),
                d.alg,
                args.jwks
            )),
            Err(e) => print(&format!(
                "invalid: {e} (Envoy would answer {} with this body)",
                e.status()
            )),
        },
    }
    Ok(code)
}

/// Fetches a key set with the agent's fetcher (same address checks and limits).
fn fetch_jwks(url: &str, timeout: Duration) -> Result<KeySet, JwtCliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| JwtCliError::Jwks {
            source_name: url.to_owned(),
            error: format!("starting a runtime: {e}"),
        })?;
    let fetcher = Fetcher::new(FetchConfig::default()).map_err(|e| JwtCliError::Jwks {
        source_name: url.to_owned(),
        error: e.to_string(),
    })?;
    runtime
        .block_on(fetcher.fetch_keys("(nodeward jwt verify)", url, Some(timeout)))
        .map_err(|e| JwtCliError::Jwks {
            source_name: url.to_owned(),
            error: e.to_string(),
        })
}
