//! Which format and compression an object is: declared by the route, suggested by the key's
//! suffixes (`.csv.gz`, `.tgz`, `.parquet`, ...), and always confirmed by the first bytes
//! (gzip `1f 8b`, zip `PK\3\4`, tar `ustar` at byte 257, Parquet `PAR1`, JSON `{`/`[`, else
//! delimited text with the delimiter sniffed from the header line). Also peels the layers in
//! order and hands each table to the visitor.
//!
//! Amperity does not add compression extensions to its file names, so an undeclared
//! compression is taken from the bytes; a *declared* one that the bytes contradict is an error.

use std::io::{self, Read};

use flate2::read::MultiGzDecoder;

use super::limit::{self, Budget};
use super::{MAX_NESTING, ReadError, ReadOptions, RowSource, delimited, json, parquet};
pub use crate::vocab::{Compression, Format};

/// Largest archive metadata record read (a tar GNU long name or PAX header, a zip member
/// name): real ones are a path, far below this.
pub const MAX_ARCHIVE_METADATA_BYTES: u64 = 64 * 1024;
/// Longest archive member name (Linux's PATH_MAX).
pub const MAX_MEMBER_NAME_BYTES: usize = 4096;
/// Most members one archive may hold.
pub const MAX_ARCHIVE_MEMBERS: usize = 10_000;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// gzip magic.
    Gzip,
    /// zip local-file or empty-archive magic.
    Zip,
    /// POSIX tar.
    Tar,
    /// Parquet magic.
    Parquet,
    /// Text starting with `[`.
    JsonArray,
    /// Text starting with `{`.
    NdJson,
    /// Other text.
    Text,
    /// Binary we do not read.
    Unknown,
}

impl Sniffed {
    fn describe(&self) -> &'static str {
        match self {
            Sniffed::Gzip => "gzip-compressed",
            Sniffed::Zip => "a zip archive",
            Sniffed::Tar => "a tar archive",
            Sniffed::Parquet => "Parquet",
            Sniffed::JsonArray => "a JSON array",
            Sniffed::NdJson => "NDJSON",
            Sniffed::Text => "delimited text",
            Sniffed::Unknown => "binary data of an unknown format",
        }
    }
}

/// Classifies the first bytes of an object (up to 8 KiB; tar needs 262).
pub fn sniff(head: &[u8]) -> Sniffed {
    if head.starts_with(&[0x1f, 0x8b]) {
        return Sniffed::Gzip;
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Sniffed::Zip;
    }
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Sniffed::Tar;
    }
    if head.starts_with(b"PAR1") {
        return Sniffed::Parquet;
    }
    let text = strip_bom(head);
    // A NUL byte in the header line means binary data; one further on only rejects its row
    // (the same rule at any offset, see `delimited`).
    if header_line(head).contains(&0) {
        return Sniffed::Unknown;
    }
    match text.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => Sniffed::JsonArray,
        Some(b'{') => Sniffed::NdJson,
        _ => Sniffed::Text,
    }
}

fn strip_bom(b: &[u8]) -> &[u8] {
    b.strip_prefix(&[0xef, 0xbb, 0xbf]).unwrap_or(b)
}

/// The delimiter of a header line: the most frequent of `,` `\t` `|` `;` outside quotes
/// (`,` when none appears).
pub fn sniff_delimiter(head: &[u8]) -> u8 {
    let line = strip_bom(head);
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    let mut counts = [0usize; 4];
    let cands = [b',', b'\t', b'|', b';'];
    let mut quoted = false;
    for &b in &line[..end] {
        if b == b'"' {
            quoted = !quoted;
        } else if !quoted && let Some(i) = cands.iter().position(|&c| c == b) {
            counts[i] += 1;
        }
    }
    let (best, n) = counts
        .iter()
        .enumerate()
        .max_by_key(|(i, n)| (**n, usize::MAX - *i))
        .map(|(i, n)| (i, *n))
        .unwrap_or((0, 0));
    if n == 0 { b',' } else { cands[best] }
}

fn header_line(head: &[u8]) -> &[u8] {
    let line = strip_bom(head);
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    &line[..end]
}

