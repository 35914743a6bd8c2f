//! The head pointer: reading `head.json`, replacing it with a conditional write, and
//! deleting only objects no head names.

use super::*;
use crate::state::retrying::{ATTEMPTS, transient};

impl StateStore {
    /// Reads the head (an empty one when the route has no state yet).
    pub async fn read_head(&self) -> Result<Head, StateError> {
        let uri = self.head_uri();
        match self.store.get(&uri).await {
            Ok((meta, bytes)) => {
                let doc: HeadDoc =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::BadHead {
                        uri: uri.clone(),
                        reason: e.to_string(),
                    })?;
                if doc.format != HEAD_FORMAT && doc.format != LEGACY_HEAD_FORMAT {
                    return Err(StateError::BadHead {
                        uri,
                        reason: format!(
                            "head format {} is not {LEGACY_HEAD_FORMAT} or {HEAD_FORMAT}",
                            doc.format
                        ),
                    });
                }
                if !doc.ranges.is_empty()
                    && (doc.range_bits > MAX_RANGE_BITS
                        || doc.ranges.len() != 1usize << doc.range_bits)
                {
                    return Err(StateError::BadHead {
                        uri,
                        reason: format!(
                            "{} ranges do not match range_bits {}",
                            doc.ranges.len(),
                            doc.range_bits
                        ),
                    });
                }
                Ok(Head {
                    doc,
                    etag: Some(meta.etag),
                    loaded_segments: 0,
                })
            }
            Err(StoreError::NotFound { .. }) => Ok(Head {
                doc: HeadDoc {
                    format: HEAD_FORMAT,
                    route: self.route.clone(),
                    ..HeadDoc::default()
                },
                etag: None,
                loaded_segments: 0,
            }),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn put_head(&self, head: &mut Head, doc: HeadDoc) -> Result<(), StateError> {
        let uri = self.head_uri();
        let body = serde_json::to_vec_pretty(&doc).map_err(|e| StateError::BadHead {
            uri: uri.clone(),
            reason: e.to_string(),
        })?;
        let cond = match &head.etag {
            Some(e) => PutCondition::IfMatch(e.clone()),
            None => PutCondition::IfAbsent,
        };
        let body = Bytes::from(body);
        let mut attempt = 1;
        loop {
            let put = self
                .store
                .put(&uri, body.clone(), cond.clone(), BTreeMap::new())
                .await;
            let (failed, transient) = match put {
                Ok(meta) => {
                    head.etag = Some(meta.etag);
                    head.doc = doc;
                    return Ok(());
                }
                Err(StoreError::PreconditionFailed { .. }) => {
                    (StateError::Conflict { uri: uri.clone() }, false)
                }
                Err(e) => {
                    let transient = transient(&e);
                    (e.into(), transient)
                }
            };
            // A timeout can hide a write that landed (and a retry of it then meets 412): the
            // head as it is now decides. When it is this very document, the write happened;
            // when it is still the head we wrote over, it never landed and is tried again
            // (the same condition keeps out anyone who moved it meanwhile).
            match self.read_head().await {
                Ok(now) if now.doc == doc => {
                    head.etag = now.etag;
                    head.doc = doc;
                    return Ok(());
                }
                Ok(now) if transient && now.etag == head.etag && attempt < ATTEMPTS => {
                    attempt += 1;
                }
                _ => return Err(failed),
            }
        }
    }

    /// Every object a head document names (bases, range deltas, checkpoint segments).
    pub(super) fn named_by(doc: &HeadDoc) -> std::collections::BTreeSet<&str> {
        doc.base
            .iter()
            .chain(doc.segments.iter())
            .chain(
                doc.ranges
                    .iter()
                    .flat_map(|r| r.base.iter().chain(r.deltas.iter())),
            )
            .map(String::as_str)
            .collect()
    }

    /// After a head write that failed, deletes what it wrote, except anything the head names
    /// as it is read now (the write may have landed, its answer lost, and another run built on
    /// it). When the head cannot be read, nothing is deleted: an unreferenced object is only
    /// garbage, a missing one breaks every later load.
    pub(super) async fn delete_unnamed(&self, written: &[String]) {
        let Ok(now) = self.read_head().await else {
            return;
        };
        let named = Self::named_by(&now.doc);
        let unnamed: Vec<String> = written
            .iter()
            .filter(|n| !named.contains(n.as_str()))
            .cloned()
            .collect();
        self.delete_all(&unnamed).await;
    }

    /// Deletes `names`, except anything the head names as it is read now (best effort; when
    /// the head cannot be read, nothing): for objects a run wrote and no longer needs.
    pub async fn delete_unreferenced(&self, names: &[String]) {
        self.delete_unnamed(names).await;
    }

    /// The end of both commits: stamps the new head (generation, the users counted in
    /// `objects`, the export applied and, unless stale, its watermark), writes it with one
    /// conditional put and deletes what it replaced; on a failed put, deletes what this commit
    /// wrote instead (unless the head names it: the answer may have been lost).
    pub(super) async fn publish(
        &self,
        head: &mut Head,
        mut doc: HeadDoc,
        generation: u64,
        export: Option<Watermark>,
        objects: CommitObjects,
    ) -> Result<CommitStats, StateError> {
        let CommitObjects {
            written,
            replaced,
            mut stats,
        } = objects;
        // A fork deletes only what it wrote: the route head still points to what it inherited.
        let old: Vec<String> = replaced.into_iter().filter(|n| self.owns(n)).collect();
        doc.format = HEAD_FORMAT;
        doc.generation = generation;
        doc.users = stats.users;
        doc.segments.clear();
        if let Some(w) = export {
            doc.applied_exports.retain(|e| *e != w.export_id);
            doc.applied_exports.push(w.export_id.clone());
            let excess = doc
                .applied_exports
                .len()
                .saturating_sub(APPLIED_EXPORTS_KEPT);
            doc.applied_exports.drain(..excess);
            if !head.is_stale(w.exported_at.as_deref()) {
                doc.watermark = Some(w);
            }
        }
        doc.updated_at = crate::clock::now().to_rfc3339();
        stats.ranges = doc.ranges.len();
        stats.state_bytes = doc.state_bytes();
        if let Err(e) = self.put_head(head, doc).await {
            self.delete_unnamed(&written).await;
            return Err(e);
        }
        head.loaded_segments = 0;
        self.delete_all(&old).await;
        Ok(stats)
    }

    pub(super) async fn delete_all(&self, names: &[String]) {
        for n in names {
            if let Err(e) = self.store.delete(&self.uri(n)).await {
                tracing::warn!(object = %self.uri(n), error = %e, "Could not delete an old state object.");
            }
        }
    }
}
