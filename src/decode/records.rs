//! Splits the `Records` array of a CloudTrail document into one byte slice per record,
//! without parsing them: the scanner only tracks strings, escapes and nesting depth, so it
//! runs at memory speed, keeps no stack (100k-deep nesting costs nothing), and holds at
//! most one record (capped) in memory however large the file is.
//!
//! It is push-driven: feed it the decompressed bytes in chunks of any size and it calls
//! back once per complete record. Concatenated documents (`{"Records":[..]}{"Records":[..]}`)
//! are accepted, as some tools write them.

use std::fmt;

use super::structural::{self, ScanState};

/// Bounds on what one record may cost.
#[derive(Debug, Clone, Copy)]
pub struct ScanLimits {
    /// A record larger than this is skipped and reported (CloudTrail truncates
    /// `requestParameters` above 100 KB, so real records stay far below the default).
    pub max_record_bytes: usize,
    /// A record nested deeper than this is skipped and reported.
    pub max_depth: u32,
}

impl Default for ScanLimits {
    fn default() -> Self {
        ScanLimits {
            max_record_bytes: 4 << 20,
            max_depth: 64,
        }
    }
}

/// Something wrong with the document structure, reported by the scanner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanProblem {
    /// The document does not start with `{` (the byte found is given).
    NotAnObject { offset: u64, found: u8 },
    /// A top-level document has no `Records` key.
    NoRecords,
    /// `Records` holds something other than an array.
    RecordsNotArray { found: u8 },
    /// An element of `Records` is not an object.
    RecordNotObject { index: u64 },
    /// A record is larger than `max_record_bytes`; it was skipped.
    RecordTooLarge { index: u64, bytes: u64 },
    /// A record nests deeper than `max_depth`; it was skipped.
    RecordTooDeep { index: u64 },
    /// The input ended inside a document (truncated file).
    Truncated { in_record: bool },
}

impl fmt::Display for ScanProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanProblem::NotAnObject { offset, found } => write!(
                f,
                "not a CloudTrail JSON document: expected '{{' at byte {offset}, found {}",
                show_byte(*found)
            ),
            ScanProblem::NoRecords => write!(f, "JSON document has no \"Records\" array"),
            ScanProblem::RecordsNotArray { found } => write!(
                f,
                "\"Records\" is not an array (it starts with {})",
                show_byte(*found)
            ),
            ScanProblem::RecordNotObject { index } => {
                write!(f, "Records[{index}] is not a JSON object; skipped")
            }
            ScanProblem::RecordTooLarge { index, bytes } => write!(
                f,
                "Records[{index}] is {bytes} bytes, over the per-record cap; skipped (raise --max-record-bytes if this is legitimate)"
            ),
            ScanProblem::RecordTooDeep { index } => write!(
                f,
                "Records[{index}] nests deeper than the depth cap; skipped"
            ),
            ScanProblem::Truncated { in_record } => {
                if *in_record {
                    write!(f, "input ends in the middle of a record (truncated file)")
                } else {
                    write!(f, "input ends before the JSON document is closed (truncated file)")
                }
            }
        }
    }
}

fn show_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("byte 0x{b:02x}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between documents: expecting `{` or whitespace.
    Start,
    /// In the top-level object, expecting a key (or `}`).
    TopKey,
    /// After a top-level key, expecting `:`.
    TopColon,
    /// After `:`, expecting the value.
    TopValue,
    /// Skipping a top-level value that is not `Records` (depth-tracked).
    TopSkip,
    /// Inside `Records`, expecting an element, `,` or `]`.
    Elements,
    /// Inside a record object (depth-tracked).
    Record,
    /// Skipping a non-object element of `Records`.
    ElementSkip,
    /// Unrecoverable structure error: ignore the rest of the input.
    Dead,
}

