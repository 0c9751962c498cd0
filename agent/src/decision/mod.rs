//! One request in, one verdict out. The enforcer (HTTP and TCP), `nodeward check` and the
//! agent's `POST /check` all judge here, so they cannot disagree; callers only gather the
//! inputs ([`Judge`], [`HttpRequest`]) and act on or render the verdict.
//!
//! An HTTP request is judged in Envoy's order, each step able to answer:
//! 1. framing: `Content-Length` with `Transfer-Encoding`, or disagreeing lengths: 400;
//! 2. upgrades ([`upgrade`]): anything but WebSocket, and `CONNECT`: 403;
//! 3. authority ([`authority`]): several, missing (HTTP/1.1) or invalid `Host`: 400;
//! 4. destination: no workload at the address: 503 (fail closed);
//! 5. path normalization (Istio's mesh setting): an invalid path: 400;
//! 6. the kubelet's probes from the node ([`probe`]): forwarded unjudged;
//! 7. JWT authentication (Envoy's `jwt_authn`): 401 (403 for audiences);
//! 8. authorization (Istio's CUSTOM/DENY/ALLOW order): a matching CUSTOM policy leaves the
//!    verdict waiting for its provider ([`HttpVerdict::custom`], denied until resolved); the
//!    caller asks the provider (`crate::extauthz`) and hands the answer to [`after_custom`],
//!    which answers with the provider's denial or `statusOnError`, or goes on with DENY and
//!    ALLOW (Envoy's RBAC) over the request as the provider changed it: 403;
//! 9. forwarded, with the rewrite of [`HttpVerdict::rewrite`].
//!
//! A TCP connection ([`decide_tcp`]) is judged once with Istio's TCP semantics.

pub mod authority;
pub mod probe;
pub mod upgrade;

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use std::sync::Arc;

use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

use crate::authn::cache::TokenCache;
use crate::authn::rules::{rewrite, JwtRules, Keys};
use crate::authn::{www_authenticate, JwtError, Outcome, RequestParts};
use crate::authz::explain::{explain, Explanation};
use crate::authz::path::{normalize, Normalization, NormalizedPath};
use crate::authz::{
    AuthInfo, CustomProvider, Decision, Http, Peer, Request, WorkloadPolicies, DENIED_BODY,
};
use crate::extauthz::{CheckResult, Outcome as CheckOutcome, ProviderConfig};
use crate::state::workloads::Probe;
use probe::{Attempt, NodeAddresses};
use upgrade::Upgrade;

/// Why a request or connection went the way it did: the one vocabulary of the access log, the
/// `reason` label of `nodeward_requests_total`, and `nodeward check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// An ALLOW policy matched.
    AllowedByPolicy,
    /// No ALLOW policy applies to the workload.
    NoAllowPolicies,
    /// A DENY policy matched.
    DeniedByPolicy,
    /// ALLOW policies apply and none matched.
    NoAllowMatched,
    /// A CUSTOM policy matched: its provider decides (denied until it has answered).
    CustomCheck,
    /// A CUSTOM policy matched and its provider is undefined, invalid or one of several:
    /// denied (Istio's "deny-due-to-bad-CUSTOM-action").
    CustomProviderInvalid,
    /// The CUSTOM policy's provider denied: its status, headers and body.
    DeniedByProvider,
    /// The provider could not be asked (timeout, connection, 5xx, RPC error) and `failOpen`
    /// is off: `statusOnError`.
    ProviderError,
    /// The body the provider wants exceeds `maxRequestBytes` without `allowPartialMessage`:
    /// 413 (Envoy's buffer limit).
    PayloadTooLarge,
    /// The body read for the provider broke its framing or never came: 400.
    MalformedBody,
    /// One of the workload's probe endpoints, from the node: not judged.
    Probe,
    /// No workload has the destination address: 503.
    UnknownDestination,
    /// `Content-Length` with `Transfer-Encoding`, or lengths that disagree: 400.
    ContentLengthConflict,
    /// An upgrade other than WebSocket: 403.
    UpgradeRefused,
    /// `CONNECT`: 403.
    ConnectRefused,
    /// Several, missing or invalid `Host`: 400.
    BadHost,
    /// A path normalization refuses: 400.
    BadPath,
    /// A token was present and did not validate: 401 (403 for audiences).
    Authn(JwtError),
}

