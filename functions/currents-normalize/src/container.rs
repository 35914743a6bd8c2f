//! Reading Avro object container files: the header (magic, metadata, writer schema, codec,
//! sync marker), the data blocks with their sync markers, and the `null`, `deflate` and
//! `snappy` codecs (any other is refused). The records inside each block are decoded by
//! `arrow-avro` ([`crate::normalize`]); this framing stays here because `arrow-avro`'s own
//! container reader inflates a block without any bound (`read_to_end`), so it could not keep
//! the per-block and per-object decompression limits, nor name the block that failed.
//! Every length read from the file is checked against what is actually there and against
//! [`Limits`] before anything is allocated, so a corrupt or hostile file fails with a
//! positioned error instead of exhausting memory.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;

use crate::datum::{Cursor, DatumError};

/// The four bytes every container file starts with.
pub const MAGIC: &[u8; 4] = b"Obj\x01";
const SYNC_LEN: usize = 16;

/// Default for [`Limits::max_object_decompressed_bytes`]: 2 GiB, four times the largest
/// object accepted (`MAX_OBJECT_BYTES`, 512 MiB), so an object costs at most a few times the
/// work of the largest uncompressed one however much it inflates.
pub const DEFAULT_MAX_OBJECT_DECOMPRESSED_BYTES: u64 = 2 << 30;

/// Size guards for one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest header (metadata) in bytes.
    pub max_header_bytes: usize,
    /// Largest block after decompression, in bytes.
    pub max_block_bytes: usize,
    /// Most records one block may claim.
    pub max_block_records: u64,
    /// Largest total of all blocks after decompression, in bytes: bounds the work a small
    /// object that inflates many times over (deflate) can cause, not only each block.
    pub max_object_decompressed_bytes: u64,
    /// Most array items and map entries in one record (`null` items cost no input bytes, so
    /// the count is not bounded by the data).
    pub max_record_items: u64,
    /// Most array items and map entries in the whole file.
    pub max_file_items: u64,
    /// Largest JSON text one record's arrays, maps, records and unknown fields render to.
    pub max_record_json_bytes: u64,
    /// Largest total of rendered JSON text in the whole file.
    pub max_file_json_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 << 20,
            max_block_bytes: 256 << 20,
            max_block_records: 10_000_000,
            max_object_decompressed_bytes: DEFAULT_MAX_OBJECT_DECOMPRESSED_BYTES,
            max_record_items: 1_000_000,
            max_file_items: 100_000_000,
            max_record_json_bytes: 16 << 20,
            max_file_json_bytes: 1 << 30,
        }
    }
}

/// The compression codec of a file's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Uncompressed (also what a file without `avro.codec` uses).
    Null,
    /// Raw deflate (RFC 1951).
    Deflate,
    /// Snappy with a trailing big-endian CRC32 of the uncompressed block.
    Snappy,
}

impl Codec {
    /// The codec's name as the header spells it.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Null => "null",
            Codec::Deflate => "deflate",
            Codec::Snappy => "snappy",
        }
    }
}

/// Why a container file cannot be read. Offsets are byte positions in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The object does not start with the Avro magic.
    #[error("not an Avro object container file (first bytes {0:02x?})")]
    NotAvro(Vec<u8>),
    /// The file ends before a complete header or block.
    #[error("file is truncated at byte {offset}: {what}")]
    Truncated {
        /// Where the missing bytes should have been.
        offset: usize,
        /// What was being read.
        what: &'static str,
    },
    /// The header is malformed.
    #[error("bad header at byte {offset}: {reason}")]
    BadHeader {
        /// Where.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
    /// The header names a codec this reader does not support.
    #[error("unsupported codec {0:?} (supported: null, deflate, snappy)")]
    UnsupportedCodec(String),
    /// The header has no `avro.schema`.
    #[error("header has no avro.schema")]
    NoSchema,
    /// A block's trailing sync marker differs from the header's.
    #[error("block {block} at byte {offset}: sync marker does not match the header's")]
    BadSync {
        /// Block number, from 0.
        block: usize,
        /// Where the marker is.
        offset: usize,
    },
    /// A block claims a size or record count beyond the limits or beyond the file.
    #[error("block {block} at byte {offset}: {reason}")]
    BlockTooLarge {
        /// Block number, from 0.
        block: usize,
        /// Where the block starts.
        offset: usize,
        /// Which claim is absurd.
        reason: String,
    },
    /// The blocks together decompress to more than the object limit.
    #[error(
        "block {block} at byte {offset}: the object decompresses to more than {limit} bytes in total (limit per object, max_object_decompressed_bytes)"
    )]
    ObjectTooLarge {
        /// Block number at which the total went over.
        block: usize,
        /// Where that block starts.
        offset: usize,
        /// The limit.
        limit: u64,
    },
    /// A block does not decompress.
    #[error("block {block} at byte {offset}: {codec} data is corrupt: {reason}")]
    Codec {
        /// Block number.
        block: usize,
        /// Where the block starts.
        offset: usize,
        /// Codec name.
        codec: &'static str,
        /// The decompressor's message.
        reason: String,
    },
}

