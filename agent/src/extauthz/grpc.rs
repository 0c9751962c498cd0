//! `envoyExtAuthzGrpc`: `envoy.service.auth.v3.Authorization/Check` with Envoy's protos
//! (the `envoy-types` crate) over a tonic channel.
//!
//! The `CheckRequest` carries what Envoy's `CheckRequestUtils` puts in it: source and
//! destination addresses and principals (`spiffe://` + Istio's principal), and for HTTP the
//! method, the headers (lower-case names, repeated values joined with `,`, with `:authority`,
//! `:method`, `:path` and `:scheme`), the path with its query, host, scheme, protocol, size and,
//! when `includeRequestBodyInCheck` asks, the body (`raw_body` with `packAsBytes`). A TCP
//! connection (Envoy's network filter) carries only the peers.
//!
//! The `CheckResponse`: status OK allows, with the `ok_response` changes (headers to set, to
//! append, to remove, headers for the client, query parameters); any other status denies with
//! `denied_response` (status, default 403; headers; body); a failed RPC is an error, and an
//! `error_response` is an error whose status (default `statusOnError`), headers and body the
//! client gets unless `failOpen`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::SystemTime;

use ::http::{HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address, Address, HeaderValueOption, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::Timestamp;
use tonic::transport::Channel;

use super::mesh::ProviderConfig;
use super::{protected_header, Allowed, CheckInput, Outcome, PARTIAL_BODY_HEADER};

/// gRPC's OK.
const OK: i32 = 0;

pub async fn check(channel: Channel, provider: &ProviderConfig, input: &CheckInput<'_>) -> Outcome {
    let request = check_request(provider, input);
    let mut client = AuthorizationClient::new(channel);
    match client.check(request).await {
        Ok(response) => interpret(response.into_inner()),
        Err(status) => Outcome::Error(format!(
            "Check failed: {:?}: {}",
            status.code(),
            status.message()
        )),
    }
}

fn socket(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..SocketAddress::default()
        })),
    }
}

fn peer(addr: SocketAddr, principal: Option<&str>) -> Peer {
    Peer {
        address: Some(socket(addr)),
        principal: principal
            .map(|p| format!("spiffe://{p}"))
            .unwrap_or_default(),
        ..Peer::default()
    }
}

/// The `CheckRequest` for one request or connection.
#[must_use]
pub fn check_request(provider: &ProviderConfig, input: &CheckInput<'_>) -> CheckRequest {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let http = input.http.map(|h| {
        let mut headers: HashMap<String, String> = HashMap::new();
        for (name, value) in h.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            headers
                .entry(name.as_str().to_owned())
                .and_modify(|v| {
                    v.push(',');
                    v.push_str(&value);
                })
                .or_insert_with(|| value.into_owned());
        }
        headers.insert(":authority".into(), h.host.to_owned());
        headers.insert(":method".into(), h.method.to_owned());
        headers.insert(":path".into(), h.path.to_owned());
        headers.insert(":scheme".into(), "http".into());
        headers.remove("host");
        let (body, raw_body) = match (h.body, &provider.body) {
            (Some((bytes, partial)), Some(settings)) => {
                headers.insert(PARTIAL_BODY_HEADER.into(), partial.to_string());
                if settings.pack_as_bytes {
                    (String::new(), bytes.to_vec())
                } else {
                    (String::from_utf8_lossy(bytes).into_owned(), Vec::new())
                }
            }
            _ => (String::new(), Vec::new()),
        };
        HttpRequest {
            id: h
                .headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            method: h.method.to_owned(),
            headers,
            path: h.path.to_owned(),
            host: h.host.to_owned(),
            scheme: "http".into(),
            size: h.size,
            protocol: h.protocol.to_owned(),
            body,
            raw_body,
            ..HttpRequest::default()
        }
    });
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(input.source, input.source_principal)),
            destination: Some(peer(input.destination, input.destination_principal)),
            request: Some(Request {
                time: Some(Timestamp {
                    seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
                }),
                http,
            }),
            ..AttributeContext::default()
        }),
    }
}

