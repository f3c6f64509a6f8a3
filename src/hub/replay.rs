//! Store and forward: what a machine user missed while it was offline, replayed by its new
//! connection's writer, page by page, before any live frame.
//!
//! The replay set is fair (README "Store and forward"): each human or Butler sender keeps its
//! newest `PRIORITY_SHARE` undelivered frames, each agent its newest `AGENT_SHARE`, and agents
//! together at most `AGENT_WINDOW`; nothing older than 7 days. So agents' frames never push
//! out a human's instruction, and one sender cannot fill the window. A frame left out is
//! retired (never sent, never counted as delivered) and its sender is told: an ERROR
//! `undelivered` to its live connections, and `delivery: "retired"` in its history.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::conn::Shared;
use super::{raw_json, Hub, Outbound};
use crate::identity::Principal;
use crate::store::{ChatRow, ReplayShares, Retired};
use crate::wire::{self, Code, Frame, Kind};
use crate::{clock, log_error};

pub const REPLAY_MAX_AGE_MS: i64 = 7 * 24 * 3600 * 1000;
/// Newest undelivered frames kept per human or Butler sender.
pub const PRIORITY_SHARE: i64 = 1000;
/// Newest undelivered frames kept per agent sender ...
pub const AGENT_SHARE: i64 = 100;
/// ... and from all agents together.
pub const AGENT_WINDOW: i64 = 1000;
/// Frames a replay loads from the database at a time (bounds its memory).
const PAGE: i64 = 64;
/// Most retired ids listed in one `undelivered` ERROR.
const MAX_LISTED: usize = 100;

pub struct Replay {
    hub: Arc<Hub>,
    user: i64,
    next: i64,
    last: i64,
}

impl Hub {
    /// Plans the replay of a machine user's first connection: retires what falls outside the
    /// window (and tells the senders), and returns what is left to send, if anything.
    pub fn replay_for(self: &Arc<Self>, principal: &Principal) -> Option<Replay> {
        if principal.role.is_human() {
            return None;
        }
        let shares = ReplayShares {
            since: clock::format_ms(clock::now_ms() - REPLAY_MAX_AGE_MS),
            priority: PRIORITY_SHARE,
            agent: AGENT_SHARE,
            agent_window: AGENT_WINDOW,
        };
        let (retired, last) = match self.store.plan_replay(principal.id, shares) {
            Ok(plan) => plan,
            Err(e) => {
                log_error!("hub: cannot plan the replay for user {}: {e}", principal.id);
                return None;
            }
        };
        if !retired.is_empty() {
            self.report_retired(principal, retired);
        }
        last.map(|last| Replay {
            hub: self.clone(),
            user: principal.id,
            next: 0,
            last,
        })
    }

    /// One ERROR `undelivered` per sender, to its live connections.
    fn report_retired(&self, receiver: &Principal, retired: Vec<Retired>) {
        self.metrics
            .replay_retired
            .fetch_add(retired.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut by_sender: BTreeMap<i64, Vec<Retired>> = BTreeMap::new();
        for r in retired {
            by_sender.entry(r.sender_id).or_default().push(r);
        }
        for (sender, mut frames) in by_sender {
            frames.sort_by_key(|r| r.id);
            let message = format!(
                "{} frame(s) to {} were not delivered: store and forward keeps each sender's newest frames while the receiver is offline (see README), none older than 7 days",
                frames.len(),
                receiver.username
            );
            let ids: Vec<i64> = frames.iter().rev().take(MAX_LISTED).map(|r| r.id).collect();
            let payload = raw_json(&wire::UndeliveredPayload {
                code: Code::Undelivered.as_str(),
                message: &message,
                receiver_id: receiver.id,
                count: frames.len(),
                ids: &ids,
            });
            let now = clock::now_rfc3339();
            let mut frame = Frame::server(Kind::Error, Some(&payload), &now);
            frame.local_id = frames.iter().rev().find_map(|r| r.local_id.as_deref());
            let frame = Shared::new(Kind::Error, frame.to_json());
            for c in self.conns_of(sender) {
                self.metrics.error(Code::Undelivered);
                c.deliver(frame.to(None));
            }
            self.publish(crate::store::Audience::Users(vec![sender]), &frame);
        }
    }
}

impl Replay {
    /// Whether a live frame was part of this replay (it is then not sent twice).
    pub fn covers(&self, stored_id: i64) -> bool {
        stored_id <= self.last
    }

    /// The next page of frames, in id order; None when the replay is done.
    pub fn next_page(&mut self) -> Option<Vec<Outbound>> {
        if self.next > self.last {
            return None;
        }
        let rows = match self
            .hub
            .store
            .undelivered_page(self.user, self.next, self.last, PAGE)
        {
            Ok(rows) => rows,
            Err(e) => {
                log_error!(
                    "hub: cannot load frames to replay for user {}: {e}",
                    self.user
                );
                return None;
            }
        };
        let last_row = rows.last()?.id;
        self.next = last_row + 1;
        Some(
            rows.iter()
                .filter_map(|row| self.hub.replay_frame(row))
                .collect(),
        )
    }
}

impl Hub {
    /// A stored frame as store and forward sends it, flagged delivered once written.
    pub(super) fn replay_frame(&self, row: &ChatRow) -> Option<Outbound> {
        let sender = self.store.user_by_id(row.sender_id).ok().flatten()?;
        // A human wrote in this thread: the agent's answer goes there (threads.rs).
        if let (true, Some(thread)) = (sender.role.is_human(), row.conversation_id) {
            self.human_wrote_in(sender.id, row.receiver_id, thread);
        }
        let kind = Kind::parse(&row.kind)?;
        let frame = Frame {
            id: Some(row.id),
            kind: kind.as_str(),
            sender_id: sender.id,
            sender_name: &sender.username,
            sender_role: sender.role.as_str(),
            target_id: Some(row.receiver_id),
            payload: Some(&row.payload),
            local_id: row.local_id.as_deref(),
            stream_id: row.stream_id.as_deref(),
            conversation_id: row.conversation_id,
            timestamp: &row.timestamp,
        };
        Some(Shared::new(kind, frame.to_json()).to(Some(row.id)))
    }
}
