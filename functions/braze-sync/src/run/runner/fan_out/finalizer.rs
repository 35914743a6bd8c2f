//! The finalizer: the piece that finds every `done.json` and wins `final.json`. It merges the
//! forks into the route head, adds the pieces' figures up, judges departures on the export's
//! totals and sends the removals the guard lets through, commits with the export's watermark,
//! writes the combined report, completes the ledger entry and deletes the control objects.

use std::ops::Range;
use std::sync::Arc;

use bridge_shared::{ObjectStore, PutCondition, S3Uri};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::attempt::Me;
use super::control::{Control, FanOut, FinalDoc, Manifest, PieceDone};
use super::{state_err, store_err};
use crate::diff::bounded::release_departures;
use crate::diff::export::{ProduceOptions, Stop, Summary};
use crate::diff::user::AudienceDepartures;
use crate::model::{DeliveryOutcome, UserDelta};
use crate::ops::report::{FanOutPiece, FanOutReport, RunReport, RunStatus};
use crate::run::handler::RunError;
use crate::run::runner::SyncRunner;
use crate::run::runner::committer::{Committer, Gate};
use crate::run::runner::sender::{Delivery, Sender};
use crate::state::ledger::{Ledger, LedgerStatus};
use crate::state::store::{Head, HeadDoc, StateStore, Watermark};

/// The pieces' figures added up: the combined report (departures not judged yet), the
/// departures the pieces counted per audience, rows without an identifier, and one line per
/// piece.
struct Combined {
    report: RunReport,
    audiences: Vec<AudienceDepartures>,
    without_id: u64,
    pieces: Vec<FanOutPiece>,
}

/// The fan-out's departures once sent: Braze's answers, the guard's totals, and the
/// committer holding what Braze confirmed (into the route head).
struct Released {
    delivery: Delivery,
    totals: Summary,
    committer: Committer,
}

impl SyncRunner {
    /// The finalizer (see the module docs).
    pub(super) async fn finalize(
        &self,
        fan: &FanOut<'_>,
        mut fin: FinalDoc,
        me: &Me,
        remaining_ms: Option<u64>,
        lost: watch::Receiver<Option<String>>,
    ) -> Result<Value, RunError> {
        let s = &self.settings;
        let manifest = fan.manifest;
        if fin.concluded {
            // An attempt recorded the ending and was cut short cleaning: only the clean is left.
            fan.control.clean(manifest.pieces.len(), false).await;
            return Ok(json!({
                "route": fan.route.name(), "run_id": manifest.run_id,
                "outcome": "fan_out_finished"}));
        }
        let dones = read_dones(fan.control, manifest).await?;
        let state = self.state(fan.route);
        let mut head = state.read_head().await.map_err(state_err)?;
        if !fin.merged {
            still_held(&lost)?;
            self.merge_pieces(fan, &state, &mut head, &mut fin, me)
                .await?;
        }
        let Combined {
            mut report,
            audiences,
            without_id,
            pieces,
        } = combine(fan, &dones);
        let totals = Summary {
            departures: audiences,
            rows_without_identifier: without_id,
            ..Summary::default()
        };
        let fin_id = format!("{}-final", manifest.run_id);
        let released = self
            .send_departures(
                fan,
                &dones,
                (state, head),
                totals,
                remaining_ms,
                lost.clone(),
            )
            .await?;
        let Released {
            delivery,
            totals,
            mut committer,
        } = released;
        report.apply_departures(&totals.departures, without_id);
        if let Some(e) = &committer.failure {
            return Err(RunError::Retryable(e.clone()));
        }
        if let Some(e) = &delivery.error {
            return Err(RunError::Retryable(format!(
                "sending the fan-out's departures: {e}"
            )));
        }
        if delivery.stats.users_unsent > 0 {
            return Err(RunError::Retryable(
                "the fan-out's departures were cut short; the finalizer is retried".into(),
            ));
        }
        report.users_sent += delivery.stats.users_sent;
        report.attributes_sent += delivery.stats.attributes_sent;
        report.users_confirmed += delivery.stats.users_confirmed;
        report.braze_rejected += delivery.stats.braze_rejected;
        report.requests += delivery.stats.requests;
        report
            .retries_by_cause
            .merge(&delivery.stats.retries_by_cause);
        report.http_429 += delivery.stats.http_429;
        let watermark = Watermark {
            export_id: manifest.export_id.clone(),
            exported_at: Some(manifest.exported_at.clone()),
        };
        // The watermark moves only under the fan-out's lock: one lost since, and the route
        // may be another run's (the finalizer's message is redelivered).
        still_held(&lost)?;
        let users = committer.users_before();
        if let Some(e) = committer
            .commit_ranged(
                users,
                &s.spill_dir,
                &format!("{fin_id}-commit"),
                Some(watermark),
            )
            .await
        {
            return Err(RunError::Retryable(e));
        }
        self.conclude_fan_out(fan, report, pieces, fin).await
    }