fn header(option: &HeaderValueOption) -> Option<(HeaderName, HeaderValue)> {
    let h = option.header.as_ref()?;
    let name = HeaderName::from_bytes(h.key.as_bytes()).ok()?;
    let value = if h.raw_value.is_empty() {
        HeaderValue::from_str(&h.value).ok()?
    } else {
        HeaderValue::from_bytes(&h.raw_value).ok()?
    };
    Some((name, value))
}

/// How a header of `ok_response.headers` changes the request. The `append` field, when set,
/// decides (it defaults to false in this message: replace); otherwise `append_action`, whose
/// default value reads as replace too; `ADD_IF_ABSENT` adds only a header the request lacks.
/// (`OVERWRITE_IF_EXISTS` is taken as replace.)
fn mutation(option: &HeaderValueOption) -> Mutation {
    // `append` is deprecated in favour of `append_action`, yet providers still send it, and
    // Envoy still reads it first.
    #[expect(deprecated, reason = "read as Envoy reads it")]
    let append = option.append.as_ref().map(|b| b.value);
    match append {
        Some(true) => Mutation::Append,
        Some(false) => Mutation::Set,
        None => match HeaderAppendAction::try_from(option.append_action) {
            Ok(HeaderAppendAction::AddIfAbsent) => Mutation::AddIfAbsent,
            _ => Mutation::Set,
        },
    }
}

enum Mutation {
    Set,
    Append,
    AddIfAbsent,
}

/// The provider's answer.
#[must_use]
pub fn interpret(response: CheckResponse) -> Outcome {
    let code = response.status.as_ref().map_or(OK, |s| s.code);
    match response.http_response {
        Some(HttpResponse::ErrorResponse(e)) => {
            // Envoy: an error (`failure_mode_allow` applies); the client gets its status, or
            // `status_on_error` when it has none, with its headers and body.
            let status = e
                .status
                .and_then(|s| u16::try_from(s.code).ok())
                .filter(|c| *c != 0)
                .and_then(|c| StatusCode::from_u16(c).ok());
            return Outcome::ErrorAnswer {
                message: format!(
                    "the provider answered an error_response{}",
                    status
                        .map(|s| format!(" ({})", s.as_u16()))
                        .unwrap_or_default()
                ),
                status,
                headers: e.headers.iter().filter_map(header).collect(),
                body: Bytes::from(e.body),
            };
        }
        _ if code != OK => {}
        Some(HttpResponse::OkResponse(ok)) => {
            let mut allowed = Allowed::default();
            for option in &ok.headers {
                let Some((name, value)) = header(option) else {
                    continue;
                };
                if protected_header(name.as_str()) {
                    continue;
                }
                match mutation(option) {
                    Mutation::Set => allowed.upstream_set.push((name, value)),
                    Mutation::Append => allowed.upstream_append.push((name, value)),
                    Mutation::AddIfAbsent => allowed.upstream_add_if_absent.push((name, value)),
                }
            }
            for name in &ok.headers_to_remove {
                match HeaderName::from_bytes(name.as_bytes()) {
                    Ok(n) if !protected_header(n.as_str()) => allowed.upstream_remove.push(n),
                    _ => {}
                }
            }
            allowed.downstream_add = ok
                .response_headers_to_add
                .iter()
                .filter_map(header)
                .collect();
            allowed.query_set = ok
                .query_parameters_to_set
                .iter()
                .map(|q| (q.key.clone(), q.value.clone()))
                .collect();
            allowed
                .query_remove
                .clone_from(&ok.query_parameters_to_remove);
            return Outcome::Allowed(allowed);
        }
        _ => return Outcome::Allowed(Allowed::default()),
    }
    // Denied: the status and body the provider gives, else Envoy's 403.
    let (status, headers, body) = match response.http_response {
        Some(HttpResponse::DeniedResponse(d)) => {
            let status = d
                .status
                .and_then(|s| u16::try_from(s.code).ok())
                .filter(|c| *c != 0)
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::FORBIDDEN);
            (
                status,
                d.headers.iter().filter_map(header).collect(),
                Bytes::from(d.body),
            )
        }
        _ => (StatusCode::FORBIDDEN, Vec::new(), Bytes::new()),
    };
    Outcome::Denied {
        status,
        headers,
        body,
    }
}

