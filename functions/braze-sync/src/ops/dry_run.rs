//! `braze-sync run ... --dry-run --summary`: instead of every payload, per Braze attribute how
//! many users would get a new value, have it removed, or keep it, plus a few example payloads.
//! [`DiffView`] is the pure aggregation over the deltas the producer yields;
//! [`dry_run_summary`] runs the producer into it; [`DiffSummary::render`] draws the table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};

use serde::Serialize;
use serde_json::Value;

use crate::config::route::Route;
use crate::diff::export::{Part, ProduceOptions, Summary, SyncError};
use crate::diff::in_memory::{ndjson_rejects, produce_unsent};
use crate::model::UserDelta;
use crate::state::confirmed::Snapshot;

/// Example payloads kept.
pub const EXAMPLES: usize = 5;

/// One attribute's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct AttributeCounts {
    /// Users who would get a new value.
    pub changed: u64,
    /// Users whose value would be removed (sent as `null`).
    pub removed: u64,
    /// Users of the export whose value stays as Braze last confirmed it.
    pub unchanged: u64,
}

/// The dry run's summary view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffSummary {
    /// Per Braze attribute, in the route's order.
    pub attributes: Vec<(String, AttributeCounts)>,
    /// Attribute objects that would be sent.
    pub payloads: u64,
    /// The first [`EXAMPLES`] of them.
    pub examples: Vec<Value>,
    /// The producer's summary (rows read, rejected, unchanged users, departures...).
    pub summary: Summary,
}

/// Counts deltas per attribute as they come.
#[derive(Debug, Default)]
pub struct DiffView {
    counts: BTreeMap<String, (u64, u64)>,
    payloads: u64,
    examples: Vec<Value>,
}

impl DiffView {
    /// Accounts for one user's delta.
    pub fn add(&mut self, d: &UserDelta) {
        self.payloads += 1;
        for c in &d.changes {
            let e = self.counts.entry(c.name.clone()).or_default();
            if c.fingerprint.is_none() {
                e.1 += 1;
            } else {
                e.0 += 1;
            }
        }
        if self.examples.len() < EXAMPLES {
            self.examples.push(d.to_attribute_object());
        }
    }

    /// The summary: `attributes` in the route's order (others, e.g. standard fields named
    /// differently, after them); unchanged = the export's accepted rows less the users whose
    /// attribute changes or goes (departing users are counted in changed/removed).
    pub fn finish(self, attributes: &[String], summary: Summary) -> DiffSummary {
        let users = summary.rows_read.saturating_sub(summary.rejected);
        let mut counts = self.counts;
        let mut names: Vec<String> = attributes.to_vec();
        names.extend(counts.keys().filter(|k| !attributes.contains(k)).cloned());
        let attributes = names
            .into_iter()
            .map(|n| {
                let (changed, removed) = counts.remove(&n).unwrap_or_default();
                let unchanged = users.saturating_sub(changed + removed);
                (
                    n,
                    AttributeCounts {
                        changed,
                        removed,
                        unchanged,
                    },
                )
            })
            .collect();
        DiffSummary {
            attributes,
            payloads: self.payloads,
            examples: self.examples,
            summary,
        }
    }
}

impl DiffSummary {
    /// The table and the examples, for a terminal.
    pub fn render(&self) -> String {
        let s = &self.summary;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Dry run: {} rows read, {} rejected; {} users would be sent ({} new), {} unchanged; nothing sent.",
            s.rows_read, s.rejected, self.payloads, s.users_new, s.unchanged
        );
        let width = self
            .attributes
            .iter()
            .map(|(n, _)| n.len())
            .max()
            .unwrap_or(9)
            .max(9);
        let _ = writeln!(
            out,
            "  {:<width$} {:>10} {:>10} {:>10}",
            "attribute", "change", "remove", "unchanged"
        );
        for (name, c) in &self.attributes {
            let _ = writeln!(
                out,
                "  {name:<width$} {:>10} {:>10} {:>10}",
                c.changed, c.removed, c.unchanged
            );
        }
        let _ = writeln!(
            out,
            "Example payloads ({} of {}):",
            self.examples.len(),
            self.payloads
        );
        for e in &self.examples {
            let _ = writeln!(out, "  {e}");
        }
        out
    }
}

/// Runs the producer over `parts` without sending, into a [`DiffSummary`]; rejected rows
/// go to `rejects` as NDJSON like the full dry run.
pub fn dry_run_summary<I, R>(
    parts: I,
    route: &Route,
    snapshot: &Snapshot,
    opts: &ProduceOptions,
    rejects: &mut dyn Write,
) -> Result<DiffSummary, SyncError>
where
    I: IntoIterator<Item = Result<Part<R>, SyncError>>,
    R: Read,
{
    let mut view = DiffView::default();
    let summary = produce_unsent(
        parts,
        route,
        snapshot,
        opts,
        &mut |d| {
            view.add(&d);
            Ok(())
        },
        &mut ndjson_rejects(rejects),
    )?;
    Ok(view.finish(&route.slot_names(), summary))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{AttributeChange, Identifier, RowPos};
    use serde_json::json;

    fn delta(id: &str, changes: &[(&str, Value)]) -> UserDelta {
        UserDelta {
            identifier: Identifier::ExternalId(id.into()),
            pos: RowPos::default(),
            changes: changes
                .iter()
                .map(|(n, v)| AttributeChange {
                    name: n.to_string(),
                    value: v.clone(),
                    fingerprint: (!v.is_null()).then_some(Default::default()),
                })
                .collect(),
            update_existing_only: false,
            is_new: false,
            row_digest: None,
        }
    }

    #[test]
    fn counts_change_remove_and_unchanged_per_attribute_with_five_examples() {
        let mut v = DiffView::default();
        for i in 0..7 {
            v.add(&delta(&format!("u{i}"), &[("ltv", json!(i))]));
        }
        v.add(&delta(
            "u7",
            &[("ltv", Value::Null), ("tier", json!("gold"))],
        ));
        v.add(&delta("u8", &[("tier", Value::Null)]));
        let s = v.finish(
            &["ltv".into(), "tier".into(), "vip".into()],
            Summary {
                rows_read: 20,
                rejected: 2,
                ..Summary::default()
            },
        );
        let by: BTreeMap<&str, AttributeCounts> =
            s.attributes.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        let c = |changed, removed, unchanged| AttributeCounts {
            changed,
            removed,
            unchanged,
        };
        assert_eq!(by["ltv"], c(7, 1, 10));
        assert_eq!(by["tier"], c(1, 1, 16));
        assert_eq!(by["vip"], c(0, 0, 18));
        assert_eq!(s.payloads, 9);
        assert_eq!(s.examples.len(), EXAMPLES);
        assert_eq!(s.examples[0]["external_id"], "u0");
        let text = s.render();
        assert!(text.contains("9 users would be sent"), "{text}");
        let ltv = text
            .lines()
            .find(|l| l.trim_start().starts_with("ltv"))
            .unwrap();
        let cols: Vec<&str> = ltv.split_whitespace().collect();
        assert_eq!(cols, ["ltv", "7", "1", "10"]);
        assert!(text.contains("Example payloads (5 of 9):"), "{text}");
    }
}
