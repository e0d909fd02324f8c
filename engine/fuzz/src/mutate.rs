// SPDX-License-Identifier: GPL-2.0-or-later
//! Mutations. Blind byte flips would stop at the first checksum, so each
//! file kind also has mutations that keep its framing valid: log chunks
//! re-checksummed (and their payloads edited decompressed, events decoded,
//! edited as JSON values and re-encoded), JSON files edited as values, the
//! memory image edited decompressed. Everything is drawn from one seeded
//! generator, so a run is repeatable from its seed.

use crate::Input;
use krr_record::abi;
use krr_record::event::LogEvent;
use krr_record::log::{CHUNK_HEADER_LEN, FILE_HEADER_LEN};
use rand::{Rng, RngExt};
use serde_json::Value;

/// Largest decompressed payload a mutation works on (the seeds are far
/// smaller; a mutant claiming more is left compressed).
const MAX_RAW: usize = 128 << 20;

/// A mutant of `base`: one to a few mutations of one of its files (or of
/// the set of files), with `other` as material to splice from.
pub fn mutate(rng: &mut impl Rng, base: &Input, other: &Input) -> Input {
    let mut input = base.clone();
    if input.files.is_empty() {
        return input;
    }
    let rounds = 1 + (rng.random_range(0..8u32)).trailing_zeros().min(3);
    for _ in 0..rounds {
        let names: Vec<String> = input.files.keys().cloned().collect();
        let name = names[rng.random_range(0..names.len())].clone();
        // Whole files: gone, emptied, or swapped for another input's.
        if input.files.len() > 1 && rng.random_ratio(1, 40) {
            match rng.random_range(0..3) {
                0 => {
                    input.files.remove(&name);
                }
                1 => {
                    input.files.insert(name, Vec::new());
                }
                _ => {
                    if let Some(theirs) = other.files.get(&name) {
                        input.files.insert(name, theirs.clone());
                    }
                }
            }
            continue;
        }
        let splice = other.files.get(&name).cloned().unwrap_or_default();
        let bytes = input.files.get_mut(&name).expect("picked from the keys");
        let structured = rng.random_ratio(3, 4);
        if structured && name.ends_with(".krrlog") {
            krrlog(rng, bytes, &splice);
        } else if structured && name.ends_with(".json") {
            json_file(rng, bytes);
        } else if structured && name.ends_with(".zst") {
            zstd_file(rng, bytes);
        } else if structured && name == crate::RING_FILE {
            ring(rng, bytes, &splice);
        } else {
            havoc(rng, bytes, &[], &splice);
        }
    }
    input
}

/// Values that sit on the edges integer checks get wrong.
fn interesting(rng: &mut impl Rng, size: usize, old: u64, len: usize) -> u64 {
    let max = if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    };
    let v = match rng.random_range(0..12) {
        0 => 0,
        1 => 1,
        2 => max,
        3 => max >> 1,
        4 => (max >> 1) + 1,
        5 => old.wrapping_add(rng.random_range(1..=16)),
        6 => old.wrapping_sub(rng.random_range(1..=16)),
        7 => len as u64,
        8 => (len as u64).wrapping_add(rng.random_range(0..64)),
        9 => 1u64 << rng.random_range(0..64),
        10 => old.wrapping_mul(2),
        _ => rng.random(),
    };
    v & max
}

/// Sets the `size`-byte little-endian integer at `at` to an interesting value.
fn edit_int(rng: &mut impl Rng, bytes: &mut [u8], at: usize, size: usize) {
    let Some(field) = bytes.get_mut(at..at + size) else {
        return;
    };
    let mut old = [0u8; 8];
    old[..size].copy_from_slice(field);
    let v = interesting(rng, size, u64::from_le_bytes(old), field.len());
    field.copy_from_slice(&v.to_le_bytes()[..size]);
}

