//! Stage 2 of a run: the sender ([`crate::send::deliver::deliver`]) as a task, taking deltas from the
//! producer and reporting each one's outcome to the committer. While it sends, it is one of the
//! workspace's senders ([`crate::send::workspace_share`]): it registers before its first request
//! (not while the producer has sent it nothing yet), paces at its share of the workspace limit
//! as senders come and go, leaves while it has nothing to send, and leaves at the end.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::model::{DeliveryOutcome, UserDelta};
use crate::run::handler::RunError;
use crate::send::braze::BrazeApi;
use crate::send::deliver::{DeliverConfig, DeliverError, DeliveryStats, deliver};
use crate::send::workspace_share::WorkspaceShare;

/// How the sender ended: its figures, and the error that stopped it, if one did.
pub(super) struct Delivery {
    /// What was sent, confirmed, refused and left.
    pub stats: DeliveryStats,
    /// Why sending stopped early (refused key, Braze unavailable, outcomes dropped).
    pub error: Option<DeliverError>,
}

/// The running sender.
pub(super) struct Sender {
    handle: JoinHandle<Result<DeliveryStats, DeliverError>>,
}

impl Sender {
    /// Starts sending what arrives on `rx`; outcomes go to `outcomes`. With `share`, the sender
    /// counts among the workspace's senders while it has requests to send and paces at its
    /// share of the limit.
    pub fn start(
        api: Arc<dyn BrazeApi>,
        mut cfg: DeliverConfig,
        rx: mpsc::Receiver<UserDelta>,
        outcomes: mpsc::Sender<DeliveryOutcome>,
        share: Option<(WorkspaceShare, tokio::sync::watch::Receiver<u32>)>,
    ) -> Self {
        let handle = tokio::spawn(async move {
            match share {
                None => deliver(rx, api.as_ref(), cfg, outcomes).await,
                Some((share, peers)) => {
                    cfg.peers = Some(peers);
                    share
                        .while_sending(|activity| {
                            cfg.activity = Some(activity);
                            deliver(rx, api.as_ref(), cfg, outcomes)
                        })
                        .await
                }
            }
        });
        Self { handle }
    }

    /// Waits for the sender to end.
    pub async fn finish(self) -> Result<Delivery, RunError> {
        match self.handle.await {
            Ok(Ok(stats)) => Ok(Delivery { stats, error: None }),
            Ok(Err(e)) => Ok(Delivery {
                stats: e.stats().clone(),
                error: Some(e),
            }),
            Err(e) => Err(RunError::Retryable(format!("the sender task failed: {e}"))),
        }
    }
}
