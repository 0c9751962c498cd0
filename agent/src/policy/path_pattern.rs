//! The patterns of `paths`/`notPaths`: Istio's exact, prefix (`/foo*`), suffix (`*.html`) and
//! `*` forms and Envoy's URI templates (`{*}`, `{**}`), parsed once when a policy is validated
//! and compiled, and matched against normalized request paths ([`crate::authz::path`]).

use std::fmt;

/// One entry of `paths`/`notPaths`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// `*`: any path.
    Any,
    /// `/foo*`.
    Prefix(String),
    /// `*.html`.
    Suffix(String),
    /// `/foo`.
    Exact(String),
    /// A path template with `{*}`/`{**}` (Envoy's URI template matcher).
    Template(Vec<Segment>),
}

/// One `/`-separated piece of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{*}`: exactly one non-empty segment.
    One,
    /// `{**}`: any run of path characters, `/` included, possibly empty (Envoy's text glob
    /// `[a-zA-Z0-9-._~%!$&'()+,;:@/]*`: `/store/{**}/cart` matches `/store//cart`); the last
    /// operator, literal segments may follow it.
    Rest,
}

/// Why a path template is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// Templates are absolute paths.
    #[error("a path template must start with '/'")]
    NotAbsolute,
    /// Istio: "{**} is not the last operator".
    #[error("{{**}} is not the last operator: no {{*}} or {{**}} may follow it")]
    RestNotLast,
    /// Only `{*}` and `{**}`, each a whole segment, are operators.
    #[error("only {{*}} and {{**}} are allowed, each as a whole path segment")]
    BadOperator,
    /// A template and a `*` wildcard cannot be combined.
    #[error("'*' wildcards cannot be mixed with {{*}} or {{**}} templates")]
    MixedWildcard,
    /// A literal segment that is empty or holds a character a path segment cannot hold.
    #[error(
        "a literal segment is empty or holds a character outside [a-zA-Z0-9-._~%!$&'()+,;:@=]"
    )]
    BadLiteral,
}

/// Characters Istio accepts in a literal segment of a path template.
fn is_segment_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~%!$&'()+,;:@=".contains(c)
}

/// Characters Envoy's `{*}` and `{**}` match (its path glob `[a-zA-Z0-9-._~%!$&'()+,;:@]+`):
/// the literal characters but `=`.
fn is_glob_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~%!$&'()+,;:@".contains(c)
}

impl PathPattern {
    /// Reads a `paths` entry: a template when it holds `{`, else Istio's
    /// exact/prefix/suffix/presence string forms.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        if !text.contains(['{', '}']) {
            return Ok(if text == "*" {
                Self::Any
            } else if let Some(suffix) = text.strip_prefix('*') {
                Self::Suffix(suffix.to_owned())
            } else if let Some(prefix) = text.strip_suffix('*') {
                Self::Prefix(prefix.to_owned())
            } else {
                Self::Exact(text.to_owned())
            });
        }
        let rest = text.strip_prefix('/').ok_or(TemplateError::NotAbsolute)?;
        let pieces: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(pieces.len());
        let mut seen_rest = false;
        for (i, piece) in pieces.iter().enumerate() {
            let segment = match *piece {
                "{*}" | "{**}" if seen_rest => return Err(TemplateError::RestNotLast),
                "{*}" => Segment::One,
                "{**}" => {
                    seen_rest = true;
                    Segment::Rest
                }
                p if p.contains(['{', '}']) => return Err(TemplateError::BadOperator),
                // A trailing slash is a last, empty literal; `//` inside is refused.
                "" if i + 1 == pieces.len() => Segment::Literal(String::new()),
                p if !p.is_empty() && p.chars().all(is_segment_char) => {
                    Segment::Literal(p.to_owned())
                }
                p if p.contains('*') => return Err(TemplateError::MixedWildcard),
                _ => return Err(TemplateError::BadLiteral),
            };
            segments.push(segment);
        }
        Ok(Self::Template(segments))
    }

    /// Matches a normalized path (no query).
    #[must_use]
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Any => !path.is_empty(),
            Self::Prefix(p) => path.starts_with(p.as_str()),
            Self::Suffix(s) => path.ends_with(s.as_str()),
            Self::Exact(e) => path == e,
            Self::Template(segments) => match_template(segments, path),
        }
    }
}

fn match_template(segments: &[Segment], path: &str) -> bool {
    path.strip_prefix('/')
        .is_some_and(|rest| match_segments(segments, rest))
}

/// `rest` is the path after a `/`; `segments` what remains of the template.
fn match_segments(segments: &[Segment], rest: &str) -> bool {
    let Some((segment, more)) = segments.split_first() else {
        return false;
    };
    match segment {
        Segment::Rest => {
            let glob = |run: &str| run.chars().all(|c| c == '/' || is_glob_char(c));
            if more.is_empty() {
                return glob(rest);
            }
            // `{**}` then more: each `/` is a candidate end of the (possibly empty) run.
            rest.char_indices()
                .filter(|&(_, c)| c == '/')
                .any(|(i, _)| glob(&rest[..i]) && match_segments(more, &rest[i + 1..]))
        }
        Segment::One | Segment::Literal(_) => {
            let (piece, remainder) = match rest.split_once('/') {
                Some((piece, remainder)) => (piece, Some(remainder)),
                None => (rest, None),
            };
            let ok = match segment {
                Segment::Literal(l) => piece == l,
                _ => !piece.is_empty() && piece.chars().all(is_glob_char),
            };
            ok && match (remainder, more.is_empty()) {
                (None, true) => true,
                (Some(_), true) | (None, false) => false,
                (Some(r), false) => match_segments(more, r),
            }
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Prefix(p) => write!(f, "{p}*"),
            Self::Suffix(s) => write!(f, "*{s}"),
            Self::Exact(e) => f.write_str(e),
            Self::Template(segments) => {
                for s in segments {
                    match s {
                        Segment::Literal(l) => write!(f, "/{l}")?,
                        Segment::One => f.write_str("/{*}")?,
                        Segment::Rest => f.write_str("/{**}")?,
                    }
                }
                Ok(())
            }
        }
    }
}
