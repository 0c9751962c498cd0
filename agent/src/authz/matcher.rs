//! Value sets compiled from policy lists: exact values are hashed so a list of 10,000
//! principals costs one lookup; only prefixes and suffixes are scanned.

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::policy::attribute::parse_ip_block;
use crate::policy::path_pattern::PathPattern;

/// A pattern whose every `*` matches any run of characters, the empty one included (Istio's
/// `namespaces` generator turns each `*` into `.*`: `ns.*.prod`).
#[derive(Debug, Clone)]
pub struct Glob {
    /// The literal pieces between the `*`s: at least two.
    pieces: Vec<Box<str>>,
}

impl Glob {
    /// `None` when `pattern` holds no `*`.
    #[must_use]
    pub fn new(pattern: &str) -> Option<Self> {
        pattern.contains('*').then(|| Self {
            pieces: pattern.split('*').map(Box::from).collect(),
        })
    }

    #[must_use]
    pub fn matches(&self, value: &str) -> bool {
        let Some((first, rest)) = self.pieces.split_first() else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return false;
        };
        let Some(mut tail) = value.strip_prefix(first.as_ref()) else {
            return false;
        };
        // Each middle piece at its leftmost place leaves the most room for the rest.
        for piece in middle {
            match tail.find(piece.as_ref()) {
                Some(at) => tail = &tail[at + piece.len()..],
                None => return false,
            }
        }
        tail.ends_with(last.as_ref())
    }
}

/// Istio's string forms: `*` (present), `abc*` (prefix), `*abc` (suffix), else exact; with
/// [`StringSet::with_globs`], also `*` anywhere ([`Glob`]).
#[derive(Debug, Clone, Default)]
pub struct StringSet {
    exact: HashSet<Box<str>>,
    prefixes: Vec<Box<str>>,
    suffixes: Vec<Box<str>>,
    globs: Vec<Glob>,
    any: bool,
    ignore_case: bool,
}

impl StringSet {
    /// `ignore_case` folds ASCII case (Istio matches `hosts` case-insensitively).
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>, ignore_case: bool) -> Self {
        Self::build(values, ignore_case, false)
    }

    /// Values whose `*` may stand anywhere, several times (`namespaces`, `source.namespace`).
    pub fn with_globs<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        Self::build(values, false, true)
    }

    fn build<'a>(
        values: impl IntoIterator<Item = &'a str>,
        ignore_case: bool,
        globs: bool,
    ) -> Self {
        let mut set = Self {
            ignore_case,
            ..Self::default()
        };
        for value in values {
            let value: Cow<'_, str> = if ignore_case {
                Cow::Owned(value.to_ascii_lowercase())
            } else {
                Cow::Borrowed(value)
            };
            if value == "*" {
                set.any = true;
            } else if let Some(glob) = Glob::new(&value).filter(|_| globs) {
                set.globs.push(glob);
            } else if let Some(suffix) = value.strip_prefix('*') {
                set.suffixes.push(suffix.into());
            } else if let Some(prefix) = value.strip_suffix('*') {
                set.prefixes.push(prefix.into());
            } else {
                set.exact.insert(value.into());
            }
        }
        set
    }

    /// `*` matches any non-empty value, as Istio's presence match does.
    #[must_use]
    pub fn matches(&self, value: &str) -> bool {
        if self.any && !value.is_empty() {
            return true;
        }
        let value: Cow<'_, str> =
            if self.ignore_case && value.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(value.to_ascii_lowercase())
            } else {
                Cow::Borrowed(value)
            };
        self.exact.contains(value.as_ref())
            || self.prefixes.iter().any(|p| value.starts_with(p.as_ref()))
            || self.suffixes.iter().any(|s| value.ends_with(s.as_ref()))
            || self.globs.iter().any(|g| g.matches(&value))
    }

    /// A header's value: Istio turns `*` into Envoy's `present_match`, which a header present
    /// with an empty value satisfies.
    #[must_use]
    pub fn matches_present(&self, value: &str) -> bool {
        self.any || self.matches(value)
    }
}

/// One `trustDomains` / `source.trustDomain` value, as Istio's generator matches it against the
/// source principal (`<td>/ns/<ns>/sa/<sa>` here, `spiffe://` left off).
#[derive(Debug, Clone)]
enum TrustDomain {
    /// `*`: any principal.
    Any,
    /// `td`: the principal starts with `td/`.
    Exact(Box<str>),
    /// `pre*` or `*suf`: the principal is `pre` + characters other than `/` + `suf` + `/...`.
    Wild { prefix: Box<str>, suffix: Box<str> },
}

impl TrustDomain {
    fn parse(value: &str) -> Self {
        match value.split_once('*') {
            None => Self::Exact(format!("{value}/").into()),
            Some(("", "")) => Self::Any,
            // Istio splits at the first `*` only; a second one is a literal character.
            Some((prefix, suffix)) => Self::Wild {
                prefix: prefix.into(),
                suffix: format!("{suffix}/").into(),
            },
        }
    }