/// What a key's suffixes say: the compression layers (outermost first) and the format.
pub fn from_suffixes(name: &str) -> (Vec<Compression>, Option<Format>) {
    let base = name
        .rsplit(['/', '!'])
        .next()
        .unwrap_or(name)
        .to_ascii_lowercase();
    let mut rest = base.as_str();
    let mut layers = Vec::new();
    loop {
        if let Some(r) = rest
            .strip_suffix(".gz")
            .or_else(|| rest.strip_suffix(".gzip"))
        {
            layers.push(Compression::Gzip);
            rest = r;
        } else if let Some(r) = rest.strip_suffix(".tgz") {
            layers.push(Compression::Tgz);
            rest = r;
        } else if let Some(r) = rest.strip_suffix(".tar") {
            layers.push(Compression::Tar);
            rest = r;
        } else if let Some(r) = rest.strip_suffix(".zip") {
            layers.push(Compression::Zip);
            rest = r;
        } else {
            break;
        }
    }
    layers.reverse();
    let format = if rest.ends_with(".csv") {
        Some(Format::CSV)
    } else if rest.ends_with(".tsv") || rest.ends_with(".tab") {
        Some(Format::TSV)
    } else if rest.ends_with(".psv") {
        Some(Format::PSV)
    } else if rest.ends_with(".ndjson") || rest.ends_with(".jsonl") {
        Some(Format::NdJson)
    } else if rest.ends_with(".json") {
        Some(Format::Json)
    } else if rest.ends_with(".parquet") || rest.ends_with(".pq") {
        Some(Format::Parquet)
    } else {
        None
    };
    (layers, format)
}

fn peek(reader: &mut dyn Read, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(k) => filled += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

fn member_name(name: &str, strip: &[&str]) -> String {
    let lower = name.to_ascii_lowercase();
    for s in strip {
        if lower.ends_with(s) {
            let cut = &name[..name.len() - s.len()];
            return if *s == ".tgz" {
                format!("{cut}.tar")
            } else {
                cut.to_string()
            };
        }
    }
    name.to_string()
}

fn skip_member(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    name.ends_with('/') || name.starts_with("__MACOSX/") || base.starts_with('.') || base.is_empty()
}

/// What every layer of one object shares: how it is read, the bound on its decompressed bytes
/// and the visitor each of its tables goes to.
pub(crate) struct Layers<'o, E> {
    pub(crate) opts: &'o ReadOptions,
    pub(crate) budget: &'o Budget,
    pub(crate) visit: &'o mut dyn FnMut(&mut dyn RowSource) -> Result<(), E>,
}

/// One layer of an object: its bytes, the name its suffixes are read from, the address errors
/// name (`object!member`), the compression still expected at this layer (declared by the
/// route; `None` when anything found is fine) and how deep in archives it sits.
pub(crate) struct Layer<'a, 'n> {
    pub(crate) reader: Box<dyn Read + 'a>,
    pub(crate) name: &'n str,
    pub(crate) source: &'n str,
    pub(crate) expect: Option<Compression>,
    pub(crate) depth: usize,
}

