//! Inbound frames: parsing and validating an envelope (SPEC section 4's field rules). The
//! first thing hostile input meets, so it is fuzzed (`mod fuzz`).

use serde_json::value::RawValue;

use crate::wire::{self, Code, Kind};

/// A validated inbound frame.
pub struct Envelope {
    pub kind: Kind,
    /// A custom type's name (`kind` is then `Kind::Custom`).
    pub custom: Option<String>,
    pub target_id: i64,
    pub payload: Option<Box<RawValue>>,
    pub local_id: Option<String>,
    pub stream_id: Option<String>,
    pub conversation_id: Option<i64>,
}

/// Why a frame was refused: becomes an ERROR frame on the sender's connection, carrying the
/// frame's `local_id` when it had a readable one.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: Code,
    pub message: String,
    pub local_id: Option<String>,
}

impl Envelope {
    /// The type as it goes on the wire.
    pub fn type_name(&self) -> &str {
        self.custom.as_deref().unwrap_or(self.kind.as_str())
    }
}

pub fn refuse(code: Code, message: impl Into<String>) -> FrameError {
    FrameError {
        code,
        message: message.into(),
        local_id: None,
    }
}

impl FrameError {
    pub fn about(mut self, local_id: Option<&str>) -> FrameError {
        self.local_id = local_id.map(str::to_string);
        self
    }
}

/// Parses and validates an envelope; see SPEC section 4 for the field rules.
pub fn parse_envelope(text: &str) -> Result<Envelope, FrameError> {
    if !wire::is_json_object(text.as_bytes()) {
        // Valid JSON that is not an object (serde would read an array as the fields in
        // order), or not JSON at all.
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => refuse(Code::BadEnvelope, "a frame must be a JSON object"),
            Err(_) => refuse(Code::BadJson, "the frame is not valid JSON"),
        });
    }
    let raw: wire::RawEnvelope = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => refuse(
            Code::BadEnvelope,
            "a frame must be a JSON object with a string type",
        ),
        _ => refuse(Code::BadJson, "the frame is not valid JSON"),
    })?;
    // Errors about a readable envelope carry its local_id, so the client can match them.
    let local_id = usable_local_id(&raw);
    validate_envelope(raw).map_err(|e| e.about(local_id.as_deref()))
}

fn usable_local_id(raw: &wire::RawEnvelope) -> Option<String> {
    raw.local_id
        .as_ref()
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .map(str::to_string)
}

/// The `local_id` of a frame that will not be handled (it was over the rate), so the ERROR
/// that says so can name it. Only the envelope's own fields are looked at.
pub fn peek_local_id(text: &str) -> Option<String> {
    if !wire::is_json_object(text.as_bytes()) {
        return None;
    }
    serde_json::from_str::<wire::RawEnvelope>(text)
        .ok()
        .and_then(|raw| usable_local_id(&raw))
}

fn validate_envelope(raw: wire::RawEnvelope<'_>) -> Result<Envelope, FrameError> {
    let kind = match &raw.kind {
        Some(serde_json::Value::String(s)) => s.as_str(),
        _ => return Err(refuse(Code::BadEnvelope, "type must be a string")),
    };
    let raw_kind = kind;
    let kind = match Kind::parse(kind) {
        Some(k) if k.server_only() => {
            return Err(refuse(
                Code::Forbidden,
                format!("{kind} frames are sent by the server only"),
            ))
        }
        Some(k) => k,
        None if Kind::is_custom_name(kind) => Kind::Custom,
        None => {
            return Err(refuse(
                Code::UnknownType,
                format!(
                    "unknown frame type {kind:?}: known types, or 1-32 characters of A-Z 0-9 _"
                ),
            ))
        }
    };
    let custom = (kind == Kind::Custom).then(|| raw_kind.to_string());
    let target_id = match &raw.target_id {
        None => 0,
        Some(v) => v
            .as_i64()
            .filter(|n| *n >= 0)
            .ok_or_else(|| refuse(Code::BadEnvelope, "target_id must be an integer >= 0"))?,
    };
    let short_string =
        |v: &Option<serde_json::Value>, name: &str| -> Result<Option<String>, FrameError> {
            match v {
                None => Ok(None),
                Some(serde_json::Value::String(s)) if s.len() <= 128 => Ok(Some(s.clone())),
                Some(_) => Err(refuse(
                    Code::BadEnvelope,
                    format!("{name} must be a string of at most 128 bytes"),
                )),
            }
        };
    let local_id = short_string(&raw.local_id, "local_id")?.filter(|s| !s.is_empty());
    let stream_id = short_string(&raw.stream_id, "stream_id")?;
    let conversation_id = match &raw.conversation_id {
        None => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| refuse(Code::BadEnvelope, "conversation_id must be an integer"))?,
        ),
    };
    if raw
        .payload
        .is_some_and(|p| wire::nesting_depth(p.get()) > wire::MAX_PAYLOAD_DEPTH)
    {
        return Err(refuse(
            Code::BadEnvelope,
            format!(
                "payload is nested deeper than {} levels",
                wire::MAX_PAYLOAD_DEPTH
            ),
        ));
    }
    Ok(Envelope {
        kind,
        custom,
        target_id,
        payload: raw.payload.map(ToOwned::to_owned),
        local_id,
        stream_id,
        conversation_id,
    })
}

