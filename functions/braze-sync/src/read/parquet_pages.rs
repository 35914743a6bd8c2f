//! A bounded pre-scan of every page of a Parquet part, before the parquet crate decodes any.
//!
//! The parquet crate allocates each page's *declared* uncompressed size and inflates gzip
//! pages without a bound, so a 2 MB part whose pages claim (or inflate to) gigabytes would
//! take the function's memory with it. Here every page header is read with a small Thrift
//! compact-protocol reader (bounded: header size, nesting, list lengths), and refused when it
//! declares more than [`MAX_PAGE_BYTES`] uncompressed bytes, when its compressed bytes run
//! past its column chunk, or when its actual decompressed size (gzip inflated into a
//! counting sink, Snappy's length prefix) differs from what it declares.

use std::io::{self, Read, Seek, SeekFrom};

use parquet::basic::{Compression, Type as PhysicalType};
use parquet::file::metadata::{ColumnChunkMetaData, ParquetMetaData};

/// Largest decoded page (writers use ~1 MiB data pages and dictionary pages).
pub const MAX_PAGE_BYTES: u64 = 64 * 1024 * 1024;
/// Largest decoded dictionary page (writers cap dictionaries at ~1 MiB and fall back to plain
/// pages beyond): a dictionary's values are copied into every row that uses them, so a large
/// one multiplies.
pub const MAX_DICTIONARY_PAGE_BYTES: u64 = 16 * 1024 * 1024;
/// Parquet's page type of a dictionary page.
const DICTIONARY_PAGE: i32 = 2;
/// Largest page header (statistics included).
pub const MAX_PAGE_HEADER_BYTES: usize = 1024 * 1024;
const MAX_DEPTH: usize = 16;

/// One page header's sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageSizes {
    /// Page type (0 data, 1 index, 2 dictionary, 3 data v2).
    pub page_type: i32,
    /// Bytes of the header itself.
    pub header_len: usize,
    /// Declared decoded size.
    pub uncompressed: i64,
    /// Bytes on disk after the header.
    pub compressed: i64,
    /// Data page v2: level bytes stored uncompressed before the compressed values.
    pub v2_levels: i64,
    /// Data page v2 may store its values uncompressed.
    pub v2_uncompressed: bool,
}

struct Thrift<'b> {
    b: &'b [u8],
    pos: usize,
}

type TResult<T> = Result<T, String>;

impl Thrift<'_> {
    fn byte(&mut self) -> TResult<u8> {
        let v = *self.b.get(self.pos).ok_or("truncated page header")?;
        self.pos += 1;
        Ok(v)
    }

    fn varint(&mut self) -> TResult<u64> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            if shift == 63 && b > 1 {
                return Err("varint overflow in page header".into());
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long in page header".into())
    }

    fn zigzag(&mut self) -> TResult<i64> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    fn skip(&mut self, n: u64) -> TResult<()> {
        let n = usize::try_from(n).map_err(|_| "page header field too long")?;
        let end = self
            .pos
            .checked_add(n)
            .ok_or("page header field too long")?;
        if end > self.b.len() {
            return Err("truncated page header".into());
        }
        self.pos = end;
        Ok(())
    }

    /// Skips one value of compact type `t`.
    fn skip_value(&mut self, t: u8, depth: usize) -> TResult<()> {
        if depth > MAX_DEPTH {
            return Err("page header nested too deep".into());
        }
        match t {
            1 | 2 => Ok(()),
            3 => self.skip(1),
            4..=6 => self.varint().map(|_| ()),
            7 => self.skip(8),
            8 => {
                let n = self.varint()?;
                self.skip(n)
            }
            9 | 10 => {
                let h = self.byte()?;
                let n = match h >> 4 {
                    15 => self.varint()?,
                    n => u64::from(n),
                };
                let et = h & 0x0f;
                if n > self.b.len() as u64 {
                    return Err("list longer than the page header".into());
                }
                for _ in 0..n {
                    if et == 1 || et == 2 {
                        self.skip(1)?;
                    } else {
                        self.skip_value(et, depth + 1)?;
                    }
                }
                Ok(())
            }
            11 => {
                let n = self.varint()?;
                if n == 0 {
                    return Ok(());
                }
                if n > self.b.len() as u64 {
                    return Err("map longer than the page header".into());
                }
                let kv = self.byte()?;
                for _ in 0..n {
                    self.skip_value(kv >> 4, depth + 1)?;
                    self.skip_value(kv & 0x0f, depth + 1)?;
                }
                Ok(())
            }
            12 => self.struct_fields(depth + 1, &mut |_, _, _| Ok(false)),
            13 => self.skip(16),
            _ => Err(format!("unknown Thrift type {t} in page header")),
        }
    }

    /// Walks a struct's fields; `f(id, type, self)` reads the field and returns true, or
    /// returns false to have it skipped.
    fn struct_fields(
        &mut self,
        depth: usize,
        f: &mut dyn FnMut(i16, u8, &mut Self) -> TResult<bool>,
    ) -> TResult<()> {
        if depth > MAX_DEPTH {
            return Err("page header nested too deep".into());
        }
        let mut last: i16 = 0;
        loop {
            let h = self.byte()?;
            if h == 0 {
                return Ok(());
            }
            let t = h & 0x0f;
            let id = match h >> 4 {
                0 => i16::try_from(self.zigzag()?).map_err(|_| "bad field id in page header")?,
                d => last.wrapping_add(i16::from(d)),
            };
            last = id;
            if !f(id, t, self)? {
                self.skip_value(t, depth)?;
            }
        }
    }
}

