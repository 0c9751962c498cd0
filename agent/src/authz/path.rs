//! Request paths: normalization before matching. The patterns of `paths`/`notPaths` they are
//! matched against are part of the policy language ([`crate::policy::path_pattern`]).
//!
//! What is authorized is what the pod receives: the enforcer forwards the normalized path
//! produced here, never the raw one (see ARCHITECTURE.md, "Path normalization").
//!
//! The modes are Envoy's, byte for byte, as Istio's `meshConfig.pathNormalization` configures
//! them: `BASE` is Envoy's `normalize_path` (the URL path canonicalizer Envoy took from
//! Chromium), `MERGE_SLASHES` adds Envoy's `merge_slashes`, `DECODE_AND_MERGE_SLASHES` first
//! decodes escaped slashes as Envoy's `UNESCAPE_AND_FORWARD` does.

use std::borrow::Cow;

/// Istio's `meshConfig.pathNormalization` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Normalization {
    /// No normalization; paths are matched as received.
    None,
    /// RFC 3986 normalization, Istio's default (Envoy's `normalize_path`): escapes of
    /// unreserved characters (`A-Z a-z 0-9 - . _ ~`) decoded, every other escape kept exactly
    /// as written (`%2f` stays `%2f`), characters a path cannot hold escaped, `\` turned into
    /// `/`, `.` and `..` segments (also written `%2E`) resolved.
    #[default]
    Base,
    /// `Base`, then runs of `/` merged into one.
    MergeSlashes,
    /// `%2F`/`%2f` and `%5C`/`%5c` decoded to `/` and `\`, then `MergeSlashes`.
    DecodeAndMergeSlashes,
}

/// A path that cannot be normalized; the request is refused with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Origin-form targets start with `/`.
    #[error("path {0:?} does not start with '/'")]
    NotAbsolute(String),
    /// `%00` (or a NUL byte) is refused in every mode, as Envoy's normalization refuses it.
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
    if raw.contains("%00") || raw.contains('\0') {
        return Err(PathError::Nul(raw.to_owned()));
    }
    if how == Normalization::None {
        return Ok(NormalizedPath {
            path: raw.to_owned(),
            query,
        });
    }
    let input = if how == Normalization::DecodeAndMergeSlashes {
        unescape_slashes(raw)
    } else {
        Cow::Borrowed(raw)
    };
    let mut path = canonicalize(input.as_bytes()).ok_or_else(|| PathError::Nul(raw.to_owned()))?;
    if matches!(
        how,
        Normalization::MergeSlashes | Normalization::DecodeAndMergeSlashes
    ) {
        path = merge_slashes(path);
    }
    Ok(NormalizedPath { path, query })
}

/// Envoy's escaped-slash decoding (`UNESCAPE_AND_FORWARD`): `%2F`, `%2f`, `%5C`, `%5c` become
/// `/` and `\`; nothing else is decoded. (Envoy replaces the four spellings one after the other;
/// as each starts with the only `%` it holds, matches never overlap and one pass is the same.)
fn unescape_slashes(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut start = 0;
    let mut i = 0;
    while i + 2 < bytes.len() {
        let decoded = match (bytes[i], bytes[i + 1], bytes[i + 2]) {
            (b'%', b'2', b'F' | b'f') => Some('/'),
            (b'%', b'5', b'C' | b'c') => Some('\\'),
            _ => None,
        };
        if let Some(c) = decoded {
            out.push_str(&path[start..i]);
            out.push(c);
            i += 3;
            start = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&path[start..]);
    Cow::Owned(out)
}

/// What the canonicalizer does with a byte, written as is or as the value of an escape
/// (Chromium's path character table as Envoy carries it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Kept as is, and kept escaped when escaped.
    Pass,
    /// `.`: dot segments.
    Dot,
    /// Escaped when written raw (`%XX`, upper-case hex); kept as written when escaped. Also `%`
    /// (an escape) and `\` (a slash).
    Escape,
    /// Unreserved: decoded when escaped.
    Unescape,
    /// NUL: the path is refused.
    Invalid,
}