/// The streaming splitter. See the module docs.
pub struct RecordScanner {
    limits: ScanLimits,
    phase: Phase,
    /// Nesting depth inside the value being skipped or the record being read.
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// Bytes of the top-level key being read (only the first 8 are kept).
    key: Vec<u8>,
    key_is_records: bool,
    saw_records: bool,
    /// Bytes of a record that started in an earlier chunk.
    carry: Vec<u8>,
    /// Size of the current record so far, and whether it is being dropped.
    rec_len: u64,
    rec_oversize: bool,
    rec_too_deep: bool,
    index: u64,
    offset: u64,
    problems: Vec<ScanProblem>,
}

impl RecordScanner {
    pub fn new(limits: ScanLimits) -> Self {
        RecordScanner {
            limits,
            phase: Phase::Start,
            depth: 0,
            in_string: false,
            escaped: false,
            key: Vec::with_capacity(8),
            key_is_records: false,
            saw_records: false,
            carry: Vec::new(),
            rec_len: 0,
            rec_oversize: false,
            rec_too_deep: false,
            index: 0,
            offset: 0,
            problems: Vec::new(),
        }
    }

    /// Records emitted (or skipped as bad) so far.
    pub fn records_seen(&self) -> u64 {
        self.index
    }

    /// Problems found so far, in the order found; drains them.
    pub fn take_problems(&mut self) -> Vec<ScanProblem> {
        std::mem::take(&mut self.problems)
    }

    /// True once the scanner has given up on the input (a structural error).
    pub fn is_dead(&self) -> bool {
        self.phase == Phase::Dead
    }

    /// Feeds the next chunk; `emit` gets each complete record's bytes.
    pub fn feed(&mut self, chunk: &[u8], emit: &mut dyn FnMut(&[u8])) {
        let mut i = 0;
        let n = chunk.len();
        // Where the current record starts in this chunk (if it started in it).
        let mut rec_start: usize = 0;
        while i < n {
            match self.phase {
                Phase::Record => {
                    // Hot loop: find the end of the record.
                    match self.scan_record(chunk, i) {
                        Some(end) => {
                            // `end` is the index just past the closing brace.
                            let taken = (end - rec_start) as u64;
                            self.rec_len += taken;
                            self.finish_record(&chunk[rec_start..end], emit);
                            i = end;
                            self.phase = Phase::Elements;
                        }
                        None => {
                            i = n;
                        }
                    }
                }
                Phase::Dead => {
                    i = n;
                }
                _ => {
                    if !self.in_string {
                        // Whitespace between tokens (a gzip bomb is a gigabyte of it).
                        while i < n && matches!(chunk[i], b' ' | b'\n' | b'\r' | b'\t') {
                            i += 1;
                        }
                        if i == n {
                            break;
                        }
                    }
                    let b = chunk[i];
                    let at = i;
                    i += 1;
                    if let Some(start) = self.step_outside(b, at) {
                        rec_start = start;
                        self.carry.clear();
                        self.rec_len = 0;
                        self.rec_oversize = false;
                        self.rec_too_deep = false;
                    }
                }
            }
        }
        if self.phase == Phase::Record {
            // The record goes on in the next chunk: keep what this chunk holds of it.
            self.rec_len += (n - rec_start) as u64;
            self.stash(&chunk[rec_start..n]);
        }
        self.offset += n as u64;
    }

    /// Call at the end of the input.
    pub fn finish(&mut self) {
        let in_record = self.phase == Phase::Record || self.phase == Phase::ElementSkip;
        match self.phase {
            Phase::Start | Phase::Dead => {}
            _ => self.problems.push(ScanProblem::Truncated { in_record }),
        }
        if self.phase != Phase::Dead && !self.saw_records && self.offset > 0 {
            // A complete document without Records was already reported at its end.
        }
        self.carry = Vec::new();
    }

    fn stash(&mut self, bytes: &[u8]) {
        if self.rec_oversize {
            return;
        }
        if self.rec_len > self.limits.max_record_bytes as u64 {
            self.rec_oversize = true;
            self.carry = Vec::new();
            return;
        }
        self.carry.extend_from_slice(bytes);
    }