    /// Merges the forks into the route head and records it in `final.json`; a head that
    /// already is the merge (an attempt merged, then failed before recording it) is kept.
    /// Checkpoint segments a fork still names are a live attempt's, waited for, or a dead
    /// one's, folded into the fork first ([`SyncRunner::fork_heads`]).
    async fn merge_pieces(
        &self,
        fan: &FanOut<'_>,
        state: &StateStore,
        head: &mut Head,
        fin: &mut FinalDoc,
        me: &Me,
    ) -> Result<(), RunError> {
        let manifest = fan.manifest;
        if head.etag == manifest.route_head_etag {
            let forks = self.fork_heads(fan, state, Some(me)).await?;
            state.merge_forks(head, &forks).await.map_err(state_err)?;
        } else if !is_merge_of(&head.doc, &self.fork_heads(fan, state, None).await?) {
            return Err(RunError::Permanent {
                message: format!(
                    "the route's state changed since the fan-out began (head {:?}, expected {:?}): the pieces' work is not merged; replay the export",
                    head.etag, manifest.route_head_etag
                ),
                report: None,
            });
        }
        // Else a finalizer attempt merged, then failed before recording it (a 5xx on
        // `final.json`, killed): the route head already is the merge; go on from it.
        fin.merged = true;
        let body = Bytes::from(serde_json::to_vec(fin).unwrap_or_default());
        fan.control
            .put("final.json", body, PutCondition::None)
            .await
            .map_err(store_err)
    }

