//! Request paths: normalization before matching. The patterns of `paths`/`notPaths` they are
//! matched against are part of the policy language ([`crate::policy::path_pattern`]).
//!
//! What is authorized is what the pod receives: the enforcer forwards the normalized path
//! produced here, never the raw one (see ARCHITECTURE.md, "Path normalization").

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