/// Parses one page header at the start of `b`.
pub fn page_header(b: &[u8]) -> Result<PageSizes, String> {
    let mut t = Thrift { b, pos: 0 };
    let mut out = PageSizes::default();
    let (mut have_u, mut have_c) = (false, false);
    t.struct_fields(0, &mut |id, ty, t| match (id, ty) {
        (1, 5) => {
            out.page_type = i32::try_from(t.zigzag()?).map_err(|_| "bad page type")?;
            Ok(true)
        }
        (2, 5) => {
            out.uncompressed = t.zigzag()?;
            have_u = true;
            Ok(true)
        }
        (3, 5) => {
            out.compressed = t.zigzag()?;
            have_c = true;
            Ok(true)
        }
        (8, 12) => {
            let mut def = 0;
            let mut rep = 0;
            t.struct_fields(1, &mut |id, ty, t| match (id, ty) {
                (5, 5) => {
                    def = t.zigzag()?;
                    Ok(true)
                }
                (6, 5) => {
                    rep = t.zigzag()?;
                    Ok(true)
                }
                (7, 2) => {
                    out.v2_uncompressed = true;
                    Ok(true)
                }
                (7, 1) => Ok(true),
                _ => Ok(false),
            })?;
            out.v2_levels = def.saturating_add(rep);
            Ok(true)
        }
        _ => Ok(false),
    })?;
    if !(have_u && have_c) {
        return Err("page header without its sizes".into());
    }
    out.header_len = t.pos;
    Ok(out)
}

struct Counted(u64, u64);

