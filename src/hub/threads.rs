//! Conversation threads and approvals, as the hub applies them to frames (README "Threads").
//!
//! Filing: a frame between a human and an agent (or the Butler) belongs to one of the
//! human's threads with that peer.
//! - A frame naming a thread (`conversation_id`) must name one whose owner and peer are the
//!   frame's two users; anything else is `forbidden` (the original let anyone write into
//!   anyone's thread).
//! - A human's CHAT that names none goes to the pair's default thread (made on first use).
//! - An agent's or the Butler's CHAT, AUTH_REQUEST, CHAT_STREAM or CHAT_STREAM_END to a
//!   human that names none goes to the thread that human last wrote in with it (else the
//!   default thread): agents written like the integration guide never send
//!   `conversation_id`, and their replies must land in the thread the human is looking at.
//!
//! Approvals: an AUTH_RESPONSE answers the AUTH_REQUEST with the same `action_id`. Its
//! addressee or any admin may answer, once; the stored request's status then becomes
//! APPROVED or REJECTED. Requests still PENDING after `--approval-ttl`, and every one at
//! start-up, become EXPIRED, and the Butler and the human are told (AUTH_STATUS_UPDATE).

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::value::RawValue;

use super::conn::Shared;
use super::envelope::{refuse, Envelope};
use super::{raw_json, FrameError, Hub, Target};
use crate::identity::{Principal, Role};
use crate::store::Approval;
use crate::wire::{self, Code, Frame, Kind};
use crate::{clock, log_error};

/// Entries each cache holds before it starts over (they are refilled from the database).
const CACHE_MAX: usize = 100_000;
/// Notices kept for a Butler that is not connected.
const BUTLER_NOTICES_MAX: usize = 1000;

/// Why an answer to an approval is refused.
pub enum AnswerRefusal {
    /// Neither the human it was asked of nor an admin.
    NotAddressee,
    /// It is no longer pending: APPROVED, REJECTED or EXPIRED.
    Answered(String),
    /// The request could not be looked up, or the answer not stored or routed.
    Failed(FrameError),
}

/// What the hub remembers of threads, so that filing a frame rarely asks the database.
#[derive(Default)]
pub(super) struct ThreadCache {
    /// Thread id → (owner, peer). A thread's two users never change.
    pairs: Mutex<HashMap<i64, (i64, i64)>>,
    /// (human, peer) → the thread the human last wrote in with that peer.
    last: Mutex<HashMap<(i64, i64), i64>>,
    /// (human, peer) → the pair's default thread. Asking the store each time cost a write
    /// transaction per CHAT (find-or-create), on the sender's reader, contending with the
    /// writer's commits: it halved one busy connection's throughput.
    defaults: Mutex<HashMap<(i64, i64), i64>>,
    /// AUTH_STATUS_UPDATEs for the Butler while it was away, sent when it connects.
    butler_notices: Mutex<Vec<Shared>>,
}

