//! Request paths: normalization before matching, and the patterns of `paths`/`notPaths`.
//!
//! What is authorized is what the pod receives: the enforcer forwards the normalized path
//! produced here, never the raw one (see ARCHITECTURE.md, "Path normalization").

use std::fmt;

/// Istio's `meshConfig.pathNormalization` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Normalization {
    /// No normalization; paths are matched as received.
    None,
    /// RFC 3986 normalization, Istio's default (Envoy's `normalize_path`): percent-encoded
    /// unreserved characters decoded, other percent-encoding hex made upper case, `\` turned
    /// into `/`, `.` and `..` segments (also `%2E`) resolved.
    #[default]
    Base,
    /// `Base`, then runs of `/` merged into one.
    MergeSlashes,
    /// `%2F` and `%5C` decoded to `/` and `\`, then `MergeSlashes`.
    DecodeAndMergeSlashes,
}

/// A path that cannot be normalized; the request is refused with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Origin-form targets start with `/`.
    #[error("path {0:?} does not start with '/'")]
    NotAbsolute(String),
    /// A `%` not followed by two hex digits.
    #[error("path {0:?} has a malformed percent-encoding")]
    BadEscape(String),
    /// `%00` is refused in every mode, as Envoy does.
    #[error("path {0:?} contains an encoded NUL (%00)")]
    Nul(String),
}

/// A request target split and normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    /// The path, normalized: what policies match and what the pod receives.
    pub path: String,
    /// The query string without `?`, unchanged (Istio matches paths without it).
    pub query: Option<String>,
}

impl NormalizedPath {
    /// The path and query as they go upstream.
    #[must_use]
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

/// Splits `target` (origin-form `path?query`, any `#fragment` dropped as Envoy does) and
/// normalizes the path.
pub fn normalize(target: &str, how: Normalization) -> Result<NormalizedPath, PathError> {
    let target = target.split_once('#').map_or(target, |(t, _)| t);
    let (raw, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute(raw.to_owned()));
    }
    if raw.contains("%00") {
        return Err(PathError::Nul(raw.to_owned()));
    }
    if how == Normalization::None {
        return Ok(NormalizedPath {
            path: raw.to_owned(),
            query,
        });
    }
    let decoded = decode_unreserved(raw, how == Normalization::DecodeAndMergeSlashes)
        .ok_or_else(|| PathError::BadEscape(raw.to_owned()))?
        .replace('\\', "/");
    let mut path = remove_dot_segments(&decoded);
    if matches!(
        how,
        Normalization::MergeSlashes | Normalization::DecodeAndMergeSlashes
    ) {
        path = merge_slashes(&path);
    }
    Ok(NormalizedPath { path, query })
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes `%XX` of unreserved characters (and of `/`, `\` when asked), upper-cases the hex
/// of the others. `None` on a malformed escape.
fn decode_unreserved(raw: &str, slashes: bool) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let value = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            if is_unreserved(value) || (slashes && matches!(value, b'/' | b'\\')) {
                out.push(value);
            } else {
                out.push(b'%');
                out.extend(hex.iter().map(u8::to_ascii_uppercase));
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// RFC 3986 section 5.2.4, on a path that starts with `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut output: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => trailing_slash = i == last,
            ".." => {
                output.pop();
                trailing_slash = i == last;
            }
            s => {
                output.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &output {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

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
    /// `{**}`: one or more segments (characters of path, `/` included); the last operator,
    /// literal segments may follow it.
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

/// Characters Envoy's URI templates accept in a path segment.
fn is_segment_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~%!$&'()+,;:@=".contains(c)
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
            if more.is_empty() {
                return !rest.is_empty() && rest.chars().all(|c| c == '/' || is_segment_char(c));
            }
            // `{**}` then literals: try each `/` after a non-empty run as the boundary.
            rest.char_indices()
                .filter(|&(i, c)| c == '/' && i > 0)
                .any(|(i, _)| {
                    rest[..i].chars().all(|c| c == '/' || is_segment_char(c))
                        && match_segments(more, &rest[i + 1..])
                })
        }
        Segment::One | Segment::Literal(_) => {
            let (piece, remainder) = match rest.split_once('/') {
                Some((piece, remainder)) => (piece, Some(remainder)),
                None => (rest, None),
            };
            let ok = match segment {
                Segment::Literal(l) => piece == l,
                _ => !piece.is_empty() && piece.chars().all(is_segment_char),
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