impl io::Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        if self.0 > self.1 {
            return Err(io::Error::other("page inflates past its declared size"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Checks every page of every column chunk of `file`. `Err` names the first bad page. A
/// dictionary page is also refused when it declares more than [`MAX_DICTIONARY_PAGE_BYTES`],
/// or when one of its values is longer than `max_value` (the route's `max_row_bytes`: every
/// row using it would be over, and decoding copies it into each one). `Ok` is the most bytes
/// one row can take from the dictionaries of one row group (the largest value of each
/// column's dictionary, summed), which sizes the batches.
pub fn check_pages<F: Read + Seek>(
    file: &mut F,
    meta: &ParquetMetaData,
    max_value: usize,
) -> Result<u64, String> {
    check_pages_with(file, meta, max_value, MAX_DICTIONARY_PAGE_BYTES)
}

/// The largest value of a dictionary page's plain-encoded byte arrays (`body`, decoded).
fn largest_plain_value(body: &[u8]) -> Result<u64, String> {
    let mut largest = 0u64;
    let mut i = 0usize;
    while i < body.len() {
        let len = body
            .get(i..i + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .ok_or("a dictionary value's length is cut off")?;
        largest = largest.max(u64::from(len));
        i = i
            .checked_add(4 + len as usize)
            .filter(|&e| e <= body.len())
            .ok_or("a dictionary value runs past its page")?;
    }
    Ok(largest)
}

/// [`check_pages`] with the dictionary page limit given (tests).
pub fn check_pages_with<F: Read + Seek>(
    file: &mut F,
    meta: &ParquetMetaData,
    max_value: usize,
    max_dictionary: u64,
) -> Result<u64, String> {
    let len = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    let mut scan = PageScan {
        file,
        len,
        max_value,
        max_dictionary,
        head: Vec::new(),
        body: Vec::new(),
    };
    let mut widest_row = 0u64;
    for (g, rg) in meta.row_groups().iter().enumerate() {
        let mut group_row = 0u64;
        for (c, col) in rg.columns().iter().enumerate() {
            let column_largest = scan.column(col, Chunk { g, c })?;
            group_row = group_row.saturating_add(column_largest);
        }
        widest_row = widest_row.max(group_row);
    }
    Ok(widest_row)
}

/// Where a column chunk is, for errors: `row group {g}, column {c}: ...`.
#[derive(Clone, Copy)]
struct Chunk {
    g: usize,
    c: usize,
}

impl Chunk {
    fn at(self, what: String) -> String {
        format!("row group {}, column {}: {what}", self.g, self.c)
    }
}

/// One page: where its header starts, where its data starts and its header's sizes.
struct Page {
    pos: u64,
    data_at: u64,
    sizes: PageSizes,
}

/// The scan of one part's pages, with its read buffers and limits.
struct PageScan<'f, F> {
    file: &'f mut F,
    /// The part's bytes.
    len: u64,
    max_value: usize,
    max_dictionary: u64,
    head: Vec<u8>,
    body: Vec<u8>,
}

impl<F: Read + Seek> PageScan<'_, F> {
    /// Checks every page of one column chunk; the largest dictionary value it holds (0 when
    /// it has no dictionary of byte arrays).
    fn column(&mut self, col: &ColumnChunkMetaData, chunk: Chunk) -> Result<u64, String> {
        let mut column_largest = 0u64;
        let start = col
            .dictionary_page_offset()
            .filter(|&d| d > 0)
            .unwrap_or(col.data_page_offset());
        let end = start.checked_add(col.compressed_size()).unwrap_or(-1);
        if start < 0 || end < start || end as u64 > self.len {
            return Err(chunk.at(format!(
                "column chunk bytes {start}..{end} lie outside the {}-byte part",
                self.len
            )));
        }
        let end = end as u64;
        let mut pos = start as u64;
        while pos < end {
            let page = self.page(pos, end, chunk)?;
            if page.sizes.page_type == DICTIONARY_PAGE
                && let Some(largest) = self.dictionary(col, &page, chunk)?
            {
                if largest > self.max_value as u64 {
                    return Err(chunk.at(format!(
                        "dictionary page at byte {pos} holds a value of {largest} bytes, over max_row_bytes ({}): every row using it would be refused, and decoding would copy it into each",
                        self.max_value
                    )));
                }
                column_largest = column_largest.max(largest);
            }
            self.check_decoded_size(col.compression(), &page, chunk)?;
            pos = page.data_at + page.sizes.compressed as u64;
        }
        Ok(column_largest)
    }

    /// The page whose header starts at `pos`, its sizes checked against the chunk's `end` and
    /// [`MAX_PAGE_BYTES`].
    fn page(&mut self, pos: u64, end: u64, chunk: Chunk) -> Result<Page, String> {
        let room = (end - pos).min(MAX_PAGE_HEADER_BYTES as u64) as usize;
        let mut want = room.min(64 * 1024);
        let sizes = loop {
            self.head.resize(want, 0);
            self.file
                .seek(SeekFrom::Start(pos))
                .map_err(|e| e.to_string())?;
            self.file
                .read_exact(&mut self.head)
                .map_err(|e| chunk.at(e.to_string()))?;
            match page_header(&self.head) {
                Ok(s) => break s,
                Err(e) if e.starts_with("truncated") && want < room => {
                    want = room;
                }
                Err(e) if e.starts_with("truncated") => {
                    return Err(chunk.at(format!(
                        "a page header at byte {pos} is truncated or over {MAX_PAGE_HEADER_BYTES} bytes"
                    )));
                }
                Err(e) => return Err(chunk.at(format!("page at byte {pos}: {e}"))),
            }
        };
        let data_at = pos + sizes.header_len as u64;
        if sizes.uncompressed < 0
            || sizes.compressed < 0
            || sizes.v2_levels < 0
            || sizes.v2_levels > sizes.compressed
            || data_at + sizes.compressed as u64 > end
        {
            return Err(chunk.at(format!(
                "page at byte {pos} has sizes that do not fit its column chunk"
            )));
        }
        if sizes.uncompressed as u64 > MAX_PAGE_BYTES {
            return Err(chunk.at(format!(
                "page at byte {pos} declares {} decoded bytes, over the {MAX_PAGE_BYTES}-byte page limit",
                sizes.uncompressed
            )));
        }
        Ok(Page {
            pos,
            data_at,
            sizes,
        })
    }

    /// Reads `n` bytes at `at` into `body`.
    fn read_body(&mut self, at: u64, n: usize, chunk: Chunk) -> Result<(), String> {
        self.body.resize(n, 0);
        self.file
            .seek(SeekFrom::Start(at))
            .map_err(|e| e.to_string())?;
        self.file
            .read_exact(&mut self.body)
            .map_err(|e| chunk.at(e.to_string()))
    }

    /// A dictionary page within its limit: the largest value it holds, when the column's type
    /// and codec let it be known.
    fn dictionary(
        &mut self,
        col: &ColumnChunkMetaData,
        page: &Page,
        chunk: Chunk,
    ) -> Result<Option<u64>, String> {
        let (pos, sizes) = (page.pos, page.sizes);
        if sizes.uncompressed as u64 > self.max_dictionary {
            return Err(chunk.at(format!(
                "dictionary page at byte {pos} declares {} decoded bytes, over the {}-byte dictionary page limit",
                sizes.uncompressed, self.max_dictionary
            )));
        }
        match col.column_type() {
            PhysicalType::FIXED_LEN_BYTE_ARRAY => {
                Ok(Some(col.column_descr().type_length().max(0) as u64))
            }
            PhysicalType::BYTE_ARRAY => {
                let codec = col.compression();
                let declared = sizes.uncompressed as u64;
                self.read_body(page.data_at, sizes.compressed as usize, chunk)?;
                let body = &self.body;
                let decoded: Option<Vec<u8>> = match codec {
                    Compression::UNCOMPRESSED => Some(body.clone()),
                    Compression::SNAPPY => snap::raw::Decoder::new()
                        .decompress_vec(body)
                        .ok()
                        .filter(|d| d.len() as u64 <= declared),
                    Compression::GZIP(_) => {
                        let mut d = Vec::new();
                        flate2::read::MultiGzDecoder::new(&body[..])
                            .take(declared + 1)
                            .read_to_end(&mut d)
                            .ok()
                            .filter(|_| d.len() as u64 <= declared)
                            .map(|_| d)
                    }
                    // The parquet crate here reads no other codec.
                    _ => None,
                };
                match decoded {
                    Some(d) => Ok(Some(largest_plain_value(&d).map_err(|e| {
                        chunk.at(format!("dictionary page at byte {pos}: {e}"))
                    })?)),
                    None if matches!(
                        codec,
                        Compression::UNCOMPRESSED | Compression::SNAPPY | Compression::GZIP(_)
                    ) =>
                    {
                        Err(chunk.at(format!(
                            "dictionary page at byte {pos} does not decompress (corrupt or over its declared {declared} bytes)"
                        )))
                    }
                    None => Ok(None),
                }
            }
            _ => Ok(None),
        }
    }

    /// A gzip or Snappy page decompresses to no more than it declares.
    fn check_decoded_size(
        &mut self,
        codec: Compression,
        page: &Page,
        chunk: Chunk,
    ) -> Result<(), String> {
        let (pos, sizes) = (page.pos, page.sizes);
        let declared = (sizes.uncompressed - sizes.v2_levels).max(0) as u64;
        let packed = (sizes.compressed - sizes.v2_levels) as u64;
        if !(matches!(codec, Compression::GZIP(_) | Compression::SNAPPY)
            && packed > 0
            && !sizes.v2_uncompressed)
        {
            return Ok(());
        }
        self.read_body(
            page.data_at + sizes.v2_levels as u64,
            packed as usize,
            chunk,
        )?;
        let body = &self.body;
        let actual = match codec {
            Compression::SNAPPY => snap::raw::decompress_len(body).ok().map(|n| n as u64),
            _ => {
                let mut sink = Counted(0, declared);
                io::copy(&mut flate2::read::MultiGzDecoder::new(&body[..]), &mut sink)
                    .ok()
                    .map(|_| sink.0)
            }
        };
        match actual {
            Some(n) if n <= declared => Ok(()),
            Some(n) => Err(chunk.at(format!(
                "page at byte {pos} decodes to {n} bytes, more than the {declared} it declares"
            ))),
            None => Err(chunk.at(format!(
                "page at byte {pos} does not decompress (corrupt or over its declared {declared} bytes)"
            ))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_header_is_read_and_garbage_is_refused_without_panicking() {
        // type=0 (i32 via delta 1), uncompressed=100, compressed=50, stop.
        let h = [0x15, 0x00, 0x15, 0xc8, 0x01, 0x15, 0x64, 0x00];
        let s = page_header(&h).unwrap();
        assert_eq!((s.uncompressed, s.compressed, s.header_len), (100, 50, 8));
        assert!(page_header(&[0x15]).is_err());
        assert!(page_header(&[0x1c; 64]).is_err());
        assert!(page_header(&[0xff; 64]).is_err());
    }
}