impl ThreadCache {
    /// After a data reset: thread ids start again at 1 and name other pairs.
    pub(super) fn forget_all(&self) {
        self.pairs.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.defaults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.butler_notices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

fn remember<K: std::hash::Hash + Eq, V>(map: &Mutex<HashMap<K, V>>, k: K, v: V) {
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    if m.len() >= CACHE_MAX {
        m.clear();
    }
    m.insert(k, v);
}

impl Hub {
    /// Files a frame between a human and a machine into a thread (see the module comment):
    /// checks the thread it names, or stamps the one it belongs to.
    pub(super) fn file(
        &self,
        me: &Principal,
        target: Target,
        env: &mut Envelope,
    ) -> Result<(), FrameError> {
        let from_human = me.role.is_human();
        let (human, peer) = match (from_human, target.role.is_human()) {
            (true, false) => (me.id, (target.id, target.role)),
            (false, true) => (target.id, (me.id, me.role)),
            _ => {
                if env.conversation_id.is_some() {
                    return Err(refuse(
                        Code::Forbidden,
                        "conversation_id names a thread between a human and an agent",
                    ));
                }
                return Ok(());
            }
        };
        let kind = channel_kind(peer.1);
        if let Some(id) = env.conversation_id {
            if self.thread_pair(id)? != Some((human, peer.0)) {
                return Err(refuse(
                    Code::Forbidden,
                    "conversation thread not found for these two users",
                ));
            }
            if from_human {
                remember(&self.threads.last, (human, peer.0), id);
            }
            return Ok(());
        }
        let thread = if from_human {
            if env.kind != Kind::Chat {
                return Ok(());
            }
            self.default_thread(human, peer.0, kind)?
        } else {
            if !matches!(
                env.kind,
                Kind::Chat | Kind::ChatStream | Kind::ChatStreamEnd | Kind::AuthRequest
            ) {
                return Ok(());
            }
            match self.last_thread(human, peer.0)? {
                Some(id) => id,
                None => self.default_thread(human, peer.0, kind)?,
            }
        };
        if from_human {
            remember(&self.threads.last, (human, peer.0), thread);
        }
        env.conversation_id = Some(thread);
        Ok(())
    }

    /// The thread a frame of `kind` from `sender` to `receiver`, naming none, is filed into:
    /// for frames stored without being sent (the development endpoint), so that they land
    /// where a sent one would. None between two machines (or two humans).
    pub fn thread_for(
        &self,
        sender: &crate::store::UserRow,
        receiver: &crate::store::UserRow,
        kind: Kind,
    ) -> Result<Option<i64>, FrameError> {
        let me = Principal {
            id: sender.id,
            username: sender.username.clone(),
            role: sender.role,
            token_hash: None,
            expires_at: None,
            session_gen: 0,
        };
        let target = Target {
            id: receiver.id,
            role: receiver.role,
        };
        let mut env = Envelope {
            kind,
            custom: None,
            target_id: receiver.id,
            payload: None,
            local_id: None,
            stream_id: None,
            conversation_id: None,
        };
        self.file(&me, target, &mut env)?;
        Ok(env.conversation_id)
    }

    /// A human wrote in `thread` with `peer` on another node (or before this node knew):
    /// the peer's answers here go there.
    pub(super) fn human_wrote_in(&self, human: i64, peer: i64, thread: i64) {
        remember(&self.threads.last, (human, peer), thread);
    }

    fn thread_pair(&self, id: i64) -> Result<Option<(i64, i64)>, FrameError> {
        if let Some(pair) = self
            .threads
            .pairs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(Some(*pair));
        }
        let row = self.store.thread(id).map_err(unavailable)?;
        Ok(row.map(|t| {
            let pair = (t.owner_user_id, t.peer_user_id);
            remember(&self.threads.pairs, id, pair);
            pair
        }))
    }

    fn last_thread(&self, human: i64, peer: i64) -> Result<Option<i64>, FrameError> {
        let cached = self
            .threads
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(human, peer))
            .copied();
        if cached.is_some() {
            return Ok(cached);
        }
        let found = self.store.last_thread(human, peer).map_err(unavailable)?;
        if let Some(id) = found {
            remember(&self.threads.last, (human, peer), id);
        }
        Ok(found)
    }