impl Reason {
    /// The word of logs, metrics and `check` (`authn_<error>` for authentication).
    #[must_use]
    pub fn label(self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            Self::AllowedByPolicy => "allowed_by_policy",
            Self::NoAllowPolicies => "no_allow_policies",
            Self::DeniedByPolicy => "denied_by_policy",
            Self::NoAllowMatched => "no_allow_matched",
            Self::CustomCheck => "custom_check",
            Self::CustomProviderInvalid => "custom_provider_invalid",
            Self::DeniedByProvider => "denied_by_provider",
            Self::ProviderError => "provider_error",
            Self::PayloadTooLarge => "payload_too_large",
            Self::MalformedBody => "malformed_body",
            Self::Probe => "probe",
            Self::UnknownDestination => "unknown_destination",
            Self::ContentLengthConflict => "content_length_conflict",
            Self::UpgradeRefused => "upgrade_refused",
            Self::ConnectRefused => "connect_refused",
            Self::BadHost => "bad_host",
            Self::BadPath => "bad_path",
            Self::Authn(error) => {
                let word = serde_json::to_value(error)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "error".into());
                return Cow::Owned(format!("authn_{word}"));
            }
        })
    }

    /// The `reason` of `nodeward_refused_total` when the request was refused as malformed or
    /// hostile before any policy was looked at.
    #[must_use]
    pub fn refusal(self) -> Option<&'static str> {
        match self {
            Self::ContentLengthConflict => Some("content_length_conflict"),
            Self::UpgradeRefused => Some("upgrade_refused"),
            Self::ConnectRefused => Some("connect_refused"),
            Self::BadHost => Some("bad_host"),
            Self::BadPath => Some("bad_path"),
            Self::MalformedBody => Some("malformed_body"),
            _ => None,
        }
    }

    fn of_authz(reason: crate::authz::Reason) -> Self {
        use crate::authz::Reason as R;
        match reason {
            R::CustomCheck => Self::CustomCheck,
            R::CustomProviderInvalid => Self::CustomProviderInvalid,
            R::DeniedByPolicy => Self::DeniedByPolicy,
            R::NoAllowPolicies => Self::NoAllowPolicies,
            R::AllowedByPolicy => Self::AllowedByPolicy,
            R::NoAllowMatched => Self::NoAllowMatched,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

/// The destination workload, as far as judging goes.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    /// The jwtRules that apply to it, merged.
    pub rules: &'a JwtRules,
    /// The AuthorizationPolicies that select it.
    pub policies: &'a WorkloadPolicies,
    /// Its probe endpoints.
    pub probes: &'a [Probe],
}

/// Everything a decision needs besides the request itself.
#[derive(Clone, Copy)]
pub struct Judge<'a> {
    /// `None`: no workload at the destination address (fail closed).
    pub destination: Option<Destination<'a>>,
    /// Who is asking (its `ip` is also the peer of the probe exemption).
    pub source: Peer<'a>,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: u16,
    /// The node's own addresses, for the probe exemption; `None`: no exemption.
    pub node: Option<&'a NodeAddresses>,
    pub keys: &'a dyn Keys,
    pub cache: &'a TokenCache,
    /// Unix seconds, for token times.
    pub now: u64,
    pub normalization: Normalization,
    /// `nodeward check`'s what-if identity, used when the request carries no token.
    pub assumed: Option<&'a AuthInfo>,
    /// Also explain every policy clause by clause (`check`); the enforcer does not.
    pub explain: bool,
}

/// An HTTP request as the decision sees it.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a Method,
    pub version: Version,
    /// HTTP/2 (h2c).
    pub h2: bool,
    /// The request target's path and query, as received.
    pub target: &'a str,
    /// The target's authority: absolute form (HTTP/1) or `:authority` (HTTP/2).
    pub uri_authority: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The framer under hyper saw `Content-Length` with `Transfer-Encoding` in this head.
    pub framing_conflict: bool,
}

/// An answer the agent gives itself instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Cow<'static, str>,
    /// `WWW-Authenticate` of a 401.
    pub www_authenticate: Option<String>,
    /// Headers for the client (a provider's denial).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The connection ends after the answer (its framing can no longer be trusted).
    pub close: bool,
}

