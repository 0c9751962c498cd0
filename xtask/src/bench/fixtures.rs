//! What the rows load: the policies, the HAProxy and nginx configurations, and tokens signed
//! with the test issuer's key.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use nodeward_tests::netns::{Pod, NODE_ADDR};
use serde_json::{json, Value};

use super::{path_str, BODY, ISSUER, PORT};

pub(super) fn policies_yaml(app: &str, jwks: &str) -> String {
    format!(
        "# cargo xtask bench: RS256 issuer (Istio's sample JWKS inline) and an ALLOW policy on\n\
         # requestPrincipals with a groups claim condition.\n\
         apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
         metadata: {{name: bench-jwt, namespace: bench}}\n\
         spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n\
         \x20 jwtRules:\n  - issuer: {ISSUER}\n    jwks: '{jwks}'\n\
         ---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: bench-require-group, namespace: bench}}\n\
         spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: ALLOW\n  rules:\n\
         \x20 - from:\n    - source:\n        requestPrincipals: [\"{ISSUER}/{ISSUER}\"]\n\
         \x20   when:\n    - key: request.auth.claims[groups]\n      values: [\"group1\"]\n"
    )
}

/// HAProxy doing what the agent does in row 3: a Bearer token is required to pass the ALLOW
/// policy (403 without, like Istio), RS256 signature with the issuer's key, issuer, `exp`
/// (HAProxy has no skew setting), principal iss/sub and `group1` among the first four entries
/// of `groups` (HAProxy 2.6's `json_query` returns scalars only, so an array is read by index).
/// Two threads, like the agent's two data-plane workers on this machine; upstream connections
/// are reused (`http-reuse always`), like the agent's pool.
pub(super) fn haproxy_cfg(public_key: &Path, server: &Pod) -> Result<String> {
    let key = path_str(public_key)?;
    let mut groups = String::new();
    for i in 0..4 {
        writeln!(
            groups,
            "  acl in_group var(txn.bearer),jwt_payload_query('$.groups[{i}]') -m str group1"
        )?;
    }
    Ok(format!(
        "# cargo xtask bench, row 4\n\
         global\n  nbthread 2\n  maxconn 4096\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n\
         frontend bench\n  bind {NODE_ADDR}:{PORT}\n\
         \x20 http-request set-var(txn.bearer) http_auth_bearer\n\
         \x20 http-request deny deny_status 403 unless {{ var(txn.bearer) -m found }}\n\
         \x20 http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')\n\
         \x20 http-request deny deny_status 401 unless {{ var(txn.alg) -m str RS256 }}\n\
         \x20 http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,\"{key}\") -m int 1 }}\n\
         \x20 http-request set-var(txn.iss) var(txn.bearer),jwt_payload_query('$.iss')\n\
         \x20 http-request deny deny_status 401 unless {{ var(txn.iss) -m str {ISSUER} }}\n\
         \x20 http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')\n\
         \x20 http-request set-var(txn.now) date\n\
         \x20 http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int lt 0 }}\n\
         \x20 acl principal var(txn.bearer),jwt_payload_query('$.sub') -m str {ISSUER}\n\
         {groups}\
         \x20 http-request deny deny_status 403 unless principal in_group\n\
         \x20 default_backend pod\n\
         backend pod\n  server pod {ip}:{PORT}\n",
        ip = server.ip
    ))
}

pub(super) fn write_nginx_conf(dir: &Path, server: &Pod) -> Result<PathBuf> {
    let d = path_str(dir)?;
    let conf = format!(
        "# cargo xtask bench: one worker, no access log, a small fixed body\n\
         daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 60s;\n\
         \x20 client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n\
         \x20 fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n\
         \x20 server {{\n    listen {ip}:{PORT};\n    location / {{ default_type text/plain; return 200 \"{body}\"; }}\n  }}\n}}\n",
        ip = server.ip,
        body = BODY.replace('\n', "\\n"),
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf)?;
    Ok(path)
}

/// Signs RS256 tokens: Istio's sample key (PKCS#1 PEM), parsed once.
pub(super) struct Signer {
    pub(super) key: RsaKeyPair,
    pub(super) header: String,
}

impl Signer {
    pub(super) fn new(pem: &str, kid: &str) -> Result<Self> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(body.trim()).context("key.pem is not PEM")?;
        let key = RsaKeyPair::from_der(&der)
            .map_err(|e| anyhow::anyhow!("key.pem is not an RSA private key: {e}"))?;
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
        Ok(Self {
            key,
            header: URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
        })
    }

    pub(super) fn sign(&self, claims: &Value, rng: &SystemRandom) -> Result<String> {
        let input = format!(
            "{}.{}",
            self.header,
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
        );
        let mut signature = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, rng, input.as_bytes(), &mut signature)
            .map_err(|e| anyhow::anyhow!("signing a bench token: {e}"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// RS256 tokens of Istio's sample issuer with `groups: [group1, group2]`, one per index (the
/// index is the `jti`, so each is distinct), valid for two hours.
pub(super) fn mint(key: &Signer, tag: &str, range: std::ops::Range<usize>) -> Result<Vec<String>> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let rng = SystemRandom::new();
    range
        .map(|i| {
            let claims = json!({
                "iss": ISSUER, "sub": ISSUER, "groups": ["group1", "group2"],
                "iat": now, "exp": now + 7200, "jti": format!("bench-{tag}-{i}"),
            });
            key.sign(&claims, &rng)
        })
        .collect()
}

/// [`mint`] on every core.
pub(super) fn mint_parallel(
    key: &Signer,
    tag: &str,
    range: std::ops::Range<usize>,
) -> Result<Vec<String>> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let chunk = range.len().div_ceil(cores).max(1);
    let parts: Vec<std::ops::Range<usize>> = (range.start..range.end)
        .step_by(chunk)
        .map(|s| s..(s + chunk).min(range.end))
        .collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| scope.spawn(move || mint(key, tag, part)))
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a minting thread panicked"))??,
            );
        }
        Ok(all)
    })
}