    /// Departures, judged on the export's totals; the removals the guard lets through are
    /// sent, the committer following Braze's answers into the route head. Memory: the
    /// pieces' removal files are streamed from S3 one after the other, each opened only
    /// when the previous one was read to its end and dropped (`release_departures` takes
    /// them from a lazy iterator and reads them in turn, record by record), so a departure
    /// day of any size costs the stream's buffers, never a whole piece's removals, let alone
    /// every piece's.
    async fn send_departures(
        &self,
        fan: &FanOut<'_>,
        dones: &[PieceDone],
        (state, head): (StateStore, Head),
        mut totals: Summary,
        remaining_ms: Option<u64>,
        lost: watch::Receiver<Option<String>>,
    ) -> Result<Released, RunError> {
        let s = &self.settings;
        let route = fan.route;
        let plan = fan.manifest.plan();
        let uris: Vec<S3Uri> = dones
            .iter()
            .filter(|d| d.departures_bytes > 0)
            .map(|d| {
                fan.control
                    .uri(&format!("{}/departures.bin", Control::piece_name(d.piece)))
            })
            .collect();
        let store = self.store.clone();
        let mut opts = ProduceOptions::for_route(route, &plan.trigger.to_string());
        opts.allow_departures = fan.manifest.allow_departures;
        // Removals -> committer's gate (intents) -> sender -> committer.
        let (delta_tx, delta_rx) = mpsc::channel::<UserDelta>(s.channel_capacity);
        let (send_tx, send_rx) = mpsc::channel::<UserDelta>(s.channel_capacity);
        let (out_tx, out_rx) = mpsc::channel::<DeliveryOutcome>(s.channel_capacity);
        let release_route = route.clone();
        let releasing = crate::clock::spawn_blocking(move |blocking| {
            let files = departure_streams(store, uris, blocking.clone());
            let r = release_departures(&mut totals, &release_route, &opts, files, &|d| {
                blocking
                    .block_on(delta_tx.send(d))
                    .map_err(|_| Stop("the sender stopped".into()))
            });
            r.map(|()| totals)
        });
        let mut dcfg = s.deliver.clone();
        dcfg.deadline = self.deadline(remaining_ms);
        let fin_id = format!("{}-final", fan.manifest.run_id);
        let share = self.workspace_share(route.name(), &fin_id);
        let sender = Sender::start(self.api.clone(), dcfg, send_rx, out_tx, share);
        let mut committer = Committer::new(state, head, route.clone(), s.checkpoint_every)
            .with_max_pending(s.checkpoint_max_users)
            .with_max_pending_bytes(crate::run::runner::sizing::pending_memory(
                s.memory_limit_bytes,
            ))
            .with_ahead(s.channel_capacity);
        // A lost route lock stops the sender and fails the committer (retried).
        committer
            .follow_gated(Gate::new(delta_rx, send_tx), out_rx, lost)
            .await;
        let delivery = sender.finish().await?;
        let totals = match releasing.await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) if e.is_retryable() => return Err(RunError::Retryable(e.to_string())),
            Ok(Err(e)) => {
                return Err(RunError::Permanent {
                    message: format!("releasing the fan-out's departures: {e}"),
                    report: None,
                });
            }
            Err(e) => {
                return Err(RunError::Retryable(format!(
                    "the departures task failed: {e}"
                )));
            }
        };
        Ok(Released {
            delivery,
            totals,
            committer,
        })
    }

    /// The fan-out's end once its state is committed: its status, the combined report, its
    /// metrics, the ledger entry completed, the control objects deleted.
    async fn conclude_fan_out(
        &self,
        fan: &FanOut<'_>,
        mut report: RunReport,
        pieces: Vec<FanOutPiece>,
        fin: FinalDoc,
    ) -> Result<Value, RunError> {
        let s = &self.settings;
        let store = self.store.as_ref();
        let (route, manifest) = (fan.route, fan.manifest);
        let n = manifest.pieces.len();
        report.status = if report.braze_rejected > 0 || report.users_unconfirmed > 0 {
            RunStatus::Incomplete
        } else if report.departures_held > 0 {
            RunStatus::DeparturesHeld
        } else {
            RunStatus::Complete
        };
        report.fan_out = Some(FanOutReport {
            pieces: n,
            piece_reports: pieces,
        });
        let report_uri = self.report_uri(route.name(), &manifest.run_id);
        let now = crate::clock::now();
        report.finished_at = Some(now.to_rfc3339());
        // The whole fan-out, from the coordinator's start.
        report.duration_s = manifest
            .started_at
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map_or(0.0, |t| {
                (now - t.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0
            });
        if let Err(e) = report.put(store, &report_uri).await {
            return Err(RunError::Retryable(format!(
                "writing the combined report {report_uri}: {e}"
            )));
        }
        report.emit_metrics();
        let ledger_status = match report.status {
            RunStatus::Complete => LedgerStatus::Complete,
            _ => LedgerStatus::Incomplete,
        };
        Ledger::for_route(store, &s.state_bucket, &s.state_prefix, route.name())
            .finish_fan_out(
                &manifest.export_id,
                &manifest.run_id,
                ledger_status,
                Some(report_uri.to_string()),
            )
            .await
            .map_err(|e| RunError::Retryable(e.to_string()))?;
        // A clean cut short leaves this ending standing: a later run that finds the control
        // objects deletes them without writing over the report or the ledger entry.
        let fin = FinalDoc {
            concluded: true,
            ..fin
        };
        let body = Bytes::from(serde_json::to_vec(&fin).unwrap_or_default());
        if let Err(e) = fan
            .control
            .put("final.json", body, PutCondition::None)
            .await
        {
            warn!(route = route.name(), error = %e, "Could not record the fan-out's ending in final.json; its clean goes on.");
        }
        fan.control.clean(n, false).await;
        info!(route = route.name(), run_id = %manifest.run_id, status = ?report.status, users_sent = report.users_sent, "Fan-out finished.");
        Ok(json!({
            "route": route.name(), "run_id": manifest.run_id, "outcome": "fan_out_finished",
            "status": report.status, "report": report_uri.to_string(),
            "summary": {"rows_in": report.rows_in, "users_sent": report.users_sent,
                        "unchanged": report.unchanged, "rejected": report.rejected,
                        "departures_sent": report.departures_sent,
                        "departures_held": report.departures_held, "pieces": n}}))
    }
}

