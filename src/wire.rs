//! Wire types: the only place JSON field names are spelled, for WebSocket frames and REST
//! bodies alike.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// Server-originated frames (ACK, ERROR, PRESENCE, BUTLER_AGENT_MESSAGE) speak as this sender.
pub const SERVER_ID: i64 = 0;
pub const SERVER_NAME: &str = "echocenter";
pub const SERVER_ROLE: &str = "SERVER";

/// Every frame type, in one list (SPEC section 4). The server sends the last four itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    SystemLog,
    Chat,
    ChatStream,
    ChatStreamEnd,
    AuthRequest,
    AuthResponse,
    AuthStatusUpdate,
    Ack,
    Error,
    Presence,
    ButlerAgentMessage,
    /// Ours: an agent or the Butler says it is BUSY or IDLE (README "Presence").
    AgentStatus,
    /// A type SPEC does not define (1–32 of `A–Z 0–9 _`), routed like CHAT_STREAM; the
    /// envelope carries its name.
    Custom,
}

impl Kind {
    pub const ALL: [Kind; 13] = [
        Kind::SystemLog,
        Kind::Chat,
        Kind::ChatStream,
        Kind::ChatStreamEnd,
        Kind::AuthRequest,
        Kind::AuthResponse,
        Kind::AuthStatusUpdate,
        Kind::Ack,
        Kind::Error,
        Kind::Presence,
        Kind::ButlerAgentMessage,
        Kind::AgentStatus,
        Kind::Custom,
    ];

    /// The kinds stored in `chat_messages`, which store-and-forward replays.
    pub const REPLAYED: [Kind; 3] = [Kind::Chat, Kind::AuthRequest, Kind::AuthResponse];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SystemLog => "SYSTEM_LOG",
            Kind::Chat => "CHAT",
            Kind::ChatStream => "CHAT_STREAM",
            Kind::ChatStreamEnd => "CHAT_STREAM_END",
            Kind::AuthRequest => "AUTH_REQUEST",
            Kind::AuthResponse => "AUTH_RESPONSE",
            Kind::AuthStatusUpdate => "AUTH_STATUS_UPDATE",
            Kind::Ack => "ACK",
            Kind::Error => "ERROR",
            Kind::Presence => "PRESENCE",
            Kind::ButlerAgentMessage => "BUTLER_AGENT_MESSAGE",
            Kind::AgentStatus => "AGENT_STATUS",
            // Only a label for counters: a custom frame goes out under its own name.
            Kind::Custom => "custom",
        }
    }

    /// A type SPEC (or we) define; `Custom` is never parsed, see `is_custom_name`.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| *k != Kind::Custom && k.as_str() == s)
    }

    /// 1–32 characters of `A–Z 0–9 _`: the names a custom type may have.
    pub fn is_custom_name(s: &str) -> bool {
        (1..=32).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    }

    /// Only the server sends these; a client's copy is `forbidden`.
    pub fn server_only(self) -> bool {
        matches!(
            self,
            Kind::Ack | Kind::Error | Kind::Presence | Kind::ButlerAgentMessage
        )
    }

    /// Stored before they are routed.
    pub fn stored(self) -> bool {
        matches!(
            self,
            Kind::SystemLog | Kind::Chat | Kind::AuthRequest | Kind::AuthResponse
        )
    }

    /// Position in `ALL`, for per-kind counters.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The `code` of every ERROR frame, in one list (SPEC section 4, plus `undelivered`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    BadJson,
    BadEnvelope,
    UnknownType,
    Forbidden,
    TargetRequired,
    TargetNotFound,
    RateLimited,
    Internal,
    /// Frames addressed to a machine that store-and-forward retired unsent (see README).
    Undelivered,
}