#[cfg(test)]
mod tests {
    //! Rows from Envoy's `external_auth.proto` (`CheckResponse`, `DeniedHttpResponse`,
    //! `error_response`) and `ext_authz_grpc_impl_test.cc`.
    use envoy_types::pb::envoy::config::core::v3::HeaderValue as PbHeader;
    use envoy_types::pb::envoy::r#type::v3::HttpStatus;
    use envoy_types::pb::envoy::service::auth::v3::{DeniedHttpResponse, OkHttpResponse};
    use envoy_types::pb::google::rpc::Status;

    use super::*;

    fn option(key: &str, value: &str) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(PbHeader {
                key: key.into(),
                value: value.into(),
                ..PbHeader::default()
            }),
            ..HeaderValueOption::default()
        }
    }

    fn denied(code: i32) -> DeniedHttpResponse {
        DeniedHttpResponse {
            status: Some(HttpStatus { code }),
            headers: vec![option("x-ext-authz-check-result", "denied")],
            body: "denied by ext_authz".into(),
        }
    }

    fn response(code: i32, http: Option<HttpResponse>) -> CheckResponse {
        CheckResponse {
            status: Some(Status {
                code,
                ..Status::default()
            }),
            http_response: http,
            ..CheckResponse::default()
        }
    }

    #[test]
    fn ok_status_allows_with_its_header_changes() {
        let ok = OkHttpResponse {
            headers: vec![option("x-ext-authz-check-result", "allowed")],
            headers_to_remove: vec!["x-remove-me".into()],
            ..OkHttpResponse::default()
        };
        let Outcome::Allowed(a) = interpret(response(0, Some(HttpResponse::OkResponse(ok)))) else {
            panic!("allowed expected");
        };
        assert_eq!(a.upstream_set.len(), 1);
        assert_eq!(a.upstream_remove[0].as_str(), "x-remove-me");
    }

    #[test]
    fn a_denied_status_without_http_attributes_is_403() {
        // google.rpc.Code PERMISSION_DENIED = 7.
        let out = interpret(response(7, None));
        assert!(matches!(out, Outcome::Denied { status, .. } if status == StatusCode::FORBIDDEN));
    }

    #[test]
    fn a_denied_response_gives_its_status_headers_and_body() {
        let out = interpret(response(7, Some(HttpResponse::DeniedResponse(denied(401)))));
        let Outcome::Denied {
            status,
            headers,
            body,
        } = out
        else {
            panic!("denied expected");
        };
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[0].1, "denied");
        assert_eq!(&body[..], b"denied by ext_authz");
    }

    #[test]
    fn an_error_response_is_an_error_carrying_the_answer() {
        let out = interpret(response(13, Some(HttpResponse::ErrorResponse(denied(503)))));
        let Outcome::ErrorAnswer {
            status,
            headers,
            body,
            ..
        } = &out
        else {
            panic!("an error with an answer expected: {out:?}");
        };
        assert_eq!(*status, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(headers.len(), 1);
        assert_eq!(&body[..], b"denied by ext_authz");
        assert!(out.error().is_some());
    }

    #[test]
    fn an_error_response_without_status_falls_back_to_status_on_error() {
        let out = interpret(response(13, Some(HttpResponse::ErrorResponse(denied(0)))));
        let result = |fail_open| crate::extauthz::CheckResult {
            provider: "p".into(),
            outcome: out.clone(),
            elapsed: std::time::Duration::ZERO,
            fail_open,
            status_on_error: StatusCode::BAD_GATEWAY,
        };
        assert_eq!(result(false).failure(), Some(Some(StatusCode::BAD_GATEWAY)));
        assert_eq!(result(true).failure(), Some(None));
        assert_eq!(result(false).label(), "error");
    }
}