/// Generic byte mutations; `fields` are (offset, size) of integers worth
/// editing as a whole, `splice` material from another input.
pub fn havoc(rng: &mut impl Rng, bytes: &mut Vec<u8>, fields: &[(usize, usize)], splice: &[u8]) {
    let ops = 1 + rng.random_range(0..4);
    for _ in 0..ops {
        let len = bytes.len();
        let pos = |rng: &mut _| if len == 0 { 0 } else { rand_below(rng, len) };
        match rng.random_range(0..10) {
            0 if len > 0 => {
                let at = pos(rng);
                bytes[at] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let at = pos(rng);
                bytes[at] = [0, 1, 0x7f, 0x80, 0xff, rng.random()][rng.random_range(0..6)];
            }
            2 | 3 if !fields.is_empty() => {
                let (at, size) = fields[rng.random_range(0..fields.len())];
                edit_int(rng, bytes, at, size);
            }
            2 | 3 if len >= 8 => {
                let size = [1, 2, 4, 8][rng.random_range(0..4)];
                let at = rand_below(rng, len - size + 1);
                edit_int(rng, bytes, at, size);
            }
            4 => bytes.truncate(pos(rng)),
            5 if len > 1 => {
                let at = pos(rng);
                let n = rand_below(rng, (len - at).min(4096)) + 1;
                bytes.drain(at..at + n);
            }
            6 if len > 1 => {
                let at = pos(rng);
                let n = rand_below(rng, (len - at).min(4096)) + 1;
                let copy = bytes[at..at + n].to_vec();
                let to = pos(rng);
                bytes.splice(to..to, copy);
            }
            7 if !splice.is_empty() => {
                let at = rand_below(rng, splice.len());
                let n = rand_below(rng, (splice.len() - at).min(4096)) + 1;
                let to = pos(rng).min(len);
                let end = (to + n).min(len);
                bytes.splice(to..end, splice[at..at + n].iter().copied());
            }
            _ => {
                let n = rng.random_range(1..=32);
                let to = pos(rng).min(len);
                let fill: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                bytes.splice(to..to, fill);
            }
        }
    }
}

fn rand_below(rng: &mut impl Rng, n: usize) -> usize {
    rng.random_range(0..n.max(1))
}

/// A ring image: its header's fields (from the ABI's own layout table),
/// the record headers in its data area, or bytes.
fn ring(rng: &mut impl Rng, bytes: &mut Vec<u8>, splice: &[u8]) {
    let mut fields: Vec<(usize, usize)> = abi::RingHeader::layout()
        .fields
        .iter()
        .filter(|f| f.array_len.is_none())
        .map(|f| (f.offset, f.size))
        .collect();
    if rng.random_bool(0.5) {
        // The records between tail and head, found by their size fields:
        // their headers and payload integers.
        fields = record_fields(bytes);
    }
    if fields.is_empty() || rng.random_ratio(1, 5) {
        return havoc(rng, bytes, &fields, splice);
    }
    // Whole-field edits only: the framing around them stays intact.
    for _ in 0..1 + rng.random_range(0..2) {
        let (at, size) = fields[rng.random_range(0..fields.len())];
        edit_int(rng, bytes, at, size);
    }
}

/// (offset, size) of the header fields and payload integers of the
/// records a ring image holds, walked from `tail` while sizes make sense.
fn record_fields(bytes: &[u8]) -> Vec<(usize, usize)> {
    let Some(h) = abi::RingHeader::read_from(bytes) else {
        return Vec::new();
    };
    let (start, data_size) = (u64::from(h.header_size), h.data_size.max(1));
    let event = abi::EventHeader::layout();
    let mut fields = Vec::new();
    let mut at = h.tail;
    while at < h.head && fields.len() < 4096 {
        let base = (start + at % data_size) as usize;
        let Some(size) = bytes.get(base + 4..base + 8) else {
            break;
        };
        let size = u32::from_le_bytes(size.try_into().unwrap()) as usize;
        if size < 8 || !size.is_multiple_of(8) || base + size > bytes.len() {
            break;
        }
        fields.extend(event.fields.iter().map(|f| (base + f.offset, f.size)));
        fields.extend((base + 16..base + size).step_by(4).map(|a| (a, 4)));
        fields.extend((base + 16..base + size).step_by(8).map(|a| (a, 8)));
        at += size as u64;
    }
    fields
}