/// The verdict on one HTTP request.
#[derive(Debug, Clone)]
pub struct HttpVerdict {
    pub reason: Reason,
    /// `None`: forwarded to the pod.
    pub answer: Option<Answer>,
    /// The authority judged, and sent: `None` for HTTP/1.0 without `Host`.
    pub authority: Option<String>,
    pub upgrade: Upgrade,
    /// The normalized path and query, once known.
    pub path: Option<NormalizedPath>,
    /// Authentication, when it ran.
    pub authn: Option<Outcome>,
    /// Authorization, when it ran.
    pub decision: Option<Decision>,
    pub explanation: Option<Explanation>,
    /// The deciding policy, or the jwtRules entry that refused the token.
    pub policy: Option<String>,
    /// The request principal (`iss/sub`) the request was judged with.
    pub principal: Option<String>,
    /// A CUSTOM policy matched: its provider must be asked ([`after_custom`]). Until then the
    /// verdict denies (fail closed).
    pub custom: Option<CustomCall>,
    /// The provider's answer, once asked.
    pub check: Option<CheckResult>,
    /// Headers for the client's response, whatever it is (an allowing provider's
    /// `headersToDownstreamOnAllow` / `response_headers_to_add`).
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    /// Whether authentication's rewrite ([`HttpVerdict::rewrite_authn`]) is done.
    pub authn_rewritten: bool,
}

/// The provider a matching CUSTOM policy names.
#[derive(Debug, Clone)]
pub struct CustomCall {
    pub provider: Arc<ProviderConfig>,
    /// The CUSTOM policy that matched.
    pub policy: String,
}

impl HttpVerdict {
    fn new(upgrade: Upgrade) -> Self {
        Self {
            reason: Reason::AllowedByPolicy,
            answer: None,
            authority: None,
            upgrade,
            path: None,
            authn: None,
            decision: None,
            explanation: None,
            policy: None,
            principal: None,
            custom: None,
            check: None,
            response_headers: Vec::new(),
            authn_rewritten: false,
        }
    }

    fn answered(
        mut self,
        reason: Reason,
        status: StatusCode,
        body: impl Into<Cow<'static, str>>,
        close: bool,
    ) -> Self {
        self.reason = reason;
        self.answer = Some(Answer {
            status,
            body: body.into(),
            www_authenticate: None,
            headers: Vec::new(),
            close,
        });
        self
    }

    /// Whether the request goes to the pod.
    #[must_use]
    pub fn allowed(&self) -> bool {
        self.answer.is_none()
    }

    /// The status the client gets from the agent (200 stands for "forwarded").
    #[must_use]
    pub fn status(&self) -> u16 {
        self.answer.as_ref().map_or(200, |a| a.status.as_u16())
    }

    /// Authentication's rewrite of the request, once: client copies of JWT output headers
    /// removed, tokens removed unless `forwardOriginalToken` (from headers, cookies and the
    /// judged query), output headers set. Envoy's `jwt_authn` filter does this before
    /// `ext_authz`, so an external authorizer sees the request as the pod will, and a header
    /// the authorizer sets is not undone afterwards.
    pub fn rewrite_authn(&mut self, rules: &JwtRules, headers: &mut HeaderMap) {
        if std::mem::replace(&mut self.authn_rewritten, true) {
            return;
        }
        let query = rewrite(
            rules,
            self.authn.as_ref().unwrap_or(&Outcome::NoToken),
            headers,
            self.path.as_ref().and_then(|p| p.query.as_deref()),
        );
        if let Some(path) = self.path.as_mut() {
            path.query = query;
        }
    }

    /// Rewrites an allowed request's headers for the pod (authentication's rewrite, if not done
    /// yet, and exactly the judged authority) and returns its path and query: what was judged
    /// is what the pod receives.
    pub fn rewrite(&mut self, rules: &JwtRules, headers: &mut HeaderMap, h2: bool) -> String {
        self.rewrite_authn(rules, headers);
        authority::set(headers, h2, self.authority.as_deref());
        self.target()
    }

    /// The judged path and query (after authentication's rewrite, once done), `/` when there
    /// is none.
    #[must_use]
    pub fn target(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "/".to_owned(), NormalizedPath::path_and_query)
    }
}

/// Content-Length values that disagree, or one beside Transfer-Encoding (hyper refuses most
/// on HTTP/1; this also covers HTTP/2).
fn conflicting_lengths(headers: &HeaderMap) -> bool {
    let mut values = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','));
    let Some(first) = values.next() else {
        return false;
    };
    let first = first.trim_ascii();
    values.any(|v| v.trim_ascii() != first) || headers.contains_key(header::TRANSFER_ENCODING)
}

