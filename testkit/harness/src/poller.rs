//! The local stand-in for a Lambda SQS event source mapping: receives S3 notifications that
//! moto published to a queue, invokes the function under the emulator with an SQS event, and
//! deletes exactly the messages the function did not list in `batchItemFailures`. A failed
//! invocation deletes nothing, so messages come back after the visibility timeout and move to
//! the dead-letter queue after the queue's `maxReceiveCount`, as on AWS.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use serde_json::{Value, json};

use crate::emulator::FunctionUnderEmulator;

/// Counters the tests read.
#[derive(Debug, Default)]
pub struct PollerStats {
    /// Invocations made.
    pub invocations: AtomicU64,
    /// Messages handed to the function.
    pub messages: AtomicU64,
    /// Messages the function reported as failed (left on the queue).
    pub item_failures: AtomicU64,
    /// Invocations that failed as a whole.
    pub failed_invocations: AtomicU64,
    busy: AtomicBool,
}

/// A running poller task.
pub struct Poller {
    task: tokio::task::JoinHandle<()>,
    /// Its counters.
    pub stats: Arc<PollerStats>,
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
}

impl Poller {
    /// Starts polling `queue_url` (ARN `queue_arn`) for `function`, up to `batch_size` messages
    /// per invocation.
    pub fn start(
        sqs: aws_sdk_sqs::Client,
        queue_url: String,
        queue_arn: String,
        function: Arc<FunctionUnderEmulator>,
        batch_size: i32,
    ) -> Self {
        let stats = Arc::new(PollerStats::default());
        let task = tokio::spawn(run(
            sqs.clone(),
            queue_url.clone(),
            queue_arn,
            function,
            batch_size,
            stats.clone(),
        ));
        Self {
            task,
            stats,
            sqs,
            queue_url,
        }
    }

    /// Waits until the queue has no visible or in-flight message and no invocation is running.
    pub async fn wait_idle(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        let mut idle_rounds = 0;
        loop {
            let attrs = self
                .sqs
                .get_queue_attributes()
                .queue_url(&self.queue_url)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                .send()
                .await?;
            let get = |n: QueueAttributeName| -> u64 {
                attrs
                    .attributes()
                    .and_then(|a| a.get(&n))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            let pending = get(QueueAttributeName::ApproximateNumberOfMessages)
                + get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible);
            if pending == 0 && !self.stats.busy.load(Ordering::SeqCst) {
                idle_rounds += 1;
                if idle_rounds >= 3 {
                    return Ok(());
                }
            } else {
                idle_rounds = 0;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "queue {} not drained: {pending} messages pending",
                    self.queue_url
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops polling.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    queue_arn: String,
    function: Arc<FunctionUnderEmulator>,
    batch_size: i32,
    stats: Arc<PollerStats>,
) {
    loop {
        let received = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(batch_size)
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await;
        let messages = match received {
            Ok(r) => r.messages.unwrap_or_default(),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        stats.busy.store(true, Ordering::SeqCst);
        let records: Vec<Value> = messages
            .iter()
            .map(|m| {
                let attrs: serde_json::Map<String, Value> = m
                    .attributes()
                    .map(|a| {
                        a.iter()
                            .map(|(k, v)| (k.as_str().to_string(), Value::String(v.clone())))
                            .collect()
                    })
                    .unwrap_or_default();
                json!({
                    "messageId": m.message_id(),
                    "receiptHandle": m.receipt_handle(),
                    "body": m.body(),
                    "attributes": attrs,
                    "messageAttributes": {},
                    "md5OfBody": m.md5_of_body(),
                    "eventSource": "aws:sqs",
                    "eventSourceARN": queue_arn,
                    "awsRegion": "us-east-1",
                })
            })
            .collect();
        stats.invocations.fetch_add(1, Ordering::SeqCst);
        stats
            .messages
            .fetch_add(messages.len() as u64, Ordering::SeqCst);
        let result = function.invoke(&json!({"Records": records})).await;
        let failed: Vec<String> = match &result {
            Ok(r) if r.ok() => r
                .body
                .get("batchItemFailures")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|f| f.get("itemIdentifier").and_then(Value::as_str))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            _ => {
                stats.failed_invocations.fetch_add(1, Ordering::SeqCst);
                messages
                    .iter()
                    .filter_map(|m| m.message_id().map(str::to_string))
                    .collect()
            }
        };
        stats
            .item_failures
            .fetch_add(failed.len() as u64, Ordering::SeqCst);
        for m in &messages {
            let id = m.message_id().unwrap_or_default();
            if failed.iter().any(|f| f == id) {
                // Make it visible again soon so retries (and the DLQ redrive) happen in test time.
                if let Some(rh) = m.receipt_handle() {
                    let _ = sqs
                        .change_message_visibility()
                        .queue_url(&queue_url)
                        .receipt_handle(rh)
                        .visibility_timeout(1)
                        .send()
                        .await;
                }
                continue;
            }
            if let Some(rh) = m.receipt_handle() {
                let _ = sqs
                    .delete_message()
                    .queue_url(&queue_url)
                    .receipt_handle(rh)
                    .send()
                    .await;
            }
        }
        stats.busy.store(false, Ordering::SeqCst);
    }
}