impl<E: From<ReadError>> Layers<'_, E> {
    /// Peels one layer and recurses, or opens the table and visits it.
    pub(crate) fn open(&mut self, layer: Layer<'_, '_>) -> Result<(), E> {
        let Layer {
            mut reader,
            source,
            depth,
            ..
        } = layer;
        if depth > MAX_NESTING {
            return Err(ReadError::Archive {
                source_name: source.to_string(),
                message: format!("archives nested more than {MAX_NESTING} deep"),
            }
            .into());
        }
        let head = peek(&mut reader, 8192).map_err(|e| ReadError::io(source, "reading", e))?;
        let sniffed = sniff(&head);
        let layer = Layer {
            reader: Box::new(io::Cursor::new(head.clone()).chain(reader)),
            ..layer
        };
        match sniffed {
            Sniffed::Gzip => self.gzip(layer),
            Sniffed::Zip => self.zip(layer),
            Sniffed::Tar => self.tar(layer),
            Sniffed::Unknown => Err(ReadError::UnknownFormat {
                source_name: source.to_string(),
                detail: format!(
                    "the first bytes ({}) are not gzip, zip, tar, Parquet, JSON or delimited text",
                    hex_prefix(&head)
                ),
            }
            .into()),
            Sniffed::Parquet | Sniffed::JsonArray | Sniffed::NdJson | Sniffed::Text => {
                self.table(layer, sniffed, &head)
            }
        }
    }

    /// The member of an archive at `depth`, named `name` in the archive at `source`.
    fn member(
        &mut self,
        reader: Box<dyn Read + '_>,
        name: &str,
        source: &str,
        depth: usize,
    ) -> Result<(), E> {
        let msource = format!("{source}!{name}");
        self.open(Layer {
            reader,
            name,
            source: &msource,
            expect: None,
            depth: depth + 1,
        })
    }

    fn gzip(&mut self, layer: Layer<'_, '_>) -> Result<(), E> {
        let inner_expect = match layer.expect {
            None => None,
            Some(Compression::Gzip) => Some(Compression::None),
            Some(Compression::Tgz) => Some(Compression::Tar),
            Some(other) => {
                return Err(mismatch(layer.source, Sniffed::Gzip, other.describe()).into());
            }
        };
        let decoded = self.budget.wrap(MultiGzDecoder::new(layer.reader));
        let inner_name = member_name(layer.name, &[".gz", ".gzip", ".tgz"]);
        self.open(Layer {
            reader: Box::new(decoded),
            name: &inner_name,
            source: layer.source,
            // A declared plain gzip may still hold a tar: accept what is inside.
            expect: if inner_expect == Some(Compression::None) {
                None
            } else {
                inner_expect
            },
            depth: layer.depth + 1,
        })
    }

    fn zip(&mut self, layer: Layer<'_, '_>) -> Result<(), E> {
        let source = layer.source;
        if let Some(e) = layer.expect
            && e != Compression::Zip
        {
            return Err(mismatch(source, Sniffed::Zip, e.describe()).into());
        }
        let mut reader = layer.reader;
        let file = limit::spill(&mut reader, &self.opts.temp_dir)
            .map_err(|e| ReadError::io(source, "spilling the zip archive to a temp file", e))?;
        let zip_err = |m: String| ReadError::Archive {
            source_name: source.to_string(),
            message: m,
        };
        let mut archive =
            zip::ZipArchive::new(file).map_err(|e| zip_err(format!("not a readable zip: {e}")))?;
        if archive.len() > MAX_ARCHIVE_MEMBERS {
            return Err(zip_err(format!(
                "{} members, more than the {MAX_ARCHIVE_MEMBERS} an export may hold",
                archive.len()
            ))
            .into());
        }
        for i in 0..archive.len() {
            let member = archive
                .by_index(i)
                .map_err(|e| zip_err(format!("member {i}: {e}")))?;
            let mname = member
                .name()
                .map(|n| n.into_owned())
                .unwrap_or_else(|_| String::from_utf8_lossy(member.name_raw()).into_owned());
            if mname.len() > MAX_MEMBER_NAME_BYTES {
                return Err(zip_err(format!(
                    "member {i} has a {}-byte name, over the {MAX_MEMBER_NAME_BYTES}-byte limit on member names",
                    mname.len()
                ))
                .into());
            }
            if member.is_dir() || skip_member(&mname) {
                continue;
            }
            let member = Box::new(self.budget.wrap(member));
            self.member(member, &mname, source, layer.depth)?;
        }
        Ok(())
    }

    fn tar(&mut self, layer: Layer<'_, '_>) -> Result<(), E> {
        let source = layer.source;
        if let Some(e) = layer.expect
            && e != Compression::Tar
            && e != Compression::Tgz
        {
            return Err(mismatch(source, Sniffed::Tar, e.describe()).into());
        }
        let mut archive = tar::Archive::new(layer.reader);
        let tar_err = |m: String| ReadError::Archive {
            source_name: source.to_string(),
            message: m,
        };
        // Raw entries: GNU long-name and PAX records come to us as entries, so their size
        // is checked against MAX_ARCHIVE_METADATA_BYTES before any of it is read (the
        // crate itself would read a record of any claimed size into memory).
        let entries = archive
            .entries()
            .map_err(|e| ReadError::io(source, "reading the tar archive", e))?
            .raw(true);
        let mut long_name: Option<String> = None;
        let mut members = 0usize;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| ReadError::io(source, "reading the tar archive", e))?;
            let kind = entry.header().entry_type();
            if matches!(
                kind,
                tar::EntryType::GNULongName
                    | tar::EntryType::GNULongLink
                    | tar::EntryType::XHeader
                    | tar::EntryType::XGlobalHeader
            ) {
                tar_metadata(&mut entry, source, &mut long_name)?;
                continue;
            }
            let name = long_name.take();
            if !kind.is_file() {
                continue;
            }
            let mname = match name {
                Some(n) => n,
                None => entry
                    .path()
                    .map_err(|e| tar_err(format!("member name: {e}")))?
                    .to_string_lossy()
                    .into_owned(),
            };
            if mname.len() > MAX_MEMBER_NAME_BYTES {
                return Err(tar_err(format!(
                    "a member has a {}-byte name, over the {MAX_MEMBER_NAME_BYTES}-byte limit on member names",
                    mname.len()
                ))
                .into());
            }
            if skip_member(&mname) {
                continue;
            }
            members += 1;
            if members > MAX_ARCHIVE_MEMBERS {
                return Err(tar_err(format!("more than {MAX_ARCHIVE_MEMBERS} members")).into());
            }
            self.member(Box::new(entry), &mname, source, layer.depth)?;
        }
        Ok(())
    }

    /// The innermost layer: a table in the format the bytes, the route and the name agree on.
    fn table(&mut self, layer: Layer<'_, '_>, sniffed: Sniffed, head: &[u8]) -> Result<(), E> {
        let (source, opts) = (layer.source, self.opts);
        if let Some(e) = layer.expect
            && e != Compression::None
        {
            return Err(mismatch(source, sniffed, e.describe()).into());
        }
        let (_, suffix_format) = from_suffixes(layer.name);
        let format = table_format(sniffed, opts.format, suffix_format, head)
            .map_err(|declared| mismatch(source, sniffed, &declared))?;
        let reader: Box<dyn Read + '_> = Box::new(self.budget.wrap(layer.reader));
        match format {
            Format::Parquet => {
                let mut reader = reader;
                let file = limit::spill(&mut reader, &opts.temp_dir).map_err(|e| {
                    ReadError::io(source, "spilling the Parquet part to a temp file", e)
                })?;
                let mut src =
                    parquet::ParquetSource::open(file, source, opts.limits.max_row_bytes)?;
                (self.visit)(&mut src)
            }
            Format::Delimited { delimiter, escape } => {
                let mut src = delimited::DelimitedSource::open(
                    reader,
                    source,
                    delimiter,
                    escape,
                    opts.limits.max_row_bytes,
                )?;
                (self.visit)(&mut src)
            }
            Format::JsonArray => {
                let mut src = json::JsonArraySource::open(reader, source, opts)?;
                (self.visit)(&mut src)
            }
            Format::NdJson | Format::Json => {
                let mut src = json::NdJsonSource::open(reader, source, opts)?;
                (self.visit)(&mut src)
            }
        }
    }
}

