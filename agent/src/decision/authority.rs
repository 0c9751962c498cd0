//! The authority of an HTTP request: what host rules judge, and exactly what the pod receives.
//!
//! - HTTP/1.1 (RFC 9112 3.2): more than one `Host` field line, a missing `Host`, or an invalid
//!   one is answered 400. An absolute-form target's authority wins over `Host` (RFC 9112
//!   3.2.2), as in Envoy.
//! - HTTP/1.0: `Host` is optional; without it the authority is empty (`None`).
//! - HTTP/2: `:authority`; a `host` field beside it is discarded, as Envoy does; without
//!   `:authority`, a single `host` field stands in for it (RFC 9113 8.3.1); neither is 400.

use http::{header, HeaderMap, HeaderValue, Version};

/// Why a request's authority is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// RFC 9112 3.2: a request with more than one `Host` field line.
    #[error("more than one Host header")]
    Several,
    /// RFC 9112 3.2: an HTTP/1.1 request without `Host`.
    #[error("no Host header (required in HTTP/1.1)")]
    MissingHttp11,
    /// An HTTP/2 request with neither `:authority` nor `host`.
    #[error("no :authority or Host")]
    MissingHttp2,
    /// Not `uri-host [ ":" port ]`: user info, a path, whitespace, control characters.
    #[error("invalid Host")]
    Invalid,
}

/// The authority of a request with these parts: `uri_authority` is the target's (absolute form,
/// or h2 `:authority`).
pub fn of(
    uri_authority: Option<&str>,
    headers: &HeaderMap,
    version: Version,
    h2: bool,
) -> Result<Option<String>, AuthorityError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if let Some(authority) = uri_authority {
        return valid(authority.as_bytes()).map(Some);
    }
    if second.is_some() {
        return Err(AuthorityError::Several);
    }
    match first {
        Some(host) => valid(host.as_bytes()).map(Some),
        None if h2 => Err(AuthorityError::MissingHttp2),
        None if version == Version::HTTP_10 => Ok(None),
        None => Err(AuthorityError::MissingHttp11),
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 7.2; empty allowed).
fn valid(value: &[u8]) -> Result<String, AuthorityError> {
    if value.is_empty() {
        return Ok(String::new());
    }
    let text = std::str::from_utf8(value).map_err(|_| AuthorityError::Invalid)?;
    let parsed: http::uri::Authority = text.parse().map_err(|_| AuthorityError::Invalid)?;
    if text.contains('@') || parsed.as_str() != text {
        return Err(AuthorityError::Invalid);
    }
    Ok(text.to_owned())
}

/// Makes `headers` carry exactly `authority`: HTTP/1 one `Host` line (none for an HTTP/1.0
/// request without one); HTTP/2 no `host` field (the authority goes in `:authority`).
pub fn set(headers: &mut HeaderMap, h2: bool, authority: Option<&str>) {
    headers.remove(header::HOST);
    if h2 {
        return;
    }
    if let Some(value) = authority.and_then(|a| HeaderValue::from_str(a).ok()) {
        headers.insert(header::HOST, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn headers(hosts: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for host in hosts {
            h.append(header::HOST, HeaderValue::from_str(host).expect("value"));
        }
        h
    }

    #[test_case(None, &["a.test"], Version::HTTP_11, false, Ok(Some("a.test")) ; "Host")]
    #[test_case(Some("a.test"), &["b.test"], Version::HTTP_11, false, Ok(Some("a.test")) ; "RFC 9112 3.2.2: absolute form wins over Host")]
    #[test_case(None, &["a.test", "b.test"], Version::HTTP_11, false, Err(AuthorityError::Several) ; "RFC 9112 3.2: two Host lines")]
    #[test_case(None, &[], Version::HTTP_11, false, Err(AuthorityError::MissingHttp11) ; "RFC 9112 3.2: HTTP/1.1 without Host")]
    #[test_case(None, &[], Version::HTTP_10, false, Ok(None) ; "HTTP/1.0 without Host")]
    #[test_case(None, &["user@a.test"], Version::HTTP_11, false, Err(AuthorityError::Invalid) ; "user info")]
    #[test_case(None, &["a.test/x"], Version::HTTP_11, false, Err(AuthorityError::Invalid) ; "a path")]
    #[test_case(None, &["[::1]:8080"], Version::HTTP_11, false, Ok(Some("[::1]:8080")) ; "IPv6 literal with port")]
    #[test_case(None, &[""], Version::HTTP_11, false, Ok(Some("")) ; "RFC 9112 3.2: empty Host for an empty authority")]
    #[test_case(Some("a.test"), &["b.test"], Version::HTTP_2, true, Ok(Some("a.test")) ; "h2: :authority wins, host discarded (Envoy)")]
    #[test_case(None, &["b.test"], Version::HTTP_2, true, Ok(Some("b.test")) ; "RFC 9113 8.3.1: host stands in for :authority")]
    #[test_case(None, &[], Version::HTTP_2, true, Err(AuthorityError::MissingHttp2) ; "h2 with neither")]
    fn authorities(
        uri: Option<&str>,
        hosts: &[&str],
        version: Version,
        h2: bool,
        want: Result<Option<&str>, AuthorityError>,
    ) {
        assert_eq!(
            of(uri, &headers(hosts), version, h2),
            want.map(|a| a.map(str::to_owned))
        );
    }
}