    fn default_thread(&self, human: i64, peer: i64, kind: &str) -> Result<i64, FrameError> {
        let cached = self
            .threads
            .defaults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(human, peer))
            .copied();
        if let Some(id) = cached {
            return Ok(id);
        }
        let t = self
            .store
            .default_thread(human, peer, kind)
            .map_err(unavailable)?;
        remember(&self.threads.pairs, t.id, (human, peer));
        remember(&self.threads.defaults, (human, peer), t.id);
        Ok(t.id)
    }

    // ----- approvals --------------------------------------------------------------------

    /// Whether `me` may answer the request an AUTH_RESPONSE payload names: its addressee
    /// or an admin, while it is pending. None when no stored request has that action_id
    /// (an answer to something the Butler asked elsewhere: routed as before).
    pub(super) fn check_answer(
        &self,
        me: &Principal,
        payload: Option<&RawValue>,
    ) -> Result<Option<Approval>, FrameError> {
        self.judge_answer(me, payload)
            .map_err(|refusal| match refusal {
                AnswerRefusal::NotAddressee => refuse(
                    Code::Forbidden,
                    "this approval was asked of someone else (only they, or an admin, may answer)",
                ),
                AnswerRefusal::Answered(status) => refuse(
                    Code::Forbidden,
                    format!("this approval was already answered: {status}"),
                ),
                AnswerRefusal::Failed(e) => e,
            })
    }

    pub(super) fn judge_answer(
        &self,
        me: &Principal,
        payload: Option<&RawValue>,
    ) -> Result<Option<Approval>, AnswerRefusal> {
        let Some((action_id, approved)) = answer_of(payload) else {
            return Ok(None);
        };
        let Some(approval) = self
            .store
            .approval(&action_id)
            .map_err(|e| AnswerRefusal::Failed(unavailable(e)))?
        else {
            return Ok(None);
        };
        if approval.human_id != me.id && me.role != Role::Admin {
            return Err(AnswerRefusal::NotAddressee);
        }
        if approval.status != "PENDING" {
            return Err(AnswerRefusal::Answered(approval.status));
        }
        // The answer is claimed before it is stored or routed: of two answers at once (two
        // admins, two nodes), exactly one gets past here. (Should storing it then fail, the
        // request stays answered though the Butler never heard: its own timeout tells the
        // human.)
        let status = if approved { "APPROVED" } else { "REJECTED" };
        match self.store.set_approval_status(approval.id, status) {
            Ok(true) => Ok(Some(approval)),
            Ok(false) => {
                let now = self
                    .store
                    .approval(&action_id)
                    .ok()
                    .flatten()
                    .map(|a| a.status)
                    .unwrap_or_else(|| "answered".into());
                Err(AnswerRefusal::Answered(now))
            }
            Err(e) => Err(AnswerRefusal::Failed(unavailable(e))),
        }
    }

    /// An AUTH_STATUS_UPDATE from the Butler that asked: a still-PENDING request takes the
    /// final status it names (APPROVED, REJECTED, EXPIRED); anything else changes nothing.
    pub(super) fn record_status_update(&self, butler: &Principal, payload: Option<&RawValue>) {
        #[derive(serde::Deserialize)]
        struct Update {
            action_id: serde_json::Value,
            status: String,
        }
        let Some(raw) = payload.map(RawValue::get) else {
            return;
        };
        if !wire::is_json_object(raw.as_bytes()) {
            return;
        }
        let Ok(u) = serde_json::from_str::<Update>(raw) else {
            return;
        };
        let status = u.status.to_ascii_uppercase();
        if !matches!(status.as_str(), "APPROVED" | "REJECTED" | "EXPIRED") {
            return;
        }
        let action_id = match u.action_id {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            _ => return,
        };
        match self.store.approval(&action_id) {
            Ok(Some(a)) if a.butler_id == butler.id && a.status == "PENDING" => {
                if let Err(e) = self.store.set_approval_status(a.id, &status) {
                    log_error!("hub: cannot record approval {action_id} as {status}: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => log_error!("hub: approval lookup failed: {e}"),
        }
    }

    /// Expires every PENDING request older than `before` (all of them when None, as at
    /// start-up) and tells the Butler and the human.
    pub fn expire_approvals(&self, before: Option<String>) {
        let expired = match self.store.expire_approvals(before.as_deref()) {
            Ok(e) => e,
            Err(e) => {
                log_error!("hub: cannot expire approvals: {e}");
                return;
            }
        };
        for a in expired {
            let payload = raw_json(&wire::ApprovalStatus {
                action_id: &a.action_id,
                status: "EXPIRED",
            });
            let now = clock::now_rfc3339();
            let mut frame = Frame::server(Kind::AuthStatusUpdate, Some(&payload), &now);
            frame.conversation_id = a.conversation_id;
            let frame = Shared::new(Kind::AuthStatusUpdate, frame.to_json());
            for c in self.conns_of(a.human_id) {
                c.deliver(frame.to(None));
            }
            self.publish(
                crate::store::Audience::Users(vec![a.human_id, a.butler_id]),
                &frame,
            );
            let butler = self.conns_of(a.butler_id);
            if butler.is_empty() && !self.online_anywhere(a.butler_id) {
                let mut notices = self
                    .threads
                    .butler_notices
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if notices.len() < BUTLER_NOTICES_MAX {
                    notices.push(frame);
                }
            } else {
                for c in butler {
                    c.deliver(frame.to(None));
                }
            }
        }
    }

    /// What the Butler was told while it was away, for its first connection.
    pub(super) fn take_butler_notices(&self) -> Vec<Shared> {
        std::mem::take(
            &mut *self
                .threads
                .butler_notices
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }
}

pub fn channel_kind(role: Role) -> &'static str {
    if role == Role::Butler {
        "butler_direct"
    } else {
        "agent_direct"
    }
}

/// (action_id, approved) of an AUTH_RESPONSE payload.
fn answer_of(payload: Option<&RawValue>) -> Option<(String, bool)> {
    #[derive(serde::Deserialize)]
    struct Answer {
        action_id: serde_json::Value,
        #[serde(default)]
        approved: bool,
    }
    let raw = payload?.get();
    if !wire::is_json_object(raw.as_bytes()) {
        return None;
    }
    let a: Answer = serde_json::from_str(raw).ok()?;
    let id = match a.action_id {
        serde_json::Value::String(s) => s,
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    Some((id, a.approved))
}

fn unavailable(e: crate::store::StoreError) -> FrameError {
    log_error!("hub: thread or approval lookup failed: {e}");
    refuse(Code::Internal, "storage unavailable")
}