/// A container file's header and the position of its first block.
#[derive(Debug, Clone)]
pub struct Container<'a> {
    /// The writer schema JSON (`avro.schema`).
    pub schema_json: &'a str,
    /// The block codec.
    pub codec: Codec,
    /// Every metadata entry (including `avro.schema` and `avro.codec`).
    pub metadata: BTreeMap<String, &'a [u8]>,
    sync: [u8; SYNC_LEN],
    bytes: &'a [u8],
    data_start: usize,
    limits: Limits,
}

/// One data block: how many records it claims and its (decompressed) bytes.
#[derive(Debug)]
pub struct Block<'a> {
    /// Block number, from 0.
    pub index: usize,
    /// Byte offset of the block in the file.
    pub offset: usize,
    /// Records the block claims to hold.
    pub count: u64,
    /// The records' bytes, borrowed for the null codec.
    pub data: Cow<'a, [u8]>,
}

impl<'a> Container<'a> {
    /// Reads the header of a container file held in memory.
    pub fn open(bytes: &'a [u8], limits: Limits) -> Result<Self, DecodeError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(DecodeError::NotAvro(
                bytes.iter().take(4).copied().collect(),
            ));
        }
        let mut c = Cursor::at(bytes, MAGIC.len());
        let mut metadata = BTreeMap::new();
        let header_err = |c: &Cursor<'_>, e: DatumError| match e {
            DatumError::Eof => DecodeError::Truncated {
                offset: c.pos,
                what: "header",
            },
            other => DecodeError::BadHeader {
                offset: c.pos,
                reason: other.to_string(),
            },
        };
        loop {
            let mut count = c.read_long().map_err(|e| header_err(&c, e))?;
            if count == 0 {
                break;
            }
            if count < 0 {
                count = count.checked_neg().ok_or_else(|| DecodeError::BadHeader {
                    offset: c.pos,
                    reason: "metadata block count out of range".into(),
                })?;
                c.read_long().map_err(|e| header_err(&c, e))?;
            }
            for _ in 0..count {
                let key = c.read_str().map_err(|e| header_err(&c, e))?;
                let value = c.read_bytes().map_err(|e| header_err(&c, e))?;
                metadata.insert(key.to_string(), value);
                if c.pos > limits.max_header_bytes {
                    return Err(DecodeError::BadHeader {
                        offset: c.pos,
                        reason: format!("header larger than {} bytes", limits.max_header_bytes),
                    });
                }
            }
        }
        let sync_bytes = c.take(SYNC_LEN).map_err(|_| DecodeError::Truncated {
            offset: c.pos,
            what: "header sync marker",
        })?;
        let mut sync = [0u8; SYNC_LEN];
        sync.copy_from_slice(sync_bytes);
        let codec = match metadata.get("avro.codec").copied() {
            None | Some(b"null") | Some(b"") => Codec::Null,
            Some(b"deflate") => Codec::Deflate,
            Some(b"snappy") => Codec::Snappy,
            Some(other) => {
                return Err(DecodeError::UnsupportedCodec(
                    String::from_utf8_lossy(other).into_owned(),
                ));
            }
        };
        let schema_bytes = metadata
            .get("avro.schema")
            .copied()
            .ok_or(DecodeError::NoSchema)?;
        let schema_json =
            std::str::from_utf8(schema_bytes).map_err(|_| DecodeError::BadHeader {
                offset: 0,
                reason: "avro.schema is not UTF-8".into(),
            })?;
        Ok(Self {
            schema_json,
            codec,
            metadata,
            sync,
            bytes,
            data_start: c.pos,
            limits,
        })
    }

    /// The size guards this file is read with.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The data blocks in order. Stops at the first error.
    pub fn blocks(&self) -> Blocks<'a, '_> {
        Blocks {
            container: self,
            pos: self.data_start,
            index: 0,
            failed: false,
            decompressed: 0,
        }
    }
}

