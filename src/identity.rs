//! Who is who: roles and the principal behind a connection or request. A leaf module: it
//! imports nothing of ours, so every layer can name identities without importing each other.

/// The four roles of SPEC section 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Admin,
    Member,
    Agent,
    Butler,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "ADMIN",
            Role::Member => "MEMBER",
            Role::Agent => "AGENT",
            Role::Butler => "BUTLER",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "ADMIN" => Some(Role::Admin),
            "MEMBER" => Some(Role::Member),
            "AGENT" => Some(Role::Agent),
            "BUTLER" => Some(Role::Butler),
            _ => None,
        }
    }

    /// Humans log in with a password; machines hold an API token.
    pub fn is_human(self) -> bool {
        matches!(self, Role::Admin | Role::Member)
    }

    pub fn actor_type(self) -> &'static str {
        if self.is_human() {
            "HUMAN"
        } else {
            "SYSTEM"
        }
    }
}

/// Who is on the other end of a connection or request, as authentication found it.
#[derive(Clone, Debug)]
pub struct Principal {
    pub id: i64,
    pub username: String,
    pub role: Role,
    /// For machines: the hash of the token this session authenticated with.
    pub token_hash: Option<String>,
    /// For humans: when the session's JWT expires (seconds since the epoch).
    pub expires_at: Option<i64>,
    /// For humans: the account's session generation the JWT was issued under.
    pub session_gen: i64,
}

/// A raw agent token: a secret. Its `Debug` prints only its hint, so no log line or panic
/// message can leak it; the raw text is reached only through `expose`, in the one response
/// that shows it, and for hashing.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentToken(String);

impl AgentToken {
    /// Wraps a token someone presented or supplied (validity is the caller's check).
    pub fn new(raw: impl Into<String>) -> AgentToken {
        AgentToken(raw.into())
    }

    /// The raw token, for the response that creates or rotates it and for the database's
    /// development-only raw copy.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The lookup key stored for a token: lower-case hex SHA-256.
    pub fn sha256(&self) -> String {
        sha256_hex(&self.0)
    }

    /// `first4...last4`, or `configured` for tokens of 8 characters or fewer.
    pub fn hint(&self) -> String {
        let t = &self.0;
        if t.len() <= 8 || !t.is_ascii() {
            "configured".to_string()
        } else {
            format!("{}...{}", &t[..4], &t[t.len() - 4..])
        }
    }
}

impl std::fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentToken({})", self.hint())
    }
}

/// Lower-case hex SHA-256 of a text.
pub fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_never_shows_itself_in_debug() {
        let t = AgentToken::new("ec_0123456789abcdef");
        assert_eq!(format!("{t:?}"), "AgentToken(ec_0...cdef)");
        assert_eq!(AgentToken::new("abcdefgh").hint(), "configured");
        assert_eq!(AgentToken::new("mock-observer-token").hint(), "mock...oken");
        assert_eq!(t.sha256().len(), 64);
    }
}
