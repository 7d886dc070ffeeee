//! Bytes of a CloudTrail log file -> parsed events of interest, plus the problems met on
//! the way. Pure: no network, no global state, never panics on input. gzip is detected by
//! its magic bytes, not by the file name; small files are inflated whole with libdeflate
//! (the gzip trailer gives the size), large ones are streamed through flate2 so memory
//! stays bounded; the `Records` array is split by `records::RecordScanner`; only records
//! that mention an event source kmsguard analyzes are parsed (simd-json), the rest are
//! counted and skipped.

pub mod records;
mod structural;

use crate::event::{Event, Kind, Value, CLOUDTRAIL_SOURCE, KMS_SOURCE};
use memchr::memmem::Finder;
use records::{RecordScanner, ScanLimits, ScanProblem};
use std::cell::Cell;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::rc::Rc;

/// Bounds that protect the decoder from hostile or broken files.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub scan: ScanLimits,
    /// Decompressed bytes per file before it is abandoned.
    pub max_file_bytes: u64,
    /// Decompressed/compressed ratio above which a file is treated as a gzip bomb
    /// (checked once 64 MiB have come out; CloudTrail compresses about 11:1).
    pub max_ratio: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            scan: ScanLimits::default(),
            max_file_bytes: 4 << 30,
            max_ratio: 200,
        }
    }
}

const WHOLE_FILE_MAX_COMPRESSED: u64 = 16 << 20;
const WHOLE_FILE_MAX_INFLATED: u64 = 64 << 20;
const RATIO_CHECK_AFTER: u64 = 64 << 20;
const CHUNK: usize = 256 << 10;

/// What went wrong with one file. Each kind is reported once per file, with a count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeProblem {
    Io(String),
    Empty,
    /// Not gzip despite a `.gz` name: read as plain JSON (a note, not an error).
    NotGzip,
    Gzip(String),
    Bomb {
        ratio: u64,
        after: u64,
    },
    TooLarge {
        limit: u64,
    },
    Scan(ScanProblem),
    InvalidJson {
        count: u64,
        first: String,
    },
    InvalidUtf8 {
        count: u64,
    },
    DuplicateKeys {
        count: u64,
        keys: String,
    },
    WrongTypes {
        count: u64,
        field: &'static str,
    },
    MissingEventSource {
        count: u64,
    },
}

impl DecodeProblem {
    /// Notes do not make a file count as bad.
    pub fn is_note(&self) -> bool {
        matches!(self, DecodeProblem::NotGzip)
    }
}

impl fmt::Display for DecodeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeProblem::Io(e) => write!(f, "cannot read: {e}"),
            DecodeProblem::Empty => write!(f, "empty: no JSON document in the file"),
            DecodeProblem::NotGzip => write!(f, "named .gz but not gzip (no gzip magic bytes); read as plain JSON"),
            DecodeProblem::Gzip(e) => write!(f, "gzip stream is corrupt or truncated ({e}); records before the damage were analyzed"),
            DecodeProblem::Bomb { ratio, after } => write!(
                f,
                "decompresses {ratio}:1 after {after} bytes, far beyond CloudTrail's ~11:1: treated as a gzip bomb and abandoned (raise --max-ratio if legitimate)"
            ),
            DecodeProblem::TooLarge { limit } => write!(
                f,
                "decompresses to more than {limit} bytes: abandoned there (raise --max-file-bytes if legitimate)"
            ),
            DecodeProblem::Scan(p) => write!(f, "{p}"),
            DecodeProblem::InvalidJson { count, first } => {
                write!(f, "{count} record(s) are not valid JSON and were skipped; first: {first}")
            }
            DecodeProblem::InvalidUtf8 { count } => write!(
                f,
                "{count} record(s) contain invalid UTF-8; the bad bytes were replaced with U+FFFD and the records analyzed"
            ),
            DecodeProblem::DuplicateKeys { count, keys } => write!(
                f,
                "{count} record(s) repeat a key ({keys}); each was analyzed with the first and with the last value"
            ),
            DecodeProblem::WrongTypes { count, field } => write!(
                f,
                "{count} record(s) have fields of the wrong type (first: `{field}`); those fields were ignored"
            ),
            DecodeProblem::MissingEventSource { count } => {
                write!(f, "{count} record(s) have no eventSource and were skipped")
            }
        }
    }
}