/// One chunk of a stream file as found (framing only, nothing checked).
struct Chunk {
    header: [u8; CHUNK_HEADER_LEN],
    payload: Vec<u8>,
}

/// Splits a stream file into its header, chunks and trailing bytes.
fn split_log(bytes: &[u8]) -> Option<(Vec<u8>, Vec<Chunk>, Vec<u8>)> {
    let head = bytes.get(..FILE_HEADER_LEN as usize)?.to_vec();
    let mut chunks = Vec::new();
    let mut at = FILE_HEADER_LEN as usize;
    while let Some(h) = bytes.get(at..at + CHUNK_HEADER_LEN) {
        let len = u32::from_le_bytes(h[24..28].try_into().unwrap()) as usize;
        let Some(payload) = bytes.get(at + CHUNK_HEADER_LEN..at + CHUNK_HEADER_LEN + len) else {
            break;
        };
        chunks.push(Chunk {
            header: h.try_into().unwrap(),
            payload: payload.to_vec(),
        });
        at += CHUNK_HEADER_LEN + len;
    }
    Some((head, chunks, bytes[at..].to_vec()))
}

impl Chunk {
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.header[at..at + 4].try_into().unwrap())
    }
    fn set_u32(&mut self, at: usize, v: u32) {
        self.header[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    /// Recomputes the payload and header checksums, as the writer would.
    fn seal(&mut self) {
        self.set_u32(28, crc32fast::hash(&self.payload));
        let crc = crc32fast::hash(&self.header[..32]);
        self.set_u32(32, crc);
    }
    fn raw(&self) -> Option<Vec<u8>> {
        let raw_len = self.u32_at(20) as usize;
        zstd::bulk::decompress(&self.payload, raw_len.min(MAX_RAW)).ok()
    }
    /// New raw bytes: recompressed, lengths updated, sealed.
    fn set_raw(&mut self, raw: &[u8], is_dma: bool) {
        self.payload = zstd::bulk::compress(raw, 1).expect("zstd compresses to memory");
        self.set_u32(20, raw.len() as u32);
        self.set_u32(24, self.payload.len() as u32);
        if is_dma {
            self.set_u32(16, raw.len() as u32);
        }
        self.seal();
    }
}

/// `events.krrlog` / `dma.krrlog`: chunk headers, payloads (decompressed,
/// events decoded), the chunk sequence, each re-sealed so the reader gets
/// past the checksums most of the time.
fn krrlog(rng: &mut impl Rng, bytes: &mut Vec<u8>, splice: &[u8]) {
    let Some((head, mut chunks, tail)) = split_log(bytes) else {
        return havoc(rng, bytes, &[], splice);
    };
    let is_dma = head.get(12) == Some(&2);
    let seal = rng.random_ratio(9, 10);
    let pick = |rng: &mut _, n: usize| rand_below(rng, n);
    match rng.random_range(0..8) {
        // A chunk header field (index, first, count, lengths, payload crc).
        0 | 1 if !chunks.is_empty() => {
            let i = pick(rng, chunks.len());
            let (at, size) =
                [(4, 4), (8, 8), (16, 4), (20, 4), (24, 4), (28, 4)][rng.random_range(0..6)];
            edit_int(rng, &mut chunks[i].header, at, size);
            if seal {
                let crc = crc32fast::hash(&chunks[i].header[..32]);
                chunks[i].set_u32(32, crc);
            }
        }
        // The decompressed payload: events edited as values, or bytes.
        2..=4 if !chunks.is_empty() => {
            let i = pick(rng, chunks.len());
            let Some(mut raw) = chunks[i].raw() else {
                return;
            };
            if !is_dma && rng.random_bool(0.6) {
                if let Some(edited) = edit_events(rng, &raw, chunks[i].u32_at(16)) {
                    raw = edited;
                }
            } else {
                havoc(rng, &mut raw, &[], splice);
            }
            chunks[i].set_raw(&raw, is_dma);
            if !seal {
                chunks[i].header[32] ^= 1;
            }
        }
        // The chunk sequence: dropped, repeated or swapped chunks.
        5 if chunks.len() > 1 => {
            let i = pick(rng, chunks.len());
            let j = pick(rng, chunks.len());
            match rng.random_range(0..3) {
                0 => {
                    chunks.remove(i);
                }
                1 => {
                    let copy = Chunk {
                        header: chunks[i].header,
                        payload: chunks[i].payload.clone(),
                    };
                    chunks.insert(j, copy);
                }
                _ => chunks.swap(i, j),
            }
            if seal {
                // Renumbered, so continuity holds and the content is what
                // the reader meets.
                let mut first = 0u64;
                for (n, c) in chunks.iter_mut().enumerate() {
                    c.set_u32(4, n as u32);
                    c.header[8..16].copy_from_slice(&first.to_le_bytes());
                    first += u64::from(c.u32_at(16));
                    c.seal();
                }
            }
        }
        // The file header (version, kind).
        6 => {
            let mut h = head.clone();
            let at = [8, 12][rng.random_range(0..2)];
            edit_int(rng, &mut h, at, 4);
            *bytes = h;
            bytes.extend_from_slice(&join(&chunks, &tail)[FILE_HEADER_LEN as usize..]);
            return;
        }
        _ => {
            let mut fields = Vec::new();
            let mut at = FILE_HEADER_LEN as usize;
            for c in &chunks {
                fields.extend([4, 8, 16, 20, 24].map(|f| (at + f, if f == 8 { 8 } else { 4 })));
                at += CHUNK_HEADER_LEN + c.payload.len();
            }
            return havoc(rng, bytes, &fields, splice);
        }
    }
    let mut out = head;
    out.extend_from_slice(&join(&chunks, &tail)[FILE_HEADER_LEN as usize..]);
    *bytes = out;
}

/// The chunks and the trailing bytes after an (ignored) file header.
fn join(chunks: &[Chunk], tail: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; FILE_HEADER_LEN as usize];
    for c in chunks {
        out.extend_from_slice(&c.header);
        out.extend_from_slice(&c.payload);
    }
    out.extend_from_slice(tail);
    out
}