fn destination_text(judge: &Judge<'_>) -> String {
    judge.destination_ip.map_or_else(
        || format!("port {}", judge.destination_port),
        |ip| SocketAddr::new(ip, judge.destination_port).to_string(),
    )
}

/// Judges one HTTP request (see the module doc for the steps).
#[must_use]
pub fn decide_http(req: &HttpRequest<'_>, judge: &Judge<'_>) -> HttpVerdict {
    let (mut verdict, destination, path) = match admit(req, judge) {
        Admitted::Go(verdict, destination, path) => (verdict, destination, path),
        Admitted::Answered(answered) => return answered,
    };
    if let (Some(node), Some(peer)) = (judge.node, judge.source.ip) {
        let attempt = Attempt::Http {
            method: req.method,
            path: &path.path,
        };
        if probe::exempt(
            destination.probes,
            node,
            peer,
            judge.destination_port,
            attempt,
        ) {
            verdict.reason = Reason::Probe;
            verdict.path = Some(path);
            return verdict;
        }
    }
    let authority = verdict.authority.take();
    let host = authority.as_deref().unwrap_or_default();

    // Authentication (Envoy's jwt_authn runs before RBAC).
    let parts = RequestParts {
        method: req.method,
        headers: req.headers,
        query: path.query.as_deref(),
    };
    let outcome = destination
        .rules
        .authenticate(&parts, judge.keys, judge.cache, judge.now);
    if let Outcome::Rejected { error, rule, .. } = &outcome {
        let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::UNAUTHORIZED);
        let www = (error.status() == 401)
            .then(|| www_authenticate(&format!("http://{host}{}", path.path), true));
        verdict.policy = rule.as_ref().map(|r| r.origin.clone());
        verdict.reason = Reason::Authn(*error);
        verdict.answer = Some(Answer {
            status,
            body: error.body().into(),
            www_authenticate: www,
            headers: Vec::new(),
            close: false,
        });
        verdict.path = Some(path);
        verdict.authn = Some(outcome);
        verdict.authority = authority;
        return verdict;
    }

    verdict.path = Some(path);
    verdict.authn = Some(outcome);
    verdict.authority = authority;
    authorize(verdict, destination, req, judge, true)
}

/// Step 8 over a verdict that passed authentication: CUSTOM first when `custom`, then DENY
/// and ALLOW. The identity is borrowed from the verified token (shared with the cache).
fn authorize(
    mut verdict: HttpVerdict,
    destination: Destination<'_>,
    req: &HttpRequest<'_>,
    judge: &Judge<'_>,
    custom: bool,
) -> HttpVerdict {
    let decision = {
        let outcome = verdict.authn.as_ref().unwrap_or(&Outcome::NoToken);
        let auth = match outcome {
            Outcome::Authenticated(a) => Some(&a.verified.auth),
            _ => judge.assumed,
        };
        let path = verdict.path.as_ref();
        let request = Request {
            source: judge.source,
            destination_ip: judge.destination_ip,
            destination_port: judge.destination_port,
            sni: None,
            http: Some(Http {
                method: req.method.as_str(),
                path: path.map_or("/", |p| p.path.as_str()),
                query: path.and_then(|p| p.query.as_deref()),
                host: verdict.authority.as_deref().unwrap_or_default(),
                headers: req.headers,
                auth,
            }),
        };
        let decision = if custom {
            destination.policies.evaluate(&request)
        } else {
            destination.policies.evaluate_after_custom(&request)
        };
        verdict.explanation = judge
            .explain
            .then(|| explain(destination.policies, &request));
        verdict.principal = auth.map(AuthInfo::principal);
        decision
    };
    verdict.policy = decision.decided_by.as_ref().map(|m| m.policy.clone());
    verdict.reason = Reason::of_authz(decision.reason);
    verdict.answer = (!decision.allow).then(|| Answer {
        status: StatusCode::FORBIDDEN,
        body: DENIED_BODY.into(),
        www_authenticate: None,
        headers: Vec::new(),
        close: false,
    });
    if decision.reason == crate::authz::Reason::CustomCheck {
        if let (CustomProvider::Ready(provider), Some(policy)) =
            (&destination.policies.provider, verdict.policy.clone())
        {
            verdict.custom = Some(CustomCall {
                provider: provider.clone(),
                policy,
            });
        }
    }
    verdict.decision = Some(decision);
    verdict
}