/// Counters for one file.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileStats {
    pub compressed_bytes: u64,
    pub json_bytes: u64,
    pub records: u64,
    /// Records parsed because they mention KMS or CloudTrail.
    pub parsed: u64,
    pub kms_records: u64,
}

/// The outcome of decoding one file.
#[derive(Debug, Clone, Default)]
pub struct FileReport {
    pub stats: FileStats,
    pub problems: Vec<DecodeProblem>,
}

impl FileReport {
    pub fn is_bad(&self) -> bool {
        self.problems.iter().any(|p| !p.is_note())
    }
}

enum Prefilter {
    Candidate,
    Other,
    NoSource,
}

/// Turns each candidate record into an `Event`; owns the reusable parse buffers.
struct RecordSink<'f> {
    event_source_key: Finder<'static>,
    buf: Vec<u8>,
    buffers: simd_json::Buffers,
    /// The tape of the last record, kept between records for its allocation.
    tape: Option<simd_json::Tape<'static>>,
    stats: FileStats,
    invalid_json: u64,
    first_json_error: String,
    invalid_utf8: u64,
    dup_records: u64,
    dup_keys: Vec<String>,
    wrong_types: u64,
    wrong_field: &'static str,
    missing_source: u64,
    on_event: &'f mut dyn FnMut(&Event<'_>),
}

impl<'f> RecordSink<'f> {
    fn new(on_event: &'f mut dyn FnMut(&Event<'_>)) -> Self {
        RecordSink {
            event_source_key: Finder::new(b"\"eventSource\""),
            buf: Vec::with_capacity(8 << 10),
            buffers: simd_json::Buffers::new(8 << 10),
            tape: None,
            stats: FileStats::default(),
            invalid_json: 0,
            first_json_error: String::new(),
            invalid_utf8: 0,
            dup_records: 0,
            dup_keys: Vec::new(),
            wrong_types: 0,
            wrong_field: "",
            missing_source: 0,
            on_event,
        }
    }

    fn record(&mut self, rec: &[u8]) {
        self.stats.records += 1;
        match self.source_of(rec) {
            Prefilter::Candidate => {}
            Prefilter::Other => return,
            Prefilter::NoSource => {
                self.missing_source += 1;
                return;
            }
        }
        self.stats.parsed += 1;
        // The buffer is moved out while the tape borrows it, so that `analyze` can
        // borrow the sink; both go back for the next record.
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(rec);
        let mut tape = self
            .tape
            .take()
            .unwrap_or_else(simd_json::Tape::null)
            .reset();
        // simd-json validates UTF-8 as it parses; only a record it rejects is checked
        // again, and one with invalid UTF-8 is parsed once more with the bad bytes
        // replaced, so a stray byte in one string cannot hide the event.
        let mut parsed = simd_json::fill_tape(&mut buf, &mut self.buffers, &mut tape);
        let mut lossy = Vec::new();
        if parsed.is_err() && std::str::from_utf8(rec).is_err() {
            self.invalid_utf8 += 1;
            lossy.extend_from_slice(String::from_utf8_lossy(rec).as_bytes());
            tape = tape.reset();
            parsed = simd_json::fill_tape(&mut lossy, &mut self.buffers, &mut tape);
        }
        match parsed {
            Err(e) => {
                self.invalid_json += 1;
                if self.first_json_error.is_empty() {
                    self.first_json_error = format!("record {}: {e}", self.stats.records - 1);
                }
            }
            Ok(()) => {
                if let Some(value) = Value::root(&tape.0) {
                    self.analyze(value);
                }
            }
        }
        self.tape = Some(tape.reset());
        self.buf = buf;
    }

    fn analyze(&mut self, value: Value<'_>) {
        let ev = Event::new(value);
        check_record(
            &ev,
            &mut self.dup_records,
            &mut self.dup_keys,
            &mut self.wrong_types,
            &mut self.wrong_field,
            &mut self.missing_source,
        );
        match ev.event_source() {
            Some(KMS_SOURCE) => self.stats.kms_records += 1,
            Some(CLOUDTRAIL_SOURCE) => {}
            _ => return,
        }
        (self.on_event)(&ev);
        // A record that repeats a key is ambiguous: other parsers keep the last value.
        // Analyze it under that reading too, so the ambiguity cannot hide an event.
        if !ev.duplicate_fields().is_empty() {
            let alt = Event::last_wins(value);
            if matches!(alt.event_source(), Some(KMS_SOURCE | CLOUDTRAIL_SOURCE)) {
                (self.on_event)(&alt);
            }
        }
    }

    /// Classifies a record by its `eventSource` without parsing it: one pass over the
    /// record for every `"eventSource"` key (a nested one, should a request carry such a
    /// field, cannot hide the real one: every occurrence is checked).
    fn source_of(&self, rec: &[u8]) -> Prefilter {
        let mut seen = false;
        for at in self.event_source_key.find_iter(rec) {
            seen = true;
            let mut rest = &rec[at + b"\"eventSource\"".len()..];
            while let [b' ' | b'\t' | b'\n' | b'\r' | b':', tail @ ..] = rest {
                rest = tail;
            }
            if let [b'"', value @ ..] = rest {
                if value.starts_with(b"kms.amazonaws.com\"")
                    || value.starts_with(b"cloudtrail.amazonaws.com\"")
                {
                    return Prefilter::Candidate;
                }
            }
        }
        if seen {
            Prefilter::Other
        } else {
            Prefilter::NoSource
        }
    }

    fn problems(&self) -> Vec<DecodeProblem> {
        let mut out = Vec::new();
        if self.invalid_json > 0 {
            out.push(DecodeProblem::InvalidJson {
                count: self.invalid_json,
                first: self.first_json_error.clone(),
            });
        }
        if self.invalid_utf8 > 0 {
            out.push(DecodeProblem::InvalidUtf8 {
                count: self.invalid_utf8,
            });
        }
        if self.dup_records > 0 {
            out.push(DecodeProblem::DuplicateKeys {
                count: self.dup_records,
                keys: self.dup_keys.join(", "),
            });
        }
        if self.wrong_types > 0 {
            out.push(DecodeProblem::WrongTypes {
                count: self.wrong_types,
                field: self.wrong_field,
            });
        }
        if self.missing_source > 0 {
            out.push(DecodeProblem::MissingEventSource {
                count: self.missing_source,
            });
        }
        out
    }
}

