//! The address guard of every fetch: link-local and cloud-metadata targets are refused, IP
//! literals before connecting ([`check_url`]), host names by a resolver that filters every DNS
//! answer ([`GuardedResolver`]), redirect targets by the redirect policy ([`redirect_policy`]).

#[cfg(test)]
use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
#[cfg(test)]
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;
use reqwest::Url;

use super::MAX_REDIRECTS;

/// Why an address or host is refused, when it is.
pub(super) fn forbidden_ip(ip: IpAddr) -> Option<&'static str> {
    const METADATA: &str = "a cloud metadata address";
    const LINK_LOCAL: &str = "a link-local address";
    let v4 = match ip.to_canonical() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => {
            if v6 == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254) {
                return Some(METADATA);
            }
            if v6.is_unicast_link_local() {
                return Some(LINK_LOCAL);
            }
            // NAT64 (RFC 6052 well-known prefix) reaches the embedded IPv4 address.
            let s = v6.segments();
            (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0])
                .then(|| Ipv4Addr::from(u32::from(s[6]) << 16 | u32::from(s[7])))
        }
    };
    let v4 = v4?;
    // AWS, GCP, Azure, OpenStack and others; Alibaba Cloud.
    if v4 == Ipv4Addr::new(169, 254, 169, 254) || v4 == Ipv4Addr::new(100, 100, 100, 200) {
        Some(METADATA)
    } else if v4.is_link_local() {
        Some(LINK_LOCAL)
    } else {
        None
    }
}

pub(super) fn forbidden_name(host: &str) -> Option<&'static str> {
    host.trim_end_matches('.')
        .eq_ignore_ascii_case("metadata.google.internal")
        .then_some("the cloud metadata host name")
}

/// A refused target; carried through reqwest's error chain from the resolver and the
/// redirect policy, and found again by [`Fetcher`].
#[derive(Debug)]
pub(super) struct Refused {
    pub(super) target: String,
    pub(super) reason: &'static str,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is {}", self.target, self.reason)
    }
}

impl StdError for Refused {}

/// Why a URL cannot be fetched before any connection is made.
pub(super) enum UrlProblem {
    Bad(String),
    Refused(Refused),
}

/// Scheme and host checks; IP literals are checked here because the connector does not ask
/// the resolver about them.
pub(super) fn check_url(url: &Url, allow_link_local: bool) -> Result<(), UrlProblem> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlProblem::Bad(format!(
            "scheme {:?} is not http or https",
            url.scheme()
        )));
    }
    let host = match url.host_str() {
        Some(host) if !host.is_empty() => host,
        _ => return Err(UrlProblem::Bad("no host".into())),
    };
    if allow_link_local {
        return Ok(());
    }
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let reason = match literal.parse::<IpAddr>() {
        Ok(ip) => forbidden_ip(ip),
        Err(_) => forbidden_name(host),
    };
    match reason {
        Some(reason) => Err(UrlProblem::Refused(Refused {
            target: host.to_owned(),
            reason,
        })),
        None => Ok(()),
    }
}

/// Keeps forbidden addresses out of DNS answers, on every connection.
pub(super) struct GuardedResolver {
    pub(super) allow_link_local: bool,
    pub(super) lookup: Lookup,
}

