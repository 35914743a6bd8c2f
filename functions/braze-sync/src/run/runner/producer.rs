//! Stage 1 of a run: read → map → diff ([`crate::diff::in_memory::produce`]) as blocking work
//! ([`crate::clock::spawn_blocking`]), feeding
//! the sender through a bounded channel. It only reads the snapshot; rejected rows collect in
//! a [`RejectLog`].

use std::sync::Arc;

use bridge_shared::{ObjectStore, S3Uri};
use tokio::sync::mpsc;

use crate::clock::{BlockingTask, spawn_blocking};
use crate::config::route::Route;
use crate::diff::bounded::{RangedSettings, StoreRanges, produce_ranged};
use crate::diff::export::{ProduceOptions, Stop, Summary, SyncError};
use crate::diff::in_memory::{open_s3_part, produce};
use crate::diff::rejects::RejectLog;
use crate::model::UserDelta;
use crate::run::handler::{ExportPlan, RunError};
use crate::state::confirmed::Snapshot;
use crate::state::store::{HeadDoc, StateStore};

/// What the producer ended with: its counts (or why planning stopped) and the rejected rows.
pub(super) struct Produced {
    /// The planning result.
    pub result: Result<Summary, SyncError>,
    /// Rows refused before sending.
    pub rejects: RejectLog,
}

/// Which diff the producer runs.
pub(super) enum Diff {
    /// The in-memory diff ([`crate::diff::in_memory`]) against a state loaded whole.
    InMemory(Arc<Snapshot>),
    /// The bounded diff ([`crate::diff::bounded`]).
    Bounded(Box<BoundedDiff>),
}

/// The bounded diff against the state `doc` describes, loading one hash range per worker at
/// a time from `state`.
pub(super) struct BoundedDiff {
    /// Where the state lives.
    pub state: StateStore,
    /// The head the ranges are read from.
    pub doc: HeadDoc,
    /// Workers, spill and memory bounds.
    pub settings: RangedSettings,
}

/// The running producer.
pub(super) struct Producer {
    handle: BlockingTask<Produced>,
}

impl Producer {
    /// Starts diffing `plan`'s parts with `diff`, sending each delta into `tx`.
    pub fn start(
        store: Arc<dyn ObjectStore>,
        route: Arc<Route>,
        plan: &ExportPlan,
        opts: ProduceOptions,
        diff: Diff,
        tx: mpsc::Sender<UserDelta>,
    ) -> Self {
        let parts: Vec<S3Uri> = plan
            .parts
            .iter()
            .map(|p| S3Uri::new(&plan.trigger.bucket, &p.key))
            .collect();
        let handle = spawn_blocking(move |blocking| {
            let mut rejects = RejectLog::new(crate::diff::rejects::DEFAULT_MAX_BYTES);
            let parts_iter = parts
                .iter()
                .map(|uri| open_s3_part(&store, uri, &blocking).map(|(_, part)| part));
            let send = |d| {
                blocking
                    .block_on(tx.send(d))
                    .map_err(|_| Stop("the sender stopped".into()))
            };
            let result = match diff {
                Diff::InMemory(snapshot) => produce(
                    parts_iter,
                    &route,
                    &snapshot,
                    &opts,
                    &mut |d| send(d),
                    &mut |r| rejects.push(&r),
                ),
                Diff::Bounded(b) => {
                    let BoundedDiff {
                        state,
                        doc,
                        settings,
                    } = *b;
                    let ranges = StoreRanges::new(state, doc, route.clone(), blocking.clone());
                    produce_ranged(
                        parts_iter,
                        &route,
                        &ranges,
                        &opts,
                        &settings,
                        &send,
                        &mut |r| rejects.push(&r),
                    )
                }
            };
            Produced { result, rejects }
        });
        Self { handle }
    }

    /// Waits for the producer to end (it ends once the sender stops taking deltas).
    pub async fn finish(self) -> Result<Produced, RunError> {
        self.handle
            .await
            .map_err(|e| RunError::Retryable(format!("the reader task failed: {e}")))
    }
}
