//! The name rules Kubernetes applies to what a workloads entry names: DNS labels
//! (namespaces), DNS subdomains (pod names, label key prefixes), label keys and values, and
//! Linux interface names. Each returns what is wrong, in words for the operator.

/// RFC 1123 label, as Kubernetes checks namespaces: at most 63 characters, lower-case
/// letters, digits and `-`, starting and ending with a letter or digit.
pub(super) fn dns_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lower-case letters, digits and '-' are allowed");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// RFC 1123 subdomain, as Kubernetes checks pod and service account names: at most 253
/// characters, dot-separated RFC 1123 labels.
pub(super) fn dns_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1 to 253 characters");
    }
    s.split('.').try_for_each(|part| {
        dns_label(part).map_err(|_| {
            "only lower-case letters, digits, '-' and '.' are allowed, each dot-separated part starting and ending with a letter or digit"
        })
    })
}

/// A label name or value body: at most 63 of `[A-Za-z0-9-_.]`, starting and ending with a
/// letter or digit.
fn label_name(s: &str) -> Result<(), &'static str> {
    if s.len() > 63 {
        return Err("at most 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !edge(s.bytes().next()) || !edge(s.bytes().last()) {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// Kubernetes label key: `[prefix/]name`, the prefix an RFC 1123 subdomain.
pub(super) fn label_key(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    match s.split_once('/') {
        Some((prefix, name)) => {
            dns_subdomain(prefix).map_err(|_| "the prefix before '/' must be a DNS subdomain")?;
            if name.is_empty() {
                return Err("the name after '/' must not be empty");
            }
            label_name(name)
        }
        None => label_name(s),
    }
}

/// Kubernetes label value: empty, or a label name.
pub(super) fn label_value(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        Ok(())
    } else {
        label_name(s)
    }
}

/// Linux interface name (the kernel's `dev_valid_name`): 1 to 15 bytes, not `.` or `..`,
/// no `/`, `:` or whitespace.
pub(super) fn interface_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 15 {
        return Err("must be 1 to 15 bytes");
    }
    if s == "." || s == ".." {
        return Err("'.' and '..' are not interface names");
    }
    if s.chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        return Err("'/', ':' and whitespace are not allowed");
    }
    Ok(())
}