fn class(b: u8) -> Class {
    match b {
        0 => Class::Invalid,
        b'.' => Class::Dot,
        b'-' | b'_' | b'~' => Class::Unescape,
        b if b.is_ascii_alphanumeric() => Class::Unescape,
        0x01..=0x20
        | b'"'
        | b'#'
        | b'%'
        | b'<'
        | b'>'
        | b'?'
        | b'\\'
        | b'^'
        | b'`'
        | b'{'
        | b'|'
        | b'}'
        | 0x7f..=0xff => Class::Escape,
        _ => Class::Pass,
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The value of the escape `%XX` at `at`, if it is one.
fn escaped_at(s: &[u8], at: usize) -> Option<u8> {
    if s.get(at) != Some(&b'%') {
        return None;
    }
    let high = hex_value(*s.get(at + 1)?)?;
    let low = hex_value(*s.get(at + 2)?)?;
    Some(high << 4 | low)
}

/// The length of a dot at `at`: 1 for `.`, 3 for `%2E`/`%2e`, 0 for anything else.
fn dot_len(s: &[u8], at: usize) -> usize {
    match s.get(at..at + 3) {
        _ if s.get(at) == Some(&b'.') => 1,
        Some([b'%', b'2', b'E' | b'e']) => 3,
        _ => 0,
    }
}

fn is_slash(b: u8) -> bool {
    b == b'/' || b == b'\\'
}

/// What a dot that starts a segment is, and how many input bytes after it belong to it.
enum AfterDot {
    /// Part of a name (`.hidden`, `...`).
    Name,
    /// `.`: the current directory.
    Current(usize),
    /// `..`: one up.
    Up(usize),
}

fn classify_after_dot(s: &[u8], after: usize) -> AfterDot {
    if after == s.len() {
        return AfterDot::Current(0);
    }
    if is_slash(s[after]) {
        return AfterDot::Current(1);
    }
    let second = dot_len(s, after);
    if second > 0 {
        let end = after + second;
        if end == s.len() {
            return AfterDot::Up(second);
        }
        if is_slash(s[end]) {
            return AfterDot::Up(second + 1);
        }
    }
    AfterDot::Name
}

/// Removes the last segment of `out`, which ends with `/`, never going above the first `/`.
fn back_up(out: &mut Vec<u8>) {
    let Some(mut i) = out.len().checked_sub(1) else {
        return;
    };
    if i == 0 {
        return;
    }
    i -= 1;
    while out[i] != b'/' && i > 0 {
        i -= 1;
    }
    out.truncate(i + 1);
}

fn push_escaped(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
}

/// A decoded byte that lands within two bytes of an earlier `%` that began no escape could
/// complete a new escape (`%%30%30` must not become `%00` for whoever decodes next): that `%` is
/// then written `%25`. `next` is the next unread input byte, `percent` where that `%` is in `out`.
fn fix_nested_escape(s: &[u8], next: usize, percent: usize, out: &mut Vec<u8>) {
    let length = out.len();
    let last = out[length - 1];
    let append_next = percent + 2 == length;
    if append_next {
        match s.get(next) {
            Some(&b) if b < 0x80 => out.push(b),
            _ => return,
        }
    }
    if escaped_at(out, percent).is_some() {
        if !append_next {
            out.push(out[percent + 1]);
        }
        out[percent + 1] = b'2';
        out[percent + 2] = b'5';
        out.push(last);
    } else if append_next {
        out.truncate(length);
    }
}

/// Envoy's `normalize_path` of a path that starts with `/`; `None` when it holds `%00`.
fn canonicalize(s: &[u8]) -> Option<String> {
    let mut out: Vec<u8> = Vec::with_capacity(s.len() + 8);
    let mut valid = true;
    // Where in `out` the last `%` that began no escape is.
    let mut bad_percent: Option<usize> = None;
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        let dots = dot_len(s, i);
        if dots > 0 {
            if out.last() == Some(&b'/') {
                match classify_after_dot(s, i + dots) {
                    AfterDot::Name => out.push(b'.'),
                    AfterDot::Current(more) => i += more,
                    AfterDot::Up(more) => {
                        back_up(&mut out);
                        i += more;
                    }
                }
            } else {
                out.push(b'.');
            }
            i += dots;
            continue;
        }
        match (b, class(b)) {
            (b'\\', _) => out.push(b'/'),
            (b'%', _) => {
                if let Some(value) = escaped_at(s, i) {
                    match class(value) {
                        Class::Unescape => {
                            out.push(value);
                            if let Some(p) = bad_percent.filter(|p| p + 3 >= out.len()) {
                                fix_nested_escape(s, i + 3, p, &mut out);
                            }
                        }
                        other => {
                            // Kept as written: the case of its hex digits is the client's.
                            out.extend_from_slice(&s[i..i + 3]);
                            valid &= other != Class::Invalid;
                        }
                    }
                    i += 3;
                    continue;
                }
                bad_percent = Some(out.len());
                out.push(b'%');
            }
            (_, Class::Invalid) => {
                push_escaped(&mut out, b);
                valid = false;
            }
            (_, Class::Escape) => push_escaped(&mut out, b),
            _ => out.push(b),
        }
        i += 1;
    }
    // Every byte of `out` is ASCII (raw bytes above 0x7f are escaped, only unreserved ASCII is
    // decoded), so the conversion cannot fail; were it to, the lossy form is still a string.
    valid.then(|| {
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    })
}

/// Envoy's `merge_slashes`: the non-empty segments joined with one `/`, a leading and a
/// trailing `/` kept. (A path of only slashes therefore keeps two: `//` and `///` become `//`.)
fn merge_slashes(path: String) -> String {
    if !path.contains("//") {
        return path;
    }
    let mut out = String::with_capacity(path.len());
    if path.starts_with('/') {
        out.push('/');
    }
    for (n, segment) in path.split('/').filter(|s| !s.is_empty()).enumerate() {
        if n > 0 {
            out.push('/');
        }
        out.push_str(segment);
    }
    if path.ends_with('/') {
        out.push('/');
    }
    out
}
