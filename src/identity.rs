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
}