    fn finish_record(&mut self, tail: &[u8], emit: &mut dyn FnMut(&[u8])) {
        let index = self.index;
        self.index += 1;
        if self.rec_too_deep {
            self.problems.push(ScanProblem::RecordTooDeep { index });
            self.carry.clear();
            return;
        }
        if self.rec_oversize || self.rec_len > self.limits.max_record_bytes as u64 {
            self.problems.push(ScanProblem::RecordTooLarge {
                index,
                bytes: self.rec_len,
            });
            self.carry = Vec::new();
            return;
        }
        if self.carry.is_empty() {
            emit(tail);
        } else {
            self.carry.extend_from_slice(tail);
            let rec = std::mem::take(&mut self.carry);
            emit(&rec);
            self.carry = rec;
            self.carry.clear();
        }
    }

    /// Scans record bytes from `i`; returns the index just past the record's closing
    /// brace, or None when the chunk ends first.
    #[inline]
    fn scan_record(&mut self, chunk: &[u8], i: usize) -> Option<usize> {
        let mut st = ScanState {
            in_string: self.in_string,
            escaped: self.escaped,
            depth: self.depth,
            too_deep: self.rec_too_deep,
        };
        let end = structural::find_end(&chunk[i..], &mut st, self.limits.max_depth);
        self.in_string = st.in_string;
        self.escaped = st.escaped;
        self.depth = st.depth;
        self.rec_too_deep = st.too_deep;
        end.map(|e| i + e)
    }

