//! The identity a validated JWT gives a request: made by authentication ([`super::rules`]),
//! remembered by the token cache ([`super::cache`]), read by authorization (`request.auth.*`
//! conditions, `requestPrincipals`).

use serde::Serialize;

/// The identity a validated JWT gives a request.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AuthInfo {
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
    pub presenter: Option<String>,
    /// Every claim, with space-delimited claims already split into lists.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// Claims Istio always splits on spaces (`spaceDelimitedClaims` adds to them).
pub const SPACE_DELIMITED_CLAIMS: [&str; 2] = ["scope", "permission"];

impl AuthInfo {
    /// The identity carried by a token's claims; `extra_split` names claims to split on spaces
    /// besides `scope` and `permission`.
    #[must_use]
    pub fn from_claims(
        mut claims: serde_json::Map<String, serde_json::Value>,
        extra_split: &[String],
    ) -> Self {
        let text = |v: Option<&serde_json::Value>| {
            v.and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        for name in SPACE_DELIMITED_CLAIMS
            .iter()
            .copied()
            .chain(extra_split.iter().map(String::as_str))
        {
            if let Some(serde_json::Value::String(s)) = claims.get(name) {
                let parts = s
                    .split(' ')
                    .filter(|p| !p.is_empty())
                    .map(|p| serde_json::Value::String(p.to_owned()))
                    .collect();
                claims.insert(name.to_owned(), serde_json::Value::Array(parts));
            }
        }
        let audiences = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => vec![a.clone()],
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Self {
            issuer: text(claims.get("iss")),
            subject: text(claims.get("sub")),
            audiences,
            presenter: claims
                .get("azp")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
            claims,
        }
    }

    /// `iss/sub`, Istio's request principal.
    #[must_use]
    pub fn principal(&self) -> String {
        format!("{}/{}", self.issuer, self.subject)
    }
}