/// Iterator over a container's blocks.
pub struct Blocks<'a, 'c> {
    container: &'c Container<'a>,
    pos: usize,
    index: usize,
    failed: bool,
    /// Decompressed bytes of the blocks read so far.
    decompressed: u64,
}

impl<'a> Iterator for Blocks<'a, '_> {
    type Item = Result<Block<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.container.bytes.len() {
            return None;
        }
        let r = self.read_block();
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }
}

impl<'a> Blocks<'a, '_> {
    fn read_block(&mut self) -> Result<Block<'a>, DecodeError> {
        let bytes = self.container.bytes;
        let limits = self.container.limits;
        let start = self.pos;
        let block = self.index;
        let mut c = Cursor::at(bytes, start);
        let too_large = |reason: String| DecodeError::BlockTooLarge {
            block,
            offset: start,
            reason,
        };
        let framing = |c: &Cursor<'_>, e: DatumError| match e {
            DatumError::Eof => DecodeError::Truncated {
                offset: c.pos,
                what: "block header",
            },
            other => too_large(other.to_string()),
        };
        let count = c.read_long().map_err(|e| framing(&c, e))?;
        let size = c.read_long().map_err(|e| framing(&c, e))?;
        if count < 0 || size < 0 {
            return Err(too_large(format!(
                "negative record count {count} or size {size}"
            )));
        }
        let count = count as u64;
        if count > limits.max_block_records {
            return Err(too_large(format!(
                "claims {count} records (limit {})",
                limits.max_block_records
            )));
        }
        let size = size as u64;
        let remaining = (bytes.len() - c.pos) as u64;
        if size > remaining {
            return Err(DecodeError::Truncated {
                offset: bytes.len(),
                what: if size > limits.max_block_bytes as u64 {
                    "block data (the block claims more bytes than the file has)"
                } else {
                    "block data"
                },
            });
        }
        let raw = c.take(size as usize).map_err(|e| framing(&c, e))?;
        let sync_at = c.pos;
        let sync = c.take(SYNC_LEN).map_err(|_| DecodeError::Truncated {
            offset: sync_at,
            what: "block sync marker",
        })?;
        if sync != self.container.sync {
            return Err(DecodeError::BadSync {
                block,
                offset: sync_at,
            });
        }
        // What this block may still inflate to: its own limit, and what is left of the object's.
        let object_left = limits
            .max_object_decompressed_bytes
            .saturating_sub(self.decompressed);
        let block_limit = (limits.max_block_bytes as u64).min(object_left) as usize;
        let object_bound = block_limit < limits.max_block_bytes;
        let over_object = || DecodeError::ObjectTooLarge {
            block,
            offset: start,
            limit: limits.max_object_decompressed_bytes,
        };
        if object_bound && self.container.codec == Codec::Null && raw.len() > block_limit {
            return Err(over_object());
        }
        let data =
            decompress(self.container.codec, raw, block_limit).map_err(|reason| match reason {
                CodecFailure::TooLarge(_) if object_bound => over_object(),
                CodecFailure::TooLarge(n) => too_large(format!(
                    "decompresses to more than {n} bytes (limit {})",
                    limits.max_block_bytes
                )),
                CodecFailure::Corrupt(reason) => DecodeError::Codec {
                    block,
                    offset: start,
                    codec: self.container.codec.name(),
                    reason,
                },
            })?;
        if count > data.len() as u64 && count > 0 {
            // Every Currents record carries at least an id, so a record is at least one byte;
            // a block claiming more records than bytes is lying about its count.
            return Err(too_large(format!(
                "claims {count} records in {} bytes",
                data.len()
            )));
        }
        self.decompressed = self.decompressed.saturating_add(data.len() as u64);
        self.pos = c.pos;
        self.index += 1;
        Ok(Block {
            index: block,
            offset: start,
            count,
            data,
        })
    }
}