/// `Ok` while the fan-out's route lock is held; once a renewal found it taken over, the
/// finalizer stops before its next write to the route's state (its message is retried).
fn still_held(lost: &watch::Receiver<Option<String>>) -> Result<(), RunError> {
    match lost.borrow().clone() {
        None => Ok(()),
        Some(why) => Err(RunError::Retryable(format!(
            "the fan-out's route lock was lost ({why}); the finalizer stops before writing the state"
        ))),
    }
}

/// Every piece's `done.json`, in piece order; one missing is retried.
async fn read_dones(control: &Control, manifest: &Manifest) -> Result<Vec<PieceDone>, RunError> {
    let n = manifest.pieces.len();
    let mut dones = Vec::with_capacity(n);
    for k in 0..n {
        let name = Control::piece_name(k);
        match control
            .get_json::<PieceDone>(&format!("{name}/done.json"))
            .await?
        {
            Some(d) => dones.push(d),
            None => {
                return Err(RunError::Retryable(format!(
                    "fan-out {}: piece {k} has no done.json yet",
                    manifest.run_id
                )));
            }
        }
    }
    Ok(dones)
}

/// The pieces' figures added up into the fan-out's report (pure).
fn combine(fan: &FanOut<'_>, dones: &[PieceDone]) -> Combined {
    let manifest = fan.manifest;
    let plan = manifest.plan();
    let mut report = RunReport::new(&manifest.run_id, fan.route.name());
    report.export_id = Some(manifest.export_id.clone());
    report.sources = plan
        .parts
        .iter()
        .map(|p| S3Uri::new(&plan.trigger.bucket, &p.key).to_string())
        .collect();
    report.exported_at = Some(manifest.exported_at.clone());
    report.started_at = manifest.started_at.clone();
    report.notes = manifest.notes.clone();
    let mut audiences: Vec<AudienceDepartures> = Vec::new();
    let mut without_id = 0;
    let mut pieces = Vec::with_capacity(dones.len());
    for d in dones {
        let r = &d.report;
        add_piece(&mut report, r);
        without_id += r.rows_without_identifier;
        for note in &r.notes {
            report.notes.push(format!("piece {}: {note}", d.piece));
        }
        count_departures(&mut audiences, &r.departures);
        let span = manifest.span(d.piece).unwrap_or(0..0);
        pieces.push(FanOutPiece {
            piece: d.piece,
            range_start: span.start,
            range_end: span.end,
            users_sent: r.users_sent,
            users_confirmed: r.users_confirmed,
            unchanged: r.unchanged,
            requests: r.requests,
            http_429: r.http_429,
            rejects_object: r.rejects_object.clone(),
        });
    }
    let rejects: Vec<&String> = pieces
        .iter()
        .filter_map(|p| p.rejects_object.as_ref())
        .collect();
    if rejects.len() == 1 {
        report.rejects_object = rejects.first().map(|r| (*r).clone());
    } else if rejects.len() > 1 {
        report.notes.push(format!(
            "rejected rows are in {} objects, one per piece (fan_out.piece_reports)",
            rejects.len()
        ));
    }
    Combined {
        report,
        audiences,
        without_id,
        pieces,
    }
}