/// `{level, content}` (level upper-cased, default INFO, 1–16 of A–Z and _) or a plain string.
pub fn parse_log_payload(payload: Option<&RawValue>) -> Result<(String, String), FrameError> {
    #[derive(serde::Deserialize)]
    struct LogBody {
        #[serde(default)]
        level: Option<String>,
        content: String,
    }
    let bad = || {
        refuse(
            Code::BadEnvelope,
            "SYSTEM_LOG payload must be {level, content} or a string",
        )
    };
    let payload = payload.ok_or_else(bad)?;
    if let Ok(content) = serde_json::from_str::<String>(payload.get()) {
        return Ok(("INFO".into(), content));
    }
    // An object, not an array read as its fields in order.
    if !wire::is_json_object(payload.get().as_bytes()) {
        return Err(bad());
    }
    let body: LogBody = serde_json::from_str(payload.get()).map_err(|_| bad())?;
    let level = normalize_level(body.level.as_deref()).ok_or_else(|| {
        refuse(
            Code::BadEnvelope,
            "level must be 1-16 characters of A-Z and _",
        )
    })?;
    Ok((level, body.content))
}

pub fn normalize_level(level: Option<&str>) -> Option<String> {
    let level = level
        .map(str::to_ascii_uppercase)
        .unwrap_or_else(|| "INFO".into());
    let ok = (1..=16).contains(&level.len())
        && level.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
    ok.then_some(level)
}