fn check_record(
    ev: &Event<'_>,
    dup_records: &mut u64,
    dup_keys: &mut Vec<String>,
    wrong_types: &mut u64,
    wrong_field: &mut &'static str,
    missing_source: &mut u64,
) {
    let dups = ev.duplicate_fields();
    if !dups.is_empty() {
        *dup_records += 1;
        for d in dups {
            if dup_keys.len() < 5 && !dup_keys.iter().any(|k| k == d) {
                dup_keys.push(d.to_string());
            }
        }
    }
    if ev.get(&["eventSource"]).is_none() {
        *missing_source += 1;
    }
    type Check = (&'static str, fn(Value<'_>) -> bool);
    let checks: [Check; 5] = [
        ("eventSource", |v| matches!(v.kind(), Kind::Str(_))),
        ("eventName", |v| matches!(v.kind(), Kind::Str(_))),
        ("eventTime", |v| matches!(v.kind(), Kind::Str(_))),
        ("eventID", |v| matches!(v.kind(), Kind::Str(_))),
        ("userIdentity", |v| matches!(v.kind(), Kind::Object(_))),
    ];
    for (field, ok) in checks {
        if let Some(x) = ev.get(&[field]) {
            if !ok(x) {
                *wrong_types += 1;
                if wrong_field.is_empty() {
                    *wrong_field = field;
                }
                break;
            }
        }
    }
}

/// Counts bytes read through it (compressed bytes consumed by the inflater).
struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// A reusable decoder: one per worker thread, so buffers are allocated once.
pub struct Decoder {
    limits: DecodeLimits,
    inflater: libdeflater::Decompressor,
    input: Vec<u8>,
    output: Vec<u8>,
    chunk: Vec<u8>,
}