    fn step_outside(&mut self, b: u8, at: usize) -> Option<usize> {
        // Strings outside records: top-level keys and skipped values.
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.phase == Phase::TopKey {
                    self.key_is_records = self.key == b"Records";
                    self.phase = Phase::TopColon;
                }
            } else if self.phase == Phase::TopKey && self.key.len() < 8 {
                self.key.push(b);
            }
            return None;
        }
        let ws = matches!(b, b' ' | b'\n' | b'\r' | b'\t');
        match self.phase {
            Phase::Start => {
                if ws {
                    return None;
                }
                if b == b'{' {
                    self.phase = Phase::TopKey;
                    self.saw_records = false;
                } else {
                    self.problems.push(ScanProblem::NotAnObject {
                        offset: self.offset + at as u64,
                        found: b,
                    });
                    self.phase = Phase::Dead;
                }
            }
            Phase::TopKey => match b {
                b'"' => {
                    self.in_string = true;
                    self.key.clear();
                }
                b'}' => self.end_document(),
                _ => {} // whitespace, commas
            },
            Phase::TopColon => {
                if b == b':' {
                    self.phase = Phase::TopValue;
                }
            }
            Phase::TopValue => {
                if ws {
                    return None;
                }
                if self.key_is_records {
                    self.saw_records = true;
                    if b == b'[' {
                        self.phase = Phase::Elements;
                        return None;
                    }
                    self.problems
                        .push(ScanProblem::RecordsNotArray { found: b });
                }
                self.begin_skip(b, Phase::TopSkip);
            }
            Phase::TopSkip | Phase::ElementSkip => {
                let back = if self.phase == Phase::TopSkip {
                    Phase::TopKey
                } else {
                    Phase::Elements
                };
                match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        if self.depth == 0 {
                            // A scalar value ended by the enclosing container.
                            self.phase = back;
                            return self.step_outside(b, at);
                        }
                        self.depth -= 1;
                        if self.depth == 0 {
                            self.phase = back;
                        }
                    }
                    b',' if self.depth == 0 => self.phase = back,
                    _ => {}
                }
            }
            Phase::Elements => match b {
                b'{' => {
                    self.phase = Phase::Record;
                    self.depth = 1;
                    return Some(at);
                }
                b']' => self.phase = Phase::TopKey,
                b',' => {}
                _ if ws => {}
                _ => {
                    self.problems
                        .push(ScanProblem::RecordNotObject { index: self.index });
                    self.index += 1;
                    self.begin_skip(b, Phase::ElementSkip);
                }
            },
            Phase::Record | Phase::Dead => {}
        }
        None
    }

    fn begin_skip(&mut self, b: u8, phase: Phase) {
        self.phase = phase;
        self.depth = 0;
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth = 1,
            _ => {}
        }
        // A string or container value ends at depth 0 after its close; a scalar ends at
        // the next ',' or the enclosing close. Strings: once closed, depth 0 and the
        // next ',' or close ends the skip, which the TopSkip arm handles.
    }

    fn end_document(&mut self) {
        if !self.saw_records {
            self.problems.push(ScanProblem::NoRecords);
        }
        self.phase = Phase::Start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8], chunk: usize) -> (Vec<String>, Vec<ScanProblem>) {
        let mut s = RecordScanner::new(ScanLimits {
            max_record_bytes: 64,
            max_depth: 4,
        });
        let mut out = Vec::new();
        for c in input.chunks(chunk.max(1)) {
            s.feed(c, &mut |r: &[u8]| {
                out.push(String::from_utf8_lossy(r).into_owned())
            });
        }
        s.finish();
        (out, s.take_problems())
    }

    #[test]
    fn splits_records_at_every_chunk_size() {
        let doc =
            br#" {"x":{"Records":1},"Records":[{"a":"}{\"]"},{"b":[1,{"c":2}]} , {}],"y":"z"}"#;
        for chunk in 1..doc.len() + 1 {
            let (recs, probs) = split(doc, chunk);
            assert_eq!(
                recs,
                vec![r#"{"a":"}{\"]"}"#, r#"{"b":[1,{"c":2}]}"#, "{}"],
                "chunk size {chunk}"
            );
            assert!(probs.is_empty(), "chunk size {chunk}: {probs:?}");
        }
    }

    #[test]
    fn reports_structure_problems() {
        assert_eq!(
            split(b"hello", 3).1,
            vec![ScanProblem::NotAnObject {
                offset: 0,
                found: b'h'
            }]
        );
        assert_eq!(split(br#"{"foo":[]}"#, 3).1, vec![ScanProblem::NoRecords]);
        assert_eq!(
            split(br#"{"Records":{"a":1}}"#, 3).1,
            vec![ScanProblem::RecordsNotArray { found: b'{' }]
        );
        let (recs, probs) = split(br#"{"Records":[1,"s",{"ok":1}]}"#, 5);
        assert_eq!(recs, vec![r#"{"ok":1}"#]);
        assert_eq!(
            probs,
            vec![
                ScanProblem::RecordNotObject { index: 0 },
                ScanProblem::RecordNotObject { index: 1 }
            ]
        );
        let (recs, probs) = split(br#"{"Records":[{"a":1},{"b":2"#, 4);
        assert_eq!(recs, vec![r#"{"a":1}"#]);
        assert_eq!(probs, vec![ScanProblem::Truncated { in_record: true }]);
    }

    #[test]
    fn caps_size_and_depth_but_keeps_going() {
        let big = format!(
            r#"{{"Records":[{{"s":"{}"}},{{"d":[[[[[[1]]]]]]}},{{"ok":1}}]}}"#,
            "A".repeat(200)
        );
        for chunk in [1, 7, 1000] {
            let (recs, probs) = split(big.as_bytes(), chunk);
            assert_eq!(recs, vec![r#"{"ok":1}"#]);
            assert!(
                matches!(probs[0], ScanProblem::RecordTooLarge { index: 0, .. }),
                "{probs:?}"
            );
            assert_eq!(probs[1], ScanProblem::RecordTooDeep { index: 1 });
        }
    }

    #[test]
    fn accepts_concatenated_documents() {
        let (recs, probs) = split(br#"{"Records":[{"a":1}]}{"Records":[{"a":2}]}"#, 3);
        assert_eq!(recs, vec![r#"{"a":1}"#, r#"{"a":2}"#]);
        assert!(probs.is_empty());
    }
}