/// The bytes say `sniffed` where the route declared (or this layer expected) `declared`.
fn mismatch(source: &str, sniffed: Sniffed, declared: &str) -> ReadError {
    ReadError::Mismatch {
        source_name: source.to_string(),
        declared: declared.to_string(),
        found: sniffed.describe().to_string(),
    }
}

/// The format of a table whose bytes look like `sniffed`, given the route's `declared` format
/// and the name's `suffix` format; `Err` with the description of the wanted format the bytes
/// contradict.
fn table_format(
    sniffed: Sniffed,
    declared: Option<Format>,
    suffix: Option<Format>,
    head: &[u8],
) -> Result<Format, String> {
    let wanted = declared.or(suffix);
    Ok(match (sniffed, wanted) {
        (Sniffed::Parquet, None | Some(Format::Parquet)) => Format::Parquet,
        (Sniffed::Parquet, Some(f)) if declared.is_some() => {
            return Err(f.describe());
        }
        // A suffix is only a hint: the bytes win.
        (Sniffed::Parquet, Some(_)) => Format::Parquet,
        (_, Some(Format::Parquet)) => {
            return Err(Format::Parquet.describe());
        }
        (Sniffed::JsonArray, None | Some(Format::Json | Format::JsonArray)) => Format::JsonArray,
        (Sniffed::NdJson, None | Some(Format::Json | Format::NdJson)) => Format::NdJson,
        (Sniffed::JsonArray | Sniffed::NdJson, Some(f @ Format::Delimited { .. })) => f,
        (Sniffed::Text, Some(f @ (Format::Json | Format::NdJson | Format::JsonArray)))
            if head.iter().all(u8::is_ascii_whitespace) =>
        {
            // An empty JSON file has no rows.
            f
        }
        (_, Some(f @ (Format::Json | Format::NdJson | Format::JsonArray))) => {
            return Err(f.describe());
        }
        // A suffix's delimiter that the header line does not contain yields to the
        // sniffed one (a pipe-delimited file named `.csv`).
        (_, Some(Format::Delimited { delimiter, escape }))
            if declared.is_none() && !header_line(head).contains(&delimiter) =>
        {
            Format::Delimited {
                delimiter: sniff_delimiter(head),
                escape,
            }
        }
        (_, Some(f @ Format::Delimited { .. })) => f,
        (Sniffed::Text, None) => Format::Delimited {
            delimiter: sniff_delimiter(head),
            escape: None,
        },
        (_, _) => Format::Delimited {
            delimiter: sniff_delimiter(head),
            escape: None,
        },
    })
}