enum CodecFailure {
    TooLarge(usize),
    Corrupt(String),
}

fn decompress(codec: Codec, raw: &[u8], limit: usize) -> Result<Cow<'_, [u8]>, CodecFailure> {
    match codec {
        Codec::Null => Ok(Cow::Borrowed(raw)),
        Codec::Deflate => {
            let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(limit));
            let mut dec = flate2::read::DeflateDecoder::new(raw).take(limit as u64 + 1);
            dec.read_to_end(&mut out)
                .map_err(|e| CodecFailure::Corrupt(e.to_string()))?;
            if out.len() > limit {
                return Err(CodecFailure::TooLarge(limit));
            }
            Ok(Cow::Owned(out))
        }
        Codec::Snappy => {
            let data_end = raw
                .len()
                .checked_sub(4)
                .ok_or_else(|| CodecFailure::Corrupt("block shorter than its CRC".into()))?;
            let (data, crc) = raw.split_at(data_end);
            let len = snap::raw::decompress_len(data)
                .map_err(|e| CodecFailure::Corrupt(e.to_string()))?;
            if len > limit {
                return Err(CodecFailure::TooLarge(limit));
            }
            let mut out = vec![0u8; len];
            let n = snap::raw::Decoder::new()
                .decompress(data, &mut out)
                .map_err(|e| CodecFailure::Corrupt(e.to_string()))?;
            out.truncate(n);
            let expected = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
            let actual = crc32fast::hash(&out);
            if expected != actual {
                return Err(CodecFailure::Corrupt(format!(
                    "CRC32 mismatch (expected {expected:08x}, got {actual:08x})"
                )));
            }
            Ok(Cow::Owned(out))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use apache_avro::types::Value as AvroValue;
    use apache_avro::{Schema, Writer};

    fn file(codec: apache_avro::Codec, n: usize) -> Vec<u8> {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[{"name":"id","type":"string"}]}"#,
        )
        .unwrap();
        let mut w = Writer::with_codec(&schema, Vec::new(), codec).unwrap();
        for i in 0..n {
            w.append_value(AvroValue::Record(vec![(
                "id".into(),
                AvroValue::String(format!("e{i}")),
            )]))
            .unwrap();
        }
        w.into_inner().unwrap()
    }

    fn count_records(bytes: &[u8]) -> Result<u64, DecodeError> {
        let c = Container::open(bytes, Limits::default())?;
        let mut n = 0;
        for b in c.blocks() {
            let b = b?;
            let mut cur = Cursor::new(&b.data);
            for _ in 0..b.count {
                cur.read_str().unwrap();
            }
            assert_eq!(cur.remaining(), 0);
            n += b.count;
        }
        Ok(n)
    }

    #[test]
    fn each_supported_codec_reads_every_record() {
        for codec in [
            apache_avro::Codec::Null,
            apache_avro::Codec::Deflate(Default::default()),
            apache_avro::Codec::Snappy,
        ] {
            assert_eq!(count_records(&file(codec, 500)).unwrap(), 500, "{codec:?}");
        }
    }

    #[test]
    fn header_without_codec_means_null() {
        let bytes = file(apache_avro::Codec::Null, 1);
        let c = Container::open(&bytes, Limits::default()).unwrap();
        assert_eq!(c.codec, Codec::Null);
        assert!(c.schema_json.contains("\"R\""));
    }

    #[test]
    fn non_avro_bytes_are_refused() {
        assert!(matches!(
            Container::open(b"PAR1....", Limits::default()),
            Err(DecodeError::NotAvro(_))
        ));
    }

    #[test]
    fn unknown_codec_is_refused_by_name() {
        let mut bytes = file(apache_avro::Codec::Null, 1);
        // Rename the `avro.schema` entry's neighbour: easiest is to build a header by hand.
        let mut h = Vec::new();
        h.extend_from_slice(MAGIC);
        h.push(4); // 2 entries
        for (k, v) in [("avro.codec", "zstandard"), ("avro.schema", "\"string\"")] {
            h.push((k.len() * 2) as u8);
            h.extend_from_slice(k.as_bytes());
            h.push((v.len() * 2) as u8);
            h.extend_from_slice(v.as_bytes());
        }
        h.push(0);
        h.extend_from_slice(&[7u8; 16]);
        bytes.clear();
        let err = Container::open(&h, Limits::default()).unwrap_err();
        assert_eq!(err, DecodeError::UnsupportedCodec("zstandard".into()));
    }

    #[test]
    fn truncated_file_is_reported_as_truncated() {
        let bytes = file(apache_avro::Codec::Null, 100);
        let cut = &bytes[..bytes.len() - 10];
        assert!(matches!(
            count_records(cut),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn flipped_sync_marker_is_detected() {
        let mut bytes = file(apache_avro::Codec::Null, 10);
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        assert!(matches!(
            count_records(&bytes),
            Err(DecodeError::BadSync { block: 0, .. })
        ));
    }

    #[test]
    fn absurd_block_size_is_refused_without_allocating() {
        let bytes = file(apache_avro::Codec::Null, 1);
        let c = Container::open(&bytes, Limits::default()).unwrap();
        let mut forged = bytes[..c.data_start].to_vec();
        forged.push(2); // count 1
        forged.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]); // huge size
        forged.extend_from_slice(&[0u8; 32]);
        let err = count_records(&forged).unwrap_err();
        assert!(matches!(err, DecodeError::Truncated { .. }), "{err}");
        let mut forged = bytes[..c.data_start].to_vec();
        forged.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0x0f]); // ~2^31 records
        forged.push(2); // size 1
        forged.push(0);
        forged.extend_from_slice(&c.sync);
        let err = count_records(&forged).unwrap_err();
        assert!(matches!(err, DecodeError::BlockTooLarge { .. }), "{err}");
    }

    #[test]
    fn total_decompressed_bytes_are_bounded_per_object_not_only_per_block() {
        // Many small blocks, each far under the block limit.
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[{"name":"id","type":"string"}]}"#,
        )
        .unwrap();
        for codec in [
            apache_avro::Codec::Deflate(Default::default()),
            apache_avro::Codec::Snappy,
            apache_avro::Codec::Null,
        ] {
            let mut w = Writer::builder()
                .schema(&schema)
                .writer(Vec::new())
                .codec(codec)
                .block_size(1024)
                .build()
                .unwrap();
            for i in 0..20_000 {
                w.append_value(AvroValue::Record(vec![(
                    "id".into(),
                    AvroValue::String(format!("{i:0>60}")),
                )]))
                .unwrap();
            }
            let bytes = w.into_inner().unwrap();
            let limits = Limits {
                max_object_decompressed_bytes: 100_000,
                ..Limits::default()
            };
            let c = Container::open(&bytes, limits).unwrap();
            let mut total = 0usize;
            let mut err = None;
            for b in c.blocks() {
                match b {
                    Ok(b) => {
                        assert!(b.data.len() < 4096, "small blocks");
                        total += b.data.len();
                    }
                    Err(e) => err = Some(e),
                }
            }
            let err = err.expect("the object limit stops it");
            assert!(total <= 100_000, "{total}");
            assert!(
                matches!(err, DecodeError::ObjectTooLarge { limit: 100_000, .. }),
                "{codec:?}: {err}"
            );
            assert!(
                err.to_string()
                    .contains("decompresses to more than 100000 bytes in total"),
                "{err}"
            );
            assert_eq!(count_records(&bytes).unwrap(), 20_000, "default limits");
        }
    }

    #[test]
    fn snappy_crc_mismatch_is_corruption() {
        let mut bytes = file(apache_avro::Codec::Snappy, 50);
        let n = bytes.len();
        // The CRC sits just before the final 16-byte sync marker.
        bytes[n - 17] ^= 0x01;
        assert!(matches!(
            count_records(&bytes),
            Err(DecodeError::Codec {
                codec: "snappy",
                ..
            })
        ));
    }
}