/// Step 8 after the CUSTOM policy's provider answered `result`: its denial or `statusOnError`
/// answers; an allow (or a failure with `failOpen`) goes on with DENY and ALLOW. `req` carries
/// the headers as the provider left them (the caller applied [`crate::extauthz::Allowed`]),
/// and the query changes are applied here to the judged path.
#[must_use]
pub fn after_custom(
    mut verdict: HttpVerdict,
    req: &HttpRequest<'_>,
    judge: &Judge<'_>,
    result: CheckResult,
) -> HttpVerdict {
    verdict.custom = None;
    let answer = |status, body: Cow<'static, str>, headers| Answer {
        status,
        body,
        www_authenticate: None,
        headers,
        close: false,
    };
    match (&result.outcome, result.failure()) {
        (
            CheckOutcome::Denied {
                status,
                headers,
                body,
            },
            _,
        ) => {
            verdict.reason = Reason::DeniedByProvider;
            verdict.answer = Some(answer(
                *status,
                String::from_utf8_lossy(body).into_owned().into(),
                headers.clone(),
            ));
        }
        (CheckOutcome::ErrorAnswer { headers, body, .. }, Some(Some(status))) => {
            verdict.reason = Reason::ProviderError;
            verdict.answer = Some(answer(
                status,
                String::from_utf8_lossy(body).into_owned().into(),
                headers.clone(),
            ));
        }
        (_, Some(Some(status))) => {
            verdict.reason = Reason::ProviderError;
            verdict.answer = Some(answer(status, Cow::Borrowed(""), Vec::new()));
        }
        (outcome, _) => {
            if let CheckOutcome::Allowed(allowed) = outcome {
                verdict.response_headers.clone_from(&allowed.downstream_add);
                if let Some(path) = verdict.path.as_mut() {
                    if let Some(query) = allowed.apply_query(path.query.as_deref()) {
                        path.query = query;
                    }
                }
            }
            if let Some(destination) = judge.destination {
                verdict = authorize(verdict, destination, req, judge, false);
            }
        }
    }
    verdict.check = Some(result);
    verdict
}

/// What steps 1-5 make of a request.
enum Admitted<'j> {
    /// On to the policies: the verdict so far (authority and upgrade known), the destination
    /// and the normalized path.
    Go(HttpVerdict, Destination<'j>, NormalizedPath),
    /// Answered before any policy was looked at.
    Answered(HttpVerdict),
}

/// Steps 1-5: what is refused before any policy is looked at.
fn admit<'j>(req: &HttpRequest<'_>, judge: &Judge<'j>) -> Admitted<'j> {
    let offer = upgrade::classify(
        req.method.as_str().as_bytes(),
        !req.h2 && req.version == Version::HTTP_11,
        req.headers
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
    );
    let mut verdict = HttpVerdict::new(offer);
    if req.framing_conflict || conflicting_lengths(req.headers) {
        return Admitted::Answered(verdict.answered(
            Reason::ContentLengthConflict,
            StatusCode::BAD_REQUEST,
            "Bad Request: conflicting Content-Length / Transfer-Encoding\n",
            true,
        ));
    }
    if let Upgrade::Refused(refusal) = offer {
        // Envoy's answer to an upgrade type it was not configured for: 403, no body.
        let reason = match refusal {
            upgrade::Refusal::Connect => Reason::ConnectRefused,
            upgrade::Refusal::Upgrade => Reason::UpgradeRefused,
        };
        return Admitted::Answered(verdict.answered(reason, StatusCode::FORBIDDEN, "", true));
    }
    match authority::of(req.uri_authority, req.headers, req.version, req.h2) {
        Ok(authority) => verdict.authority = authority,
        Err(e) => {
            return Admitted::Answered(verdict.answered(
                Reason::BadHost,
                StatusCode::BAD_REQUEST,
                format!("Bad Request: {e}\n"),
                true,
            ));
        }
    }
    let Some(destination) = judge.destination else {
        let body = format!("no workload at {}\n", destination_text(judge));
        return Admitted::Answered(verdict.answered(
            Reason::UnknownDestination,
            StatusCode::SERVICE_UNAVAILABLE,
            body,
            false,
        ));
    };
    match normalize(req.target, judge.normalization) {
        Ok(path) => Admitted::Go(verdict, destination, path),
        Err(e) => Admitted::Answered(verdict.answered(
            Reason::BadPath,
            StatusCode::BAD_REQUEST,
            format!("Bad Request: {e}\n"),
            false,
        )),
    }
}