impl Code {
    pub const ALL: [Code; 9] = [
        Code::BadJson,
        Code::BadEnvelope,
        Code::UnknownType,
        Code::Forbidden,
        Code::TargetRequired,
        Code::TargetNotFound,
        Code::RateLimited,
        Code::Internal,
        Code::Undelivered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadJson => "bad_json",
            Code::BadEnvelope => "bad_envelope",
            Code::UnknownType => "unknown_type",
            Code::Forbidden => "forbidden",
            Code::TargetRequired => "target_required",
            Code::TargetNotFound => "target_not_found",
            Code::RateLimited => "rate_limited",
            Code::Internal => "internal",
            Code::Undelivered => "undelivered",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Every way the server closes a WebSocket, with its code and reason, in one list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    Normal,
    /// The peer's own close code, echoed (RFC 6455 section 5.5.1).
    Echo(u16),
    ServerShutdown,
    ProtocolError,
    InvalidUtf8,
    TokenRevoked,
    TokenExpired,
    AgentRemoved,
    UserRemoved,
    UserDisabled,
    /// The account's password or role changed: sessions from before must log in again.
    SessionRevoked,
    DataReset,
    TooManyErrors,
    RateLimited,
    MessageTooBig,
    PingTimeout,
    SlowConsumer,
    /// The peer vanished: nothing can be sent (1006 is never on the wire).
    Gone,
}

impl Close {
    pub fn code(self) -> u16 {
        match self {
            Close::Normal => 1000,
            Close::Echo(code) => code,
            Close::ServerShutdown => 1001,
            Close::ProtocolError => 1002,
            Close::Gone => 1006,
            Close::InvalidUtf8 => 1007,
            Close::TokenRevoked
            | Close::TokenExpired
            | Close::AgentRemoved
            | Close::UserRemoved
            | Close::UserDisabled
            | Close::SessionRevoked
            | Close::DataReset
            | Close::TooManyErrors
            | Close::RateLimited => 1008,
            Close::MessageTooBig => 1009,
            Close::PingTimeout => 1011,
            Close::SlowConsumer => 1013,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Close::Normal | Close::Echo(_) | Close::Gone => "",
            Close::ServerShutdown => "server shutdown",
            Close::ProtocolError => "protocol error",
            Close::InvalidUtf8 => "invalid utf-8",
            Close::TokenRevoked => "token revoked",
            Close::TokenExpired => "token expired",
            Close::AgentRemoved => "agent removed",
            Close::UserRemoved => "user removed",
            Close::UserDisabled => "user disabled",
            Close::SessionRevoked => "session revoked",
            Close::DataReset => "data reset",
            Close::TooManyErrors => "too many errors",
            Close::RateLimited => "rate limited",
            Close::MessageTooBig => "message too big",
            Close::PingTimeout => "ping timeout",
            Close::SlowConsumer => "slow consumer",
        }
    }

    /// Whether what is already queued is written before the close frame. Not when the peer
    /// does not read (slow consumer) or does not answer (ping timeout).
    pub fn flushes_queue(self) -> bool {
        !matches!(self, Close::SlowConsumer | Close::PingTimeout)
    }
}

/// Deepest nesting of arrays and objects a frame's payload may have. Deeper payloads are
/// refused: they are of no use to anyone, and relayed they crash clients whose JSON parsers
/// recurse (Python's `json.loads` raises `RecursionError` near 1,000 levels).
pub const MAX_PAYLOAD_DEPTH: usize = 64;

/// Whether `bytes` (JSON text) starts with an object, ignoring leading white space. Serde's
/// derived structs would also accept an array, as their fields in order.
pub fn is_json_object(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{')
}

/// The deepest nesting of arrays and objects in JSON text (0 for a scalar). Brackets inside
/// strings do not count. Linear, no recursion: safe on hostile input of any depth.
pub fn nesting_depth(json: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in json.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// How many bytes `s` takes as a JSON string's contents (escapes included, quotes not),
/// exactly as serde_json writes it.
pub fn json_escaped_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// An inbound frame as the client sent it, before validation. Fields the server sets
/// (`id`, `sender_*`, `timestamp`) are not read at all, so client values are ignored.
#[derive(Deserialize)]
pub struct RawEnvelope<'a> {
    #[serde(rename = "type", default)]
    pub kind: Option<Value>,
    #[serde(default)]
    pub target_id: Option<Value>,
    #[serde(default, borrow)]
    pub payload: Option<&'a RawValue>,
    #[serde(default)]
    pub local_id: Option<Value>,
    #[serde(default)]
    pub stream_id: Option<Value>,
    #[serde(default)]
    pub conversation_id: Option<Value>,
}

/// A frame the server sends. Absent fields are omitted.
#[derive(Serialize)]
pub struct Frame<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub sender_id: i64,
    pub sender_name: &'a str,
    pub sender_role: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<i64>,
    pub timestamp: &'a str,
}

impl<'a> Frame<'a> {
    /// A frame spoken by the server itself.
    pub fn server(kind: Kind, payload: Option<&'a RawValue>, timestamp: &'a str) -> Frame<'a> {
        Frame {
            id: None,
            kind: kind.as_str(),
            sender_id: SERVER_ID,
            sender_name: SERVER_NAME,
            sender_role: SERVER_ROLE,
            target_id: None,
            payload,
            local_id: None,
            stream_id: None,
            conversation_id: None,
            timestamp,
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing plain structs of strings and numbers cannot fail.
        serde_json::to_string(self).expect("frame serializes")
    }
}

#[derive(Serialize)]
pub struct ErrorPayload<'a> {
    pub code: &'a str,
    pub message: &'a str,
}