impl Decoder {
    pub fn new(limits: DecodeLimits) -> Self {
        Decoder {
            limits,
            inflater: libdeflater::Decompressor::new(),
            input: Vec::new(),
            output: Vec::new(),
            chunk: vec![0; CHUNK],
        }
    }

    /// Decodes a file from disk, calling `on_event` for each KMS or CloudTrail event.
    pub fn decode_file(&mut self, path: &Path, on_event: &mut dyn FnMut(&Event<'_>)) -> FileReport {
        let gz_name = path.to_string_lossy().ends_with(".gz");
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => return io_failure(e),
        };
        let size = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        if size <= WHOLE_FILE_MAX_COMPRESSED {
            let mut input = std::mem::take(&mut self.input);
            input.clear();
            let result = BufReader::new(file).read_to_end(&mut input);
            let report = match result {
                Ok(_) => self.decode_bytes(&input, gz_name, on_event),
                Err(e) => io_failure(e),
            };
            self.input = input;
            report
        } else {
            self.decode_reader(BufReader::with_capacity(CHUNK, file), gz_name, on_event)
        }
    }

    /// Decodes a whole object held in memory.
    pub fn decode_bytes(
        &mut self,
        bytes: &[u8],
        gz_name: bool,
        on_event: &mut dyn FnMut(&Event<'_>),
    ) -> FileReport {
        if !is_gzip(bytes) {
            let mut sink = RecordSink::new(on_event);
            let mut scanner = RecordScanner::new(self.limits.scan);
            let mut problems = Vec::new();
            if gz_name {
                problems.push(DecodeProblem::NotGzip);
            }
            let take = bytes.len().min(self.limits.max_file_bytes as usize);
            scanner.feed(&bytes[..take], &mut |r| sink.record(r));
            if take < bytes.len() {
                problems.push(DecodeProblem::TooLarge {
                    limit: self.limits.max_file_bytes,
                });
            } else {
                scanner.finish();
            }
            return finish(
                sink,
                scanner,
                bytes.len() as u64,
                bytes.len() as u64,
                problems,
            );
        }
        let isize = gzip_isize(bytes);
        let plausible = isize <= WHOLE_FILE_MAX_INFLATED
            && isize <= (bytes.len() as u64).saturating_mul(self.limits.max_ratio);
        if plausible {
            let mut out = std::mem::take(&mut self.output);
            out.resize(isize as usize, 0);
            let ok = matches!(self.inflater.gzip_decompress(bytes, &mut out), Ok(n) if n as u64 == isize);
            if ok {
                let mut sink = RecordSink::new(on_event);
                let mut scanner = RecordScanner::new(self.limits.scan);
                scanner.feed(&out, &mut |r| sink.record(r));
                scanner.finish();
                let report = finish(sink, scanner, bytes.len() as u64, isize, Vec::new());
                self.output = out;
                return report;
            }
            self.output = out;
        }
        // Damaged, multi-member, or large: the streaming path reports precisely.
        self.decode_reader(bytes, gz_name, on_event)
    }

    /// Decodes a stream (gzip or plain JSON) in bounded memory.
    pub fn decode_reader<R: Read>(
        &mut self,
        reader: R,
        gz_name: bool,
        on_event: &mut dyn FnMut(&Event<'_>),
    ) -> FileReport {
        let mut reader = BufReader::with_capacity(CHUNK, reader);
        let gzip = match reader.fill_buf() {
            Ok(head) => is_gzip(head),
            Err(e) => return io_failure(e),
        };
        let mut sink = RecordSink::new(on_event);
        let mut scanner = RecordScanner::new(self.limits.scan);
        let mut problems = Vec::new();
        if !gzip && gz_name {
            problems.push(DecodeProblem::NotGzip);
        }
        let consumed = Rc::new(Cell::new(0u64));
        let counted = Counting {
            inner: reader,
            count: consumed.clone(),
        };
        let mut source: Box<dyn Read + '_> = if gzip {
            Box::new(flate2::bufread::MultiGzDecoder::new(
                BufReader::with_capacity(CHUNK, counted),
            ))
        } else {
            Box::new(counted)
        };
        let mut out_total: u64 = 0;
        let mut complete = true;
        let mut next_ratio_check = RATIO_CHECK_AFTER;
        loop {
            let n = match source.read(&mut self.chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    problems.push(if gzip {
                        DecodeProblem::Gzip(e.to_string())
                    } else {
                        DecodeProblem::Io(e.to_string())
                    });
                    complete = false;
                    break;
                }
            };
            out_total += n as u64;
            if out_total > self.limits.max_file_bytes {
                problems.push(DecodeProblem::TooLarge {
                    limit: self.limits.max_file_bytes,
                });
                complete = false;
                break;
            }
            scanner.feed(&self.chunk[..n], &mut |r| sink.record(r));
            if scanner.is_dead() {
                break;
            }
            if gzip && out_total >= next_ratio_check {
                next_ratio_check = out_total + (16 << 20);
                let ratio = out_total / consumed.get().max(1);
                if ratio > self.limits.max_ratio {
                    problems.push(DecodeProblem::Bomb {
                        ratio,
                        after: out_total,
                    });
                    complete = false;
                    break;
                }
            }
        }
        drop(source);
        if complete {
            scanner.finish();
        }
        finish(sink, scanner, consumed.get(), out_total, problems)
    }
}