/// The verdict on one TCP (or TLS) connection.
#[derive(Debug, Clone)]
pub struct TcpVerdict {
    pub allow: bool,
    pub reason: Reason,
    /// The deciding policy.
    pub policy: Option<String>,
    /// Authorization, when it ran.
    pub decision: Option<Decision>,
    pub explanation: Option<Explanation>,
    /// A CUSTOM policy matched and its (gRPC) provider must be asked ([`tcp_after_custom`]);
    /// until then the connection is refused.
    pub custom: Option<CustomCall>,
    /// The provider's answer, once asked.
    pub check: Option<CheckResult>,
}

/// Judges a connection that is not HTTP, with Istio's TCP semantics: an ALLOW rule that needs
/// HTTP attributes is dropped, other actions ignore them; `sni` is `connection.sni`.
#[must_use]
pub fn decide_tcp(sni: Option<&str>, judge: &Judge<'_>) -> TcpVerdict {
    let Some(destination) = judge.destination else {
        return TcpVerdict {
            allow: false,
            reason: Reason::UnknownDestination,
            policy: None,
            decision: None,
            explanation: None,
            custom: None,
            check: None,
        };
    };
    if let (None, Some(node), Some(peer)) = (sni, judge.node, judge.source.ip) {
        if probe::exempt(
            destination.probes,
            node,
            peer,
            judge.destination_port,
            Attempt::Tcp,
        ) {
            return TcpVerdict {
                allow: true,
                reason: Reason::Probe,
                policy: None,
                decision: None,
                explanation: None,
                custom: None,
                check: None,
            };
        }
    }
    let request = Request {
        source: judge.source,
        destination_ip: judge.destination_ip,
        destination_port: judge.destination_port,
        sni,
        http: None,
    };
    tcp_authorize(destination, &request, judge, true)
}

fn tcp_authorize(
    destination: Destination<'_>,
    request: &Request<'_>,
    judge: &Judge<'_>,
    custom: bool,
) -> TcpVerdict {
    let decision = if custom {
        destination.policies.evaluate(request)
    } else {
        destination.policies.evaluate_after_custom(request)
    };
    let policy = decision.decided_by.as_ref().map(|m| m.policy.clone());
    let custom = match (&decision.reason, &destination.policies.provider, &policy) {
        (crate::authz::Reason::CustomCheck, CustomProvider::Ready(p), Some(policy)) => {
            Some(CustomCall {
                provider: p.clone(),
                policy: policy.clone(),
            })
        }
        _ => None,
    };
    TcpVerdict {
        allow: decision.allow,
        reason: Reason::of_authz(decision.reason),
        policy,
        explanation: judge
            .explain
            .then(|| explain(destination.policies, request)),
        decision: Some(decision),
        custom,
        check: None,
    }
}

/// A TCP connection's verdict after the CUSTOM policy's provider answered (Envoy's network
/// `ext_authz` filter: OK goes on to RBAC, a denial or a failure without `failOpen` closes).
#[must_use]
pub fn tcp_after_custom(
    mut verdict: TcpVerdict,
    sni: Option<&str>,
    judge: &Judge<'_>,
    result: CheckResult,
) -> TcpVerdict {
    verdict.custom = None;
    let go_on = match (&result.outcome, result.failure()) {
        (CheckOutcome::Denied { .. }, _) => {
            verdict.reason = Reason::DeniedByProvider;
            false
        }
        (_, Some(Some(_))) => {
            verdict.reason = Reason::ProviderError;
            false
        }
        _ => true,
    };
    if go_on {
        if let Some(destination) = judge.destination {
            let request = Request {
                source: judge.source,
                destination_ip: judge.destination_ip,
                destination_port: judge.destination_port,
                sni,
                http: None,
            };
            verdict = tcp_authorize(destination, &request, judge, false);
        }
    } else {
        verdict.allow = false;
    }
    verdict.check = Some(result);
    verdict
}