/// One piece's figures added to the fan-out's report (pure).
fn add_piece(report: &mut RunReport, r: &RunReport) {
    report.rows_in += r.rows_in;
    report.rejected += r.rejected;
    report.unchanged += r.unchanged;
    report.digests_recorded += r.digests_recorded;
    report.users_sent += r.users_sent;
    report.attributes_sent += r.attributes_sent;
    report.users_confirmed += r.users_confirmed;
    report.braze_rejected += r.braze_rejected;
    report.users_unsent += r.users_unsent;
    report.users_unconfirmed += r.users_unconfirmed;
    report.unconfirmed_requests += r.unconfirmed_requests;
    report.http_429 += r.http_429;
    report.requests += r.requests;
    report.retries_by_cause.merge(&r.retries_by_cause);
    report.send_duration_s = report.send_duration_s.max(r.send_duration_s);
    report.workspace_senders = report.workspace_senders.max(r.workspace_senders);
    report.rate_limit_configured_rps = r.rate_limit_configured_rps;
}

/// One piece's departure counts added to the export's, per audience; what was sent or held
/// is judged later, on the totals (pure).
fn count_departures(audiences: &mut Vec<AudienceDepartures>, piece: &[AudienceDepartures]) {
    for a in piece {
        match audiences.iter_mut().find(|x| x.audience == a.audience) {
            Some(x) => {
                x.members_before += a.members_before;
                x.leaving += a.leaving;
            }
            None => {
                let mut x = a.clone();
                x.sent = 0;
                x.held = 0;
                x.held_because = None;
                x.released = false;
                audiences.push(x);
            }
        }
    }
}

/// The pieces' removal files as a lazy iterator of streams: each object is opened (a
/// streamed GET) only when the iterator is advanced, so its consumer holds one at a time. A
/// file that cannot be opened reads as an I/O error naming it (retryable: the finalizer is
/// redelivered). Blocking: call from a blocking thread.
fn departure_streams(
    store: Arc<dyn ObjectStore>,
    uris: Vec<S3Uri>,
    blocking: crate::clock::Blocking,
) -> impl Iterator<Item = (String, Box<dyn std::io::Read + Send>)> + Send {
    uris.into_iter().map(move |uri| {
        let r: Box<dyn std::io::Read + Send> = match blocking.block_on(store.get_reader(&uri)) {
            Ok((_, r)) => Box::new(crate::diff::in_memory::blocking_reader(r, &blocking)),
            Err(e) => {
                let message = format!("opening {uri}: {e}");
                Box::new(FailedOpen(Some(message)))
            }
        };
        (uri.to_string(), r)
    })
}

/// A departure file that could not be opened: its first read fails with why.
struct FailedOpen(Option<String>);

impl std::io::Read for FailedOpen {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other(
            self.0
                .take()
                .unwrap_or_else(|| "could not be opened".into()),
        ))
    }
}

/// Whether `head` already holds the forks' work: every range of every span is the fork's
/// (a finalizer merged, then died before recording it), and no export was applied since the
/// forks were made (a merge keeps the watermark and applied exports the forks copied) (pure).
fn is_merge_of(head: &HeadDoc, forks: &[(Range<usize>, HeadDoc)]) -> bool {
    forks.iter().all(|(span, f)| {
        f.range_bits == head.range_bits
            && f.ranges.len() == head.ranges.len()
            && f.watermark == head.watermark
            && f.applied_exports == head.applied_exports
            && span.clone().all(|r| head.ranges.get(r) == f.ranges.get(r))
    })
}