fn finish(
    sink: RecordSink<'_>,
    mut scanner: RecordScanner,
    compressed: u64,
    json_bytes: u64,
    mut problems: Vec<DecodeProblem>,
) -> FileReport {
    let mut scan_problems: Vec<DecodeProblem> = Vec::new();
    for p in scanner.take_problems() {
        // Each kind of scan problem once per file (the first), with the rest counted.
        let dup = scan_problems.iter().any(|q| match (q, &p) {
            (DecodeProblem::Scan(a), b) => std::mem::discriminant(a) == std::mem::discriminant(b),
            _ => false,
        });
        if !dup {
            scan_problems.push(DecodeProblem::Scan(p));
        }
    }
    if json_bytes == 0 && problems.iter().all(|p| p.is_note()) {
        problems.push(DecodeProblem::Empty);
    }
    problems.extend(scan_problems);
    problems.extend(sink.problems());
    let mut stats = sink.stats;
    stats.compressed_bytes = compressed;
    stats.json_bytes = json_bytes;
    FileReport { stats, problems }
}

/// The report of an input that could not be read at all (e.g. an S3 download that failed
/// after its retries): no events, one `Io` problem.
pub fn failure(why: String) -> FileReport {
    FileReport {
        stats: FileStats::default(),
        problems: vec![DecodeProblem::Io(why)],
    }
}

fn io_failure(e: std::io::Error) -> FileReport {
    FileReport {
        stats: FileStats::default(),
        problems: vec![DecodeProblem::Io(e.to_string())],
    }
}

fn is_gzip(b: &[u8]) -> bool {
    b.len() >= 2 && b[0] == 0x1f && b[1] == 0x8b
}

/// The ISIZE field of the gzip trailer: the uncompressed size mod 2^32 of the last member.
fn gzip_isize(b: &[u8]) -> u64 {
    if b.len() < 18 {
        return 0;
    }
    let t = &b[b.len() - 4..];
    u32::from_le_bytes([t[0], t[1], t[2], t[3]]) as u64
}

/// Inflates a file without scanning or parsing, for the benchmark's "raw gunzip" figure:
/// libdeflate on the whole buffer when `whole`, else flate2 streaming. Returns the
/// decompressed size.
pub fn inflate_only(path: &Path, whole: bool, scratch: &mut Vec<u8>) -> std::io::Result<u64> {
    let bytes = std::fs::read(path)?;
    if !is_gzip(&bytes) {
        return Ok(bytes.len() as u64);
    }
    if whole {
        let isize = gzip_isize(&bytes) as usize;
        scratch.resize(isize, 0);
        let mut d = libdeflater::Decompressor::new();
        return d
            .gzip_decompress(&bytes, scratch)
            .map(|n| n as u64)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()));
    }
    let mut dec = flate2::bufread::MultiGzDecoder::new(&bytes[..]);
    scratch.resize(CHUNK, 0);
    let mut total = 0u64;
    loop {
        match dec.read(scratch)? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}