pub(super) enum Lookup {
    /// The system resolver (tokio's `lookup_host`).
    System,
    /// Fixed answers, for tests of the guard that must not touch the network.
    #[cfg(test)]
    Fixed(Arc<HashMap<String, Vec<IpAddr>>>),
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let allow = self.allow_link_local;
        let answers: Option<Vec<IpAddr>> = match &self.lookup {
            Lookup::System => None,
            #[cfg(test)]
            Lookup::Fixed(fixed) => Some(fixed.get(&host).cloned().unwrap_or_default()),
        };
        Box::pin(async move {
            if let Some(reason) = forbidden_name(&host).filter(|_| !allow) {
                return Err(Box::new(Refused {
                    target: host,
                    reason,
                }) as Box<dyn StdError + Send + Sync>);
            }
            let addrs: Vec<SocketAddr> = match answers {
                Some(ips) => ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect(),
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            let allowed = filter_addrs(&host, addrs, allow)?;
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The answers that may be connected to; an error naming a refused one when none is left.
pub(super) fn filter_addrs(
    host: &str,
    addrs: Vec<SocketAddr>,
    allow_link_local: bool,
) -> Result<Vec<SocketAddr>, Box<dyn StdError + Send + Sync>> {
    if allow_link_local {
        return Ok(addrs);
    }
    let mut refused = None;
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|addr| match forbidden_ip(addr.ip()) {
            Some(reason) => {
                refused.get_or_insert(Refused {
                    target: format!("{host} ({})", addr.ip()),
                    reason,
                });
                false
            }
            None => true,
        })
        .collect();
    match (allowed.is_empty(), refused) {
        (true, Some(refused)) => Err(Box::new(refused)),
        (true, None) => Err(format!("{host} has no addresses").into()),
        (false, _) => Ok(allowed),
    }
}

/// A redirect policy that re-checks every target and refuses https-to-http downgrades.
pub(super) fn redirect_policy(allow_link_local: bool) -> redirect::Policy {
    redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        if attempt
            .previous()
            .last()
            .is_some_and(|from| from.scheme() == "https")
            && attempt.url().scheme() != "https"
        {
            let message = format!("redirect from https to {} refused", attempt.url());
            return attempt.error(message);
        }
        match check_url(attempt.url(), allow_link_local) {
            Ok(()) => attempt.follow(),
            Err(UrlProblem::Bad(reason)) => {
                let message = format!("redirect to {}: {reason}", attempt.url());
                attempt.error(message)
            }
            Err(UrlProblem::Refused(refused)) => attempt.error(refused),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn link_local_and_metadata_addresses_are_refused() {
        for (address, reason) in [
            ("169.254.169.254", Some("a cloud metadata address")),
            ("100.100.100.200", Some("a cloud metadata address")),
            ("fd00:ec2::254", Some("a cloud metadata address")),
            ("::ffff:169.254.169.254", Some("a cloud metadata address")),
            ("64:ff9b::a9fe:a9fe", Some("a cloud metadata address")),
            ("169.254.0.1", Some("a link-local address")),
            ("169.254.255.255", Some("a link-local address")),
            ("fe80::1", Some("a link-local address")),
            ("febf::1", Some("a link-local address")),
            ("127.0.0.1", None),
            ("::1", None),
            ("10.0.0.1", None),
            ("169.253.255.255", None),
            ("169.255.0.0", None),
            ("fec0::1", None),
            ("2001:db8::1", None),
            ("100.100.100.201", None),
        ] {
            assert_eq!(forbidden_ip(ip(address)), reason, "{address}");
        }
    }

    #[test]
    fn urls_are_checked_before_connecting() {
        let check = |uri: &str, allow| check_url(&Url::parse(uri).expect("test URL"), allow);
        for refused in [
            "http://169.254.169.254/latest",
            "http://[fe80::1]:8080/",
            "http://[::ffff:a9fe:a9fe]/",
            "https://metadata.google.internal/computeMetadata/v1/",
            "http://METADATA.google.internal./",
            // The URL parser normalizes other IPv4 spellings.
            "http://2852039166/",
            "http://0xa9.0xfe.0xa9.0xfe/",
        ] {
            assert!(
                matches!(check(refused, false), Err(UrlProblem::Refused(_))),
                "{refused}"
            );
            assert!(
                check(refused, true).is_ok(),
                "allow_link_local permits {refused}"
            );
        }
        for allowed in [
            "http://127.0.0.1:1234/jwks",
            "https://[::1]/",
            "https://example.com/.well-known/jwks.json",
        ] {
            assert!(check(allowed, false).is_ok(), "{allowed}");
        }
        for bad in ["file:///etc/passwd", "ftp://example.com/jwks"] {
            assert!(
                matches!(check(bad, false), Err(UrlProblem::Bad(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn dns_answers_are_filtered() {
        let addrs = |list: &[&str]| {
            list.iter()
                .map(|a| SocketAddr::new(ip(a), 0))
                .collect::<Vec<_>>()
        };
        let kept = filter_addrs(
            "mixed.test",
            addrs(&["169.254.169.254", "127.0.0.1", "fe80::2"]),
            false,
        )
        .expect("one left");
        assert_eq!(kept, addrs(&["127.0.0.1"]));
        let error =
            filter_addrs("evil.test", addrs(&["169.254.169.254"]), false).expect_err("none left");
        assert_eq!(
            error.to_string(),
            "evil.test (169.254.169.254) is a cloud metadata address"
        );
        assert!(filter_addrs("empty.test", Vec::new(), false).is_err());
        assert_eq!(
            filter_addrs("evil.test", addrs(&["169.254.1.1"]), true)
                .expect("allowed")
                .len(),
            1
        );
    }
}