/// Reads a tar GNU long-name or PAX record (at most [`MAX_ARCHIVE_METADATA_BYTES`]): a path it
/// gives names the next member.
fn tar_metadata(
    entry: &mut tar::Entry<'_, impl Read>,
    source: &str,
    long_name: &mut Option<String>,
) -> Result<(), ReadError> {
    let kind = entry.header().entry_type();
    let tar_err = |m: String| ReadError::Archive {
        source_name: source.to_string(),
        message: m,
    };
    let size = entry.size();
    if size > MAX_ARCHIVE_METADATA_BYTES {
        return Err(tar_err(format!(
            "a tar {kind:?} record of {size} bytes exceeds the {MAX_ARCHIVE_METADATA_BYTES}-byte limit on archive metadata"
        )));
    }
    let mut data = Vec::with_capacity(size as usize);
    entry
        .take(MAX_ARCHIVE_METADATA_BYTES)
        .read_to_end(&mut data)
        .map_err(|e| ReadError::io(source, "reading the tar archive", e))?;
    match kind {
        tar::EntryType::GNULongName => {
            let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            *long_name = Some(String::from_utf8_lossy(&data[..end]).into_owned());
        }
        tar::EntryType::XHeader => {
            for ext in tar::PaxExtensions::new(&data) {
                let ext = ext.map_err(|e| tar_err(format!("malformed PAX record: {e}")))?;
                if ext.key() == Ok("path") {
                    *long_name = Some(String::from_utf8_lossy(ext.value_bytes()).into_owned());
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn hex_prefix(b: &[u8]) -> String {
    b.iter()
        .take(8)
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_give_layers_outermost_first_and_the_format() {
        assert_eq!(
            from_suffixes("s3://b/exports/customers.csv.gz"),
            (vec![Compression::Gzip], Some(Format::CSV))
        );
        assert_eq!(
            from_suffixes("x/y.tar.gz"),
            (vec![Compression::Tar, Compression::Gzip], None)
        );
        assert_eq!(
            from_suffixes("x/part-0.PARQUET"),
            (vec![], Some(Format::Parquet))
        );
        assert_eq!(from_suffixes("a.jsonl"), (vec![], Some(Format::NdJson)));
    }

    #[test]
    fn sniffing_tells_every_kind_apart() {
        assert_eq!(sniff(&[0x1f, 0x8b, 8, 0]), Sniffed::Gzip);
        assert_eq!(sniff(b"PK\x03\x04rest"), Sniffed::Zip);
        assert_eq!(sniff(b"PAR1...."), Sniffed::Parquet);
        assert_eq!(sniff(b"\xef\xbb\xbf  [{\"a\":1}]"), Sniffed::JsonArray);
        assert_eq!(sniff(b"{\"a\":1}\n"), Sniffed::NdJson);
        assert_eq!(sniff(b"id,name\n1,x\n"), Sniffed::Text);
        assert_eq!(sniff(b"\x00\x01\x02"), Sniffed::Unknown);
        let mut tar = vec![0u8; 300];
        tar[257..262].copy_from_slice(b"ustar");
        tar[0] = b'a';
        assert_eq!(sniff(&tar), Sniffed::Tar);
    }

    #[test]
    fn delimiter_is_sniffed_from_the_header_outside_quotes() {
        assert_eq!(sniff_delimiter(b"id|name|\"a,b,c\"\n1|2|3"), b'|');
        assert_eq!(sniff_delimiter(b"id\tname\n"), b'\t');
        assert_eq!(sniff_delimiter(b"id;name;x\n"), b';');
        assert_eq!(sniff_delimiter(b"id\n"), b',');
    }
}