/// The payload of an ERROR `undelivered`: frames that store and forward retired unsent.
#[derive(Serialize)]
pub struct UndeliveredPayload<'a> {
    pub code: &'a str,
    pub message: &'a str,
    pub receiver_id: i64,
    pub count: usize,
    /// The retired frames' ids, newest first (at most 100).
    pub ids: &'a [i64],
}

#[derive(Serialize)]
pub struct LogPayload<'a> {
    pub id: i64,
    pub agent_id: &'a str,
    pub level: &'a str,
    pub content: &'a str,
    pub timestamp: &'a str,
}

#[derive(Serialize)]
pub struct PresencePayload<'a> {
    pub user_id: i64,
    pub username: &'a str,
    pub role: &'a str,
    pub online: bool,
    pub last_seen_at: Option<&'a str>,
    /// ONLINE, BUSY or OFFLINE; `activity` BUSY or IDLE (AGENT_STATUS).
    pub status: &'a str,
    pub activity: &'a str,
}

/// The payload of an AUTH_STATUS_UPDATE the server sends (an approval expired).
#[derive(Serialize)]
pub struct ApprovalStatus<'a> {
    pub action_id: &'a str,
    pub status: &'a str,
}

#[derive(Serialize)]
pub struct ButlerAgentPayload<'a> {
    pub agent_id: i64,
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub sender_id: i64,
    pub sender_name: &'a str,
    pub sender_role: &'a str,
    pub payload: Option<&'a RawValue>,
    pub timestamp: &'a str,
}

// ----- REST --------------------------------------------------------------------------------

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub error: &'a str,
}

/// A user as every REST response shows it. Agents and the Butler add `machine`.
#[derive(Serialize)]
pub struct UserView {
    pub id: i64,
    pub username: String,
    pub role: &'static str,
    pub actor_type: &'static str,
    pub agent_kind: String,
    pub runtime_kind: String,
    pub description: String,
    pub created_at: String,
    /// Humans only: whether the account is disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// `GET /api/users/me` of a human only: the shortest password this server accepts, so a
    /// form can check what the server will.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_min_length: Option<usize>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineView>,
    /// Present only in the response that creates or rotates the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token: Option<String>,
}

#[derive(Serialize)]
pub struct MachineView {
    pub token_hint: Option<String>,
    pub token_updated_at: Option<String>,
    /// ONLINE, BUSY (online, and said so with AGENT_STATUS) or OFFLINE.
    pub status: &'static str,
    /// BUSY or IDLE, as the agent last said (IDLE when it said nothing, or is offline).
    pub activity: &'static str,
    pub online: bool,
    pub last_seen_at: Option<String>,
    pub last_report: String,
}

#[derive(Serialize)]
pub struct AgentStatus {
    pub id: i64,
    pub username: String,
    pub role: &'static str,
    pub status: &'static str,
    /// BUSY or IDLE, as the agent last said (AGENT_STATUS).
    pub activity: &'static str,
    pub online: bool,
    pub last_seen_at: Option<String>,
    pub last_report: String,
}

#[derive(Serialize)]
pub struct LoginResponse {
    pub token: String,
    pub user: UserView,
}

#[derive(Serialize)]
pub struct LogView<'a> {
    pub id: i64,
    pub agent_id: &'a str,
    pub level: &'a str,
    pub content: &'a str,
    pub timestamp: &'a str,
}