/// The `count` postcard events of a raw payload with one of them edited
/// (as a JSON value, or its agent record's bytes), re-encoded; `None` when
/// the payload does not decode.
fn edit_events(rng: &mut impl Rng, raw: &[u8], count: u32) -> Option<Vec<u8>> {
    let mut events = Vec::new();
    let mut rest = raw;
    for _ in 0..count.min(100_000) {
        let (e, r) = postcard::take_from_bytes::<LogEvent>(rest).ok()?;
        events.push(e);
        rest = r;
    }
    if events.is_empty() {
        return None;
    }
    let i = rand_below(rng, events.len());
    match &mut events[i] {
        LogEvent::Agent { record } if rng.random_bool(0.7) => {
            let fields: Vec<(usize, usize)> = (0..record.len())
                .step_by(4)
                .map(|at| (at, if at + 8 <= record.len() { 8 } else { 4 }))
                .chain([(0, 2), (2, 2), (4, 4)])
                .collect();
            havoc(rng, record, &fields, &[]);
        }
        event => {
            let mut value = serde_json::to_value(&*event).ok()?;
            edit_json(rng, &mut value);
            if let Ok(edited) = serde_json::from_value(value) {
                *event = edited;
            }
        }
    }
    if rng.random_ratio(1, 10) {
        let j = rand_below(rng, events.len());
        let copy = events[i].clone();
        events.insert(j, copy);
    }
    let mut out = Vec::new();
    for e in &events {
        out.extend(postcard::to_stdvec(e).ok()?);
    }
    out.extend_from_slice(rest);
    Some(out)
}

