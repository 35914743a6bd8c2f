//! Simulated SQS: at-least-once delivery, a visibility timeout, redelivery of what was not
//! deleted, `maxReceiveCount` -> DLQ, duplicates and delays. It carries the S3 notifications
//! and the function's own continuation and piece messages ([`SimContinuation`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use braze_sync::run::handler::ExportPlan;
use braze_sync::run::runner::{Continuation, PieceMessage};
use serde_json::json;

use crate::rng::keyed;
use crate::world::{Gate, World, now_ms};

/// One message.
#[derive(Debug, Clone)]
pub struct Message {
    /// Message id.
    pub id: String,
    /// Body.
    pub body: String,
    /// Not deliverable before this virtual time (ms).
    pub visible_at: i64,
    /// Times received.
    pub receives: u32,
    /// The invocation of its latest receive returned an answer (it did not crash or time
    /// out), so the function knew how that receive ended.
    pub answered: bool,
}

/// The queue and its DLQ.
pub struct Queue {
    inner: Mutex<Inner>,
    /// Visibility timeout, ms.
    pub visibility_ms: i64,
    /// Receives before a message moves to the DLQ.
    pub max_receives: u32,
}

#[derive(Default)]
struct Inner {
    next: u64,
    messages: Vec<Message>,
    dlq: Vec<Message>,
}

impl Queue {
    /// An empty queue.
    pub fn new(visibility_ms: i64, max_receives: u32) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            visibility_ms,
            max_receives,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a body, deliverable after `delay_ms`.
    pub fn send(&self, body: String, delay_ms: i64) -> String {
        let mut q = self.lock();
        q.next += 1;
        let id = format!("m{:06}", q.next);
        q.messages.push(Message {
            id: id.clone(),
            body,
            visible_at: now_ms() + delay_ms,
            receives: 0,
            answered: false,
        });
        id
    }

    /// Receives up to `max` visible messages (hiding them for the visibility timeout);
    /// messages received `max_receives` times already move to the DLQ instead.
    pub fn receive(&self, max: usize) -> (Vec<Message>, Vec<Message>) {
        let now = now_ms();
        let mut q = self.lock();
        let mut out = Vec::new();
        let mut dead = Vec::new();
        let mut keep = Vec::new();
        for mut m in std::mem::take(&mut q.messages) {
            if out.len() < max && m.visible_at <= now {
                if m.receives >= self.max_receives {
                    dead.push(m);
                    continue;
                }
                m.receives += 1;
                m.answered = false;
                m.visible_at = now + self.visibility_ms;
                out.push(m.clone());
            }
            keep.push(m);
        }
        q.messages = keep;
        q.dlq.extend(dead.iter().cloned());
        (out, dead)
    }

    /// Notes that the invocation of a message's latest receive returned an answer.
    pub fn answered(&self, id: &str) {
        for m in self.lock().messages.iter_mut().filter(|m| m.id == id) {
            m.answered = true;
        }
    }

    /// Deletes a received message (its invocation acknowledged it).
    pub fn delete(&self, id: &str) {
        self.lock().messages.retain(|m| m.id != id);
    }

    /// Makes a failed message visible again at once (a batch item failure keeps its
    /// visibility timeout; an invocation error too), left as SQS does it: nothing to do.
    pub fn is_empty(&self) -> bool {
        self.lock().messages.is_empty()
    }

    /// When the next hidden or delayed message becomes visible.
    pub fn next_visible(&self) -> Option<i64> {
        self.lock().messages.iter().map(|m| m.visible_at).min()
    }

    /// Messages in the DLQ.
    pub fn dlq(&self) -> Vec<Message> {
        self.lock().dlq.clone()
    }

    /// Moves every DLQ message back to the queue (the operator's redrive).
    pub fn redrive(&self) -> usize {
        let now = now_ms();
        let mut q = self.lock();
        let dead = std::mem::take(&mut q.dlq);
        let n = dead.len();
        for mut m in dead {
            m.receives = 0;
            m.visible_at = now;
            q.messages.push(m);
        }
        n
    }
}

/// The function's own queue as one container's [`Continuation`]: sends meet the seed's faults
/// (fail before queueing; queued and the answer lost, so the caller's retry queues it twice).
pub struct SimContinuation {
    world: Arc<World>,
    queue: Arc<Queue>,
    gate: Arc<Mutex<Arc<Gate>>>,
}

impl SimContinuation {
    /// The queue for the invocation behind `gate`.
    pub fn new(world: Arc<World>, queue: Arc<Queue>, gate: Arc<Mutex<Arc<Gate>>>) -> Self {
        Self { world, queue, gate }
    }

    async fn send(&self, body: String) -> Result<(), String> {
        self.send_after(body, 0).await
    }

    /// Sends `body`, deliverable after `delay_ms` (SQS `DelaySeconds`).
    async fn send_after(&self, body: String, delay_ms: i64) -> Result<(), String> {
        let gate = self.gate.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if gate.crashed() {
            return Err("the invocation's container is gone".into());
        }
        let f = &self.world.faults;
        let key = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(body.as_bytes()));
        let fate = self
            .world
            .fate(&gate, "SendMessage", &key, f.sqs_fail, f.sqs_lost, 50);
        tokio::time::sleep(fate.latency).await;
        if fate.crash {
            self.world
                .trace(|| format!("inv {} crash at sqs send {key}", gate.inv));
            gate.crash();
            std::future::pending::<()>().await;
        }
        if fate.fail {
            self.world.stat(|s| s.failed_calls += 1);
            return Err("SQS SendMessage failed: ServiceUnavailable".into());
        }
        let id = self.queue.send(body.clone(), delay_ms);
        let dup = keyed(
            self.world.seed,
            &[b"dup", &gate.inv.to_le_bytes(), key.as_bytes()],
        ) < f.sqs_dup;
        if dup {
            self.queue.send(body, delay_ms + 1_000);
        }
        self.world
            .trace(|| format!("inv {} sqs send {key} as {id} dup={dup}", gate.inv));
        if fate.lose {
            self.world.stat(|s| s.lost_answers += 1);
            return Err("SQS SendMessage timed out".into());
        }
        Ok(())
    }
}

/// The body of an S3 notification for one object (also what a hand-over queues).
pub fn s3_notification(bucket: &str, key: &str, event: &str) -> String {
    json!({"Records": [{
        "eventSource": "aws:s3", "eventName": event,
        "s3": {"bucket": {"name": bucket}, "object": {"key": bridge_shared::s3_uri::encode_key(key)}}}]})
    .to_string()
}

#[async_trait]
impl Continuation for SimContinuation {
    async fn hand_over(&self, plan: &ExportPlan) -> Result<(), String> {
        self.send(s3_notification(
            &plan.trigger.bucket,
            &plan.trigger.key,
            "ObjectCreated:Continuation",
        ))
        .await
    }

    async fn queue_piece(&self, piece: &PieceMessage) -> Result<(), String> {
        self.send(piece.body()).await
    }

    async fn hand_over_after(&self, plan: &ExportPlan, delay: Duration) -> Result<(), String> {
        let body = s3_notification(
            &plan.trigger.bucket,
            &plan.trigger.key,
            "ObjectCreated:Continuation",
        );
        let delay_ms = delay.min(braze_sync::run::runner::MAX_DELAY).as_millis() as i64;
        self.send_after(body, delay_ms).await
    }
}