    fn matches(&self, principal: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(with_slash) => principal.starts_with(with_slash.as_ref()),
            Self::Wild { prefix, suffix } => {
                let Some(rest) = principal.strip_prefix(prefix.as_ref()) else {
                    return false;
                };
                // The run the `*` stands for holds no `/`: try each end of it.
                let run = &rest[..rest.find('/').unwrap_or(rest.len())];
                run.char_indices()
                    .map(|(end, _)| end)
                    .chain(std::iter::once(run.len()))
                    .any(|end| rest[end..].starts_with(suffix.as_ref()))
            }
        }
    }
}

/// `trustDomains`/`notTrustDomains` and `source.trustDomain` values.
#[derive(Debug, Clone, Default)]
pub struct TrustDomainSet {
    domains: Vec<TrustDomain>,
}

impl TrustDomainSet {
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            domains: values.into_iter().map(TrustDomain::parse).collect(),
        }
    }

    /// Whether the source `principal` is in one of the trust domains.
    #[must_use]
    pub fn matches(&self, principal: &str) -> bool {
        self.domains.iter().any(|d| d.matches(principal))
    }
}

/// Addresses and CIDRs; single addresses are hashed.
#[derive(Debug, Clone, Default)]
pub struct IpSet {
    hosts: HashSet<IpAddr>,
    nets: Vec<IpNet>,
}

impl IpSet {
    /// Values must have passed validation; an unparsable one is left out (never matches).
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut set = Self::default();
        for net in values.into_iter().filter_map(parse_ip_block) {
            if net.prefix_len() == net.max_prefix_len() {
                set.hosts.insert(net.addr());
            } else {
                set.nets.push(net);
            }
        }
        set
    }

    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        self.hosts.contains(&ip) || self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// `paths`/`notPaths` entries.
#[derive(Debug, Clone, Default)]
pub struct PathSet {
    exact: HashSet<Box<str>>,
    patterns: Vec<PathPattern>,
}

impl PathSet {
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut set = Self::default();
        for pattern in values
            .into_iter()
            .filter_map(|v| PathPattern::parse(v).ok())
        {
            match pattern {
                PathPattern::Exact(e) => {
                    set.exact.insert(e.into());
                }
                other => set.patterns.push(other),
            }
        }
        set
    }

    #[must_use]
    pub fn matches(&self, path: &str) -> bool {
        self.exact.contains(path) || self.patterns.iter().any(|p| p.matches(path))
    }
}

/// One half (issuer or subject) of a request-principal pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// Present and non-empty.
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
}

impl Part {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Any => !value.is_empty(),
            Self::Exact(e) => value == e.as_ref(),
            Self::Prefix(p) => value.starts_with(p.as_ref()),
            Self::Suffix(s) => value.ends_with(s.as_ref()),
        }
    }
}

/// `requestPrincipals` and `request.auth.principal` values, matched the way Istio does:
/// each value is split at its last `/` into an issuer and a subject part, matched against the
/// token's `iss` and `sub` separately (`*` needs both present).
#[derive(Debug, Clone, Default)]
pub struct RequestPrincipalSet {
    /// Exact `iss/sub` pairs: issuer -> subjects.
    exact: std::collections::HashMap<Box<str>, HashSet<Box<str>>>,
    patterns: Vec<(Part, Part)>,
}

impl RequestPrincipalSet {
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut set = Self::default();
        for value in values {
            let (iss, sub) = if value == "*" {
                (Part::Any, Part::Any)
            } else if let Some((iss, sub)) = value.rsplit_once('/') {
                let iss = match iss {
                    "*" => Part::Any,
                    i => i
                        .strip_prefix('*')
                        .map_or_else(|| Part::Exact(i.into()), |s| Part::Suffix(s.into())),
                };
                let sub = match sub {
                    "*" => Part::Any,
                    s => s
                        .strip_suffix('*')
                        .map_or_else(|| Part::Exact(s.into()), |p| Part::Prefix(p.into())),
                };
                (iss, sub)
            } else if let Some(suffix) = value.strip_prefix('*') {
                (Part::Any, Part::Suffix(suffix.into()))
            } else if let Some(prefix) = value.strip_suffix('*') {
                (Part::Prefix(prefix.into()), Part::Any)
            } else {
                // Istio: issuer exact and an empty subject, which no validated token has.
                (Part::Exact(value.into()), Part::Exact("".into()))
            };
            match (iss, sub) {
                (Part::Exact(i), Part::Exact(s)) => {
                    set.exact.entry(i).or_default().insert(s);
                }
                pair => set.patterns.push(pair),
            }
        }
        set
    }

    #[must_use]
    pub fn matches(&self, issuer: &str, subject: &str) -> bool {
        self.exact
            .get(issuer)
            .is_some_and(|subs| subs.contains(subject))
            || self
                .patterns
                .iter()
                .any(|(i, s)| i.matches(issuer) && s.matches(subject))
    }
}