/// Property tests: the envelope parser is the first thing hostile input meets. They run in CI
/// for a bounded number of cases (PROPTEST_CASES, default 256 per property); any failure
/// proptest finds is kept as a regression test below.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
            prop::sample::select(Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>())
                .prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "type",
                        "target_id",
                        "payload",
                        "local_id",
                        "stream_id",
                        "conversation_id",
                        "id",
                        "sender_id",
                        "x"
                    ])
                    .prop_map(String::from),
                    inner,
                    0..7
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// What any successful parse guarantees to the router.
    fn check_invariants(text: &str) {
        match parse_envelope(text) {
            Ok(env) => {
                assert!(!env.kind.server_only());
                assert!(env.target_id >= 0);
                assert!(env
                    .local_id
                    .as_ref()
                    .is_none_or(|l| !l.is_empty() && l.len() <= 128));
                assert!(env.stream_id.as_ref().is_none_or(|l| l.len() <= 128));
            }
            Err(e) => {
                assert!(Code::ALL.contains(&e.code), "unknown code {:?}", e.code);
                assert!(!e.message.is_empty());
                assert!(e.local_id.is_none_or(|l| l.len() <= 128));
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics_the_parser(text in ".{0,300}") {
            check_invariants(&text);
        }

        #[test]
        fn arbitrary_json_is_accepted_or_refused_with_a_spec_code(v in json_value()) {
            let text = v.to_string();
            check_invariants(&text);
            // A well-formed frame of a known type is never refused as bad JSON.
            if let Some(kind) = v.get("type").and_then(|t| t.as_str()) {
                if let Err(e) = parse_envelope(&text) {
                    prop_assert_ne!(e.code, Code::BadJson, "{} {}", kind, text);
                }
            }
        }

        #[test]
        fn mutated_valid_frames_never_panic(flips in prop::collection::vec((0usize..200, any::<u8>()), 1..8)) {
            let mut bytes = br#"{"type":"CHAT","target_id":7,"payload":{"a":[1,2,"x"]},"local_id":"abc","stream_id":"s"}"#.to_vec();
            for (at, b) in flips {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            if let Ok(text) = std::str::from_utf8(&bytes) {
                check_invariants(text);
            }
        }

        #[test]
        fn log_payloads_never_panic(v in json_value()) {
            let raw = RawValue::from_string(v.to_string()).unwrap();
            if let Ok((level, _)) = parse_log_payload(Some(&raw)) {
                prop_assert!((1..=16).contains(&level.len()));
                prop_assert!(level.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_errors_are_classified() {
        let code = |t: &str| parse_envelope(t).err().map(|e| e.code.as_str());
        assert_eq!(code("{nope"), Some("bad_json"));
        assert_eq!(code("[1,2]"), Some("bad_envelope"));
        assert_eq!(code("{}"), Some("bad_envelope"));
        assert_eq!(code(r#"{"type":5}"#), Some("bad_envelope"));
        assert_eq!(
            code(r#"{"type":"CHAT","target_id":"7"}"#),
            Some("bad_envelope")
        );
        assert_eq!(
            code(r#"{"type":"CHAT","target_id":-1}"#),
            Some("bad_envelope")
        );
        assert_eq!(code(r#"{"type":"NOPE"}"#), None, "a custom type");
        assert_eq!(code(r#"{"type":"nope"}"#), Some("unknown_type"));
        assert_eq!(
            code(&format!(r#"{{"type":"{}"}}"#, "X".repeat(33))),
            Some("unknown_type")
        );
        assert_eq!(code(r#"{"type":"WEATHER-UPDATE"}"#), Some("unknown_type"));
        assert_eq!(code(r#"["CHAT",2,"hi"]"#), Some("bad_envelope"));
        assert_eq!(code(r#"[1,2"#), Some("bad_json"));
        let deep = format!(
            r#"{{"type":"CHAT","target_id":1,"payload":{}{}}}"#,
            "[".repeat(65),
            "]".repeat(65)
        );
        assert_eq!(code(&deep), Some("bad_envelope"));
        let ok = format!(
            r#"{{"type":"CHAT","target_id":1,"payload":{}{}}}"#,
            "[".repeat(64),
            "]".repeat(64)
        );
        assert_eq!(code(&ok), None);
        assert_eq!(
            peek_local_id(r#"{"type":"CHAT","local_id":"l-9"}"#).as_deref(),
            Some("l-9")
        );
        assert_eq!(code(r#"{"type":"ACK"}"#), Some("forbidden"));
        let long = "x".repeat(129);
        assert_eq!(
            code(&format!(r#"{{"type":"CHAT","local_id":"{long}"}}"#)),
            Some("bad_envelope")
        );
        assert_eq!(
            code(r#"{"type":"CHAT","target_id":null,"id":99,"sender_id":"x"}"#),
            None
        );
    }

    #[test]
    fn log_payloads() {
        let p = |s: &str| parse_log_payload(Some(&RawValue::from_string(s.into()).unwrap()));
        assert_eq!(p(r#""hello""#).unwrap(), ("INFO".into(), "hello".into()));
        assert_eq!(
            p(r#"{"level":"warning","content":"x"}"#).unwrap(),
            ("WARNING".into(), "x".into())
        );
        assert_eq!(p(r#"{"content":"x"}"#).unwrap().0, "INFO");
        assert!(p(r#"{"level":"bad level","content":"x"}"#).is_err());
        assert!(p(r#"{"level":"INFO"}"#).is_err());
        assert!(
            p(r#"["INFO","x"]"#).is_err(),
            "an array is not {{level, content}}"
        );
        assert!(p("42").is_err());
        assert!(parse_log_payload(None).is_err());
    }
}