#[derive(Serialize)]
pub struct ChatView<'a> {
    pub id: i64,
    pub local_id: Option<&'a str>,
    pub sender_id: i64,
    pub receiver_id: i64,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub payload: &'a RawValue,
    pub stream_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<i64>,
    pub timestamp: &'a str,
    /// `delivered`, `pending` (addressed to a machine that has not received it yet) or
    /// `retired` (store and forward gave up on it; see README).
    pub delivery: &'a str,
}

/// A conversation thread as REST shows it (README "Threads"; the original's field names).
#[derive(Serialize)]
pub struct ThreadView {
    pub id: i64,
    pub owner_user_id: i64,
    pub peer_user_id: i64,
    pub channel_kind: String,
    pub title: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    pub is_pinned: bool,
    pub is_default: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archived_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_message_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Deserialize)]
pub struct CreateThreadRequest {
    #[serde(default)]
    pub peer_id: Option<i64>,
    #[serde(default)]
    pub channel_kind: Option<String>,
    #[serde(default)]
    pub title: Option<String>,
}

#[derive(Deserialize)]
pub struct UpdateThreadRequest {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub summary: Option<String>,
    #[serde(default)]
    pub is_pinned: Option<bool>,
    #[serde(default)]
    pub is_archived: Option<bool>,
}

#[derive(Deserialize)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

#[derive(Deserialize)]
pub struct CreateUserRequest {
    pub username: String,
    pub password: String,
    pub role: String,
}

#[derive(Deserialize)]
pub struct UpdateUserRequest {
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub disabled: Option<bool>,
    #[serde(default)]
    pub password: Option<String>,
}

#[derive(Deserialize)]
pub struct ChangePasswordRequest {
    pub current_password: String,
    pub new_password: String,
}

#[derive(Deserialize)]
pub struct RegisterAgentRequest {
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub api_token: Option<String>,
    #[serde(default)]
    pub agent_kind: Option<String>,
    #[serde(default)]
    pub runtime_kind: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Deserialize)]
pub struct TokenRequest {
    #[serde(default)]
    pub api_token: Option<String>,
}

#[derive(Serialize)]
pub struct TestConnectionResponse {
    pub ok: bool,
    pub message: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_name: Option<String>,
}

#[derive(Serialize)]
pub struct RotateResponse {
    pub ok: bool,
    pub message: &'static str,
    pub agent_id: i64,
    pub api_token: String,
}

#[derive(Deserialize)]
pub struct PostLogRequest {
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub level: Option<String>,
    pub content: String,
}

#[derive(Deserialize)]
pub struct AuthResponseRequest {
    pub action_id: String,
    pub approved: bool,
}

#[derive(Deserialize)]
pub struct MockChatRequest {
    pub sender_username: String,
    pub receiver_username: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub content: Box<RawValue>,
    #[serde(default)]
    pub local_id: Option<String>,
}

#[derive(Serialize)]
pub struct DevToken<'a> {
    pub username: &'a str,
    pub role: &'a str,
    pub api_token: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_depth_counts_brackets_outside_strings() {
        assert_eq!(nesting_depth("42"), 0);
        assert_eq!(nesting_depth(r#""[[[""#), 0);
        assert_eq!(nesting_depth(r#"{"a":[1,{"b":2}]}"#), 3);
        assert_eq!(nesting_depth(r#"["\"[", [[]]]"#), 3);
        let deep = "[".repeat(30_000) + &"]".repeat(30_000);
        assert_eq!(nesting_depth(&deep), 30_000);
    }

    #[test]
    fn escaped_length_matches_serde() {
        for s in [
            "plain",
            "quote\" back\\ nl\n tab\t",
            "\u{7}\u{1f}\u{0}",
            "é ✓",
            "",
        ] {
            assert_eq!(
                json_escaped_len(s) + 2,
                serde_json::to_string(s).unwrap().len(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn only_objects_are_objects() {
        assert!(is_json_object(b" \n{\"a\":1}"));
        assert!(!is_json_object(b"[]"));
        assert!(!is_json_object(b""));
        assert!(!is_json_object(b"\"x\""));
    }
}
