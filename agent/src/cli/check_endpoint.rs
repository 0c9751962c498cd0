//! `POST /check` on the admin server: `nodeward check`'s decision over the agent's live state
//! (its snapshot, JWKS store, token cache and path normalization). `nodeward run` adds it to
//! the admin server as an [`Endpoint`]; the admin server only routes to it.

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};

use super::check::{decide, CheckRequest, Inputs, Output, CONFIG_ERRORS_HEADER, DECISION_HEADER};
use crate::admin::{text, Admin, Body, Endpoint};

/// The `POST /check` endpoint.
#[must_use]
pub fn endpoint() -> Endpoint {
    Endpoint {
        path: "/check",
        about: "judge a described request against the live state (JSON body, as `nodeward check` flags)",
        handler: Box::new(check),
    }
}

/// `POST /check`: the answer `nodeward check` prints, judged against the live state. 200 with
/// the decision in [`DECISION_HEADER`]; 400 with `error: ...` for a request `check` would
/// refuse with exit status 2.
fn check(admin: &Admin, body: &[u8]) -> Response<Body> {
    let request: CheckRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CheckRequest::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("error: not a check request (a JSON object of check's fields): {e}\n"),
                )
            }
        }
    };
    let snapshot = admin.store.load();
    let inputs = Inputs::Live {
        snapshot: &snapshot,
        jwks: &admin.jwks,
        cache: &admin.cache,
        normalization: admin.normalization,
    };
    match decide(&request, &inputs) {
        Ok(checked) => {
            let mut response = text(StatusCode::OK, checked.output + "\n");
            let headers = response.headers_mut();
            if request.output == Output::Json {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            headers.insert(
                DECISION_HEADER,
                HeaderValue::from_static(if checked.allowed { "allow" } else { "deny" }),
            );
            headers.insert(
                CONFIG_ERRORS_HEADER,
                HeaderValue::from(snapshot.errors.len()),
            );
            response
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("error: {e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;
    use crate::admin::route;
    use crate::admin::tests::{admin, body, header};

    /// The examples' admin with `POST /check` added, as `nodeward run` adds it.
    fn admin_with_check() -> Admin {
        let mut admin = admin();
        admin.endpoints.push(endpoint());
        admin
    }

    #[test]
    fn check_uses_the_registry_for_addresses() {
        let admin = admin_with_check();
        let request = br#"{"dest_ip": "10.200.0.13", "source_ip": "10.200.0.20"}"#;
        let response = route(&admin, &Method::POST, "/check", request);
        assert_eq!(response.status(), StatusCode::OK, "{}", body(&response));
        assert_eq!(header(&response, DECISION_HEADER), "allow");
        assert_eq!(header(&response, CONFIG_ERRORS_HEADER), "0");
        let json: serde_json::Value = serde_json::from_str(&body(&response)).expect("JSON");
        assert_eq!(json["policy"], "foo/get-only");
        assert_eq!(json["source_principal"], "cluster.local/ns/foo/sa/sleep");

        let text = route(
            &admin,
            &Method::POST,
            "/check",
            br#"{"namespace": "foo", "labels": {"app": "httpbin-get"}, "method": "POST", "output": "text"}"#,
        );
        assert_eq!(header(&text, DECISION_HEADER), "deny");
        assert!(
            body(&text).starts_with("workload:  foo {app=httpbin-get}\n"),
            "{}",
            body(&text)
        );
    }

    #[test]
    fn bad_check_requests_are_400_with_the_reason() {
        let admin = admin_with_check();
        for (request, reason) in [
            (&b"{"[..], "not a check request"),
            (br#"{"namespaec": "foo"}"#, "unknown field `namespaec`"),
            (b"", "no destination workload"),
            (br#"{"dest_ip": "10.9.9.9"}"#, "no workload at this address"),
            (
                br#"{"namespace": "foo", "claims": [1]}"#,
                "--claims: not a JSON object",
            ),
            (
                br#"{"namespace": "foo", "headers": ["no colon"]}"#,
                "-H: header",
            ),
            (
                br#"{"namespace": "foo", "path_normalization": "weird"}"#,
                "--path-normalization",
            ),
        ] {
            let response = route(&admin, &Method::POST, "/check", request);
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
            let text = body(&response);
            assert!(
                text.starts_with("error: ") && text.contains(reason),
                "{reason}: {text}"
            );
        }
    }

    #[test]
    fn check_is_post_only() {
        let wrong = route(&admin_with_check(), &Method::GET, "/check", b"");
        assert_eq!(
            (wrong.status(), header(&wrong, "allow")),
            (StatusCode::METHOD_NOT_ALLOWED, "POST")
        );
    }
}
