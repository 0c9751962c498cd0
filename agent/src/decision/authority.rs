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

/// `uri-host [ ":" port ]` (RFC 9110 7.2, RFC 3986 3.2.2; empty allowed): a reg-name or IPv4
/// address (unreserved, sub-delims, `%` escapes) or an IP literal in brackets, then digits
/// after a colon. User info (`@`), paths, whitespace and control characters are refused.
fn valid(value: &[u8]) -> Result<String, AuthorityError> {
    let (host, port) = if value.first() == Some(&b'[') {
        let end = value
            .iter()
            .position(|b| *b == b']')
            .ok_or(AuthorityError::Invalid)?;
        let literal = &value[1..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|b| b.is_ascii_hexdigit() || b":.vV".contains(b))
        {
            return Err(AuthorityError::Invalid);
        }
        (&value[..=end], &value[end + 1..])
    } else {
        let colon = value.iter().position(|b| *b == b':').unwrap_or(value.len());
        let host = &value[..colon];
        let reg_name = |b: &u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(b);
        if !host.iter().all(reg_name) {
            return Err(AuthorityError::Invalid);
        }
        (host, &value[colon..])
    };
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    if !port_ok || (host.is_empty() && !port.is_empty()) {
        return Err(AuthorityError::Invalid);
    }
    // Only ASCII passed the checks above.
    String::from_utf8(value.to_vec()).map_err(|_| AuthorityError::Invalid)
}

/// Makes `headers` carry exactly `authority`: HTTP/1 one `Host` line (none for an HTTP/1.0
/// request without one); HTTP/2 no `host` field (the authority goes in `:authority`).
pub fn set(headers: &mut HeaderMap, h2: bool, authority: Option<&str>) {
    if !h2 {
        let mut hosts = headers.get_all(header::HOST).iter();
        if let (Some(only), None, Some(want)) = (hosts.next(), hosts.next(), authority) {
            if only.as_bytes() == want.as_bytes() {
                return; // already exactly what was judged (the common case)
            }
        }
    }
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
    #[test_case(None, &["a.test:"], Version::HTTP_11, false, Ok(Some("a.test:")) ; "RFC 3986 3.2.3: an empty port is allowed")]
    #[test_case(None, &["a.test:80x"], Version::HTTP_11, false, Err(AuthorityError::Invalid) ; "a port that is not digits")]
    #[test_case(None, &["a test"], Version::HTTP_11, false, Err(AuthorityError::Invalid) ; "whitespace")]
    #[test_case(None, &["[::1"], Version::HTTP_11, false, Err(AuthorityError::Invalid) ; "an unclosed IP literal")]
    #[test_case(None, &[":80"], Version::HTTP_11, false, Err(AuthorityError::Invalid) ; "a port without a host")]
    #[test_case(None, &["xn--bcher-kva.example:8080"], Version::HTTP_11, false, Ok(Some("xn--bcher-kva.example:8080")) ; "IDNA A-label with port")]
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
