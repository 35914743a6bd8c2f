//! Stage 2 of a run: the sender ([`crate::deliver::deliver`]) as a task, taking deltas from the
//! producer and reporting each one's outcome to the committer.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::braze::BrazeApi;
use crate::deliver::{DeliverConfig, DeliverError, DeliveryStats, deliver};
use crate::handler::RunError;
use crate::model::{DeliveryOutcome, UserDelta};

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
    /// Starts sending what arrives on `rx`; outcomes go to `outcomes`.
    pub fn start(
        api: Arc<dyn BrazeApi>,
        cfg: DeliverConfig,
        rx: mpsc::Receiver<UserDelta>,
        outcomes: mpsc::Sender<DeliveryOutcome>,
    ) -> Self {
        let handle = tokio::spawn(async move { deliver(rx, api.as_ref(), cfg, outcomes).await });
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