/// A JSON file edited as a value (bytes when it does not parse).
fn json_file(rng: &mut impl Rng, bytes: &mut Vec<u8>) {
    let Ok(mut value) = serde_json::from_slice::<Value>(bytes) else {
        return havoc(rng, bytes, &[], &[]);
    };
    for _ in 0..1 + rng.random_range(0..3) {
        edit_json(rng, &mut value);
    }
    *bytes = serde_json::to_vec(&value).expect("a JSON value serialises");
}

/// Edits one node of `value`: numbers to edge values, strings, booleans,
/// array lengths, missing keys, wrong types.
fn edit_json(rng: &mut impl Rng, value: &mut Value) {
    // Walk down to a random node.
    let mut node = value;
    loop {
        let children = match node {
            Value::Array(a) => a.len(),
            Value::Object(o) => o.len(),
            _ => 0,
        };
        if children == 0 || rng.random_ratio(1, 5) {
            break;
        }
        let i = rand_below(rng, children);
        node = match node {
            Value::Array(a) => &mut a[i],
            Value::Object(o) => o.values_mut().nth(i).expect("index below len"),
            _ => unreachable!(),
        };
    }
    *node = match std::mem::take(node) {
        Value::Number(n) => {
            let old = n.as_u64().unwrap_or(0);
            match rng.random_range(0..5) {
                0 => Value::from(-(rng.random_range(1..=i64::MAX) >> rng.random_range(0..63))),
                1 => Value::from(1e300 * if rng.random() { 1.0 } else { -1.0 }),
                2 => Value::from(0.5),
                _ => Value::from(interesting(rng, 8, old, 0)),
            }
        }
        Value::String(s) => match rng.random_range(0..4) {
            0 => Value::from(""),
            1 => Value::from(s.repeat(rng.random_range(2..64))),
            2 => Value::from("../../../../etc/passwd"),
            _ => Value::from(format!("{s}\u{0}\u{ffff}")),
        },
        Value::Bool(b) => Value::from(!b),
        Value::Array(mut a) => {
            match rng.random_range(0..3) {
                0 => a.clear(),
                1 if !a.is_empty() => {
                    a.pop();
                }
                _ => {
                    let copy = a.first().cloned().unwrap_or(Value::Null);
                    a.extend(std::iter::repeat_n(copy, rng.random_range(1..20)));
                }
            }
            Value::Array(a)
        }
        Value::Object(mut o) => {
            if !o.is_empty() {
                let key = o.keys().nth(rand_below(rng, o.len())).cloned();
                key.and_then(|k| o.remove(&k));
            }
            Value::Object(o)
        }
        Value::Null => Value::from(rng.random::<u32>()),
    };
}

/// A zstd file (the memory image): edited decompressed (its header's magic,
/// version, region count and regions, or its bytes), recompressed; or its
/// compressed bytes.
fn zstd_file(rng: &mut impl Rng, bytes: &mut Vec<u8>) {
    let Ok(mut raw) = zstd::decode_all(&bytes[..]) else {
        return havoc(rng, bytes, &[], &[]);
    };
    let mut fields = vec![(0, 8), (8, 4), (12, 4)];
    let regions = raw.get(12..16).map_or(0, |c| {
        u32::from_le_bytes(c.try_into().unwrap()).min(16) as usize
    });
    for r in 0..regions {
        fields.extend([(16 + r * 16, 8), (24 + r * 16, 8)]);
    }
    if rng.random_bool(0.7) {
        let (at, size) = fields[rng.random_range(0..fields.len())];
        edit_int(rng, &mut raw, at, size);
    } else {
        havoc(rng, &mut raw, &fields, &[]);
    }
    if let Ok(out) = zstd::stream::encode_all(&raw[..], 1) {
        *bytes = out;
    }
}
