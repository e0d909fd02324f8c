// SPDX-License-Identifier: GPL-2.0-or-later
//! The guest's console output as the engine keeps it: every byte counted
//! and hashed, only the most recent ones held, so that a guest that prints
//! without end cannot make the host's memory grow without end.
//!
//! Positions are absolute: byte `n` is the `n`-th byte the guest ever
//! printed, whatever was dropped since. A reader remembers the position it
//! read up to and asks for what follows ([`ConsoleBuffer::since`]).

use sha2::{Digest, Sha256};

/// The most console bytes a [`ConsoleBuffer`] holds. Crash reports and
/// the run loops' markers are a few kilobytes and are searched as the
/// output arrives; a vCPU's run (a quantum of a few hundred thousand
/// instructions) prints far less than half of this between two reads.
pub const CONSOLE_WINDOW_BYTES: usize = 8 << 20;

/// Console output: its length and SHA-256 over every byte, and the most
/// recent bytes (at most the window; after a trim, at least half of it).
#[derive(Clone)]
pub struct ConsoleBuffer {
    held: Vec<u8>,
    /// Position of `held[0]`: the bytes dropped so far.
    start: u64,
    window: usize,
    sha256: Sha256,
}

/// A read from a position whose bytes were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("console output from byte {from} is no longer held (only from byte {held_from}: the most recent {window} bytes at most are kept)")]
pub struct Dropped {
    pub from: u64,
    pub held_from: u64,
    pub window: usize,
}

impl Default for ConsoleBuffer {
    fn default() -> ConsoleBuffer {
        ConsoleBuffer::with_window(CONSOLE_WINDOW_BYTES)
    }
}

impl std::fmt::Debug for ConsoleBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleBuffer")
            .field("start", &self.start)
            .field("end", &self.end())
            .field("window", &self.window)
            .finish()
    }
}

impl ConsoleBuffer {
    /// An empty buffer holding at most [`CONSOLE_WINDOW_BYTES`].
    pub fn new() -> ConsoleBuffer {
        ConsoleBuffer::default()
    }

    /// An empty buffer holding at most `window` bytes (at least 2).
    pub fn with_window(window: usize) -> ConsoleBuffer {
        ConsoleBuffer {
            held: Vec::new(),
            start: 0,
            window: window.max(2),
            sha256: Sha256::new(),
        }
    }

    /// Appends `bytes`. When the window would overflow, the oldest bytes go
    /// so that half of it is left (including `bytes`): a trim moves half a
    /// window once per half a window of output.
    pub fn push(&mut self, bytes: &[u8]) {
        self.sha256.update(bytes);
        let half = self.window / 2;
        if self.held.len() + bytes.len() > self.window {
            let keep = half.saturating_sub(bytes.len()).min(self.held.len());
            self.drop_front(self.held.len() - keep);
        }
        self.held.extend_from_slice(bytes);
        if self.held.len() > self.window {
            self.drop_front(self.held.len() - half);
        }
    }

    fn drop_front(&mut self, n: usize) {
        self.held.drain(..n);
        self.start += n as u64;
    }

    /// Bytes printed so far: the position after the last one.
    pub fn end(&self) -> u64 {
        self.start + self.held.len() as u64
    }

    /// The position of the oldest byte held: how many were dropped.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The bytes held, from [`Self::start`] to [`Self::end`].
    pub fn held(&self) -> &[u8] {
        &self.held
    }

    /// The most bytes held.
    pub fn window(&self) -> usize {
        self.window
    }

    /// The output from position `from` on (empty at or past the end), or
    /// which part of it was dropped.
    pub fn since(&self, from: u64) -> Result<&[u8], Dropped> {
        if from < self.start {
            return Err(Dropped {
                from,
                held_from: self.start,
                window: self.window,
            });
        }
        let at = usize::try_from(from - self.start).unwrap_or(usize::MAX);
        Ok(&self.held[at.min(self.held.len())..])
    }

    /// What is held of the output from position `from` on, and the
    /// position it starts at (`from`, or later where bytes were dropped).
    pub fn held_since(&self, from: u64) -> (u64, &[u8]) {
        let from = from.max(self.start);
        (from, self.since(from).unwrap_or_default())
    }

    /// SHA-256 of every byte printed, dropped ones included, in hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256.clone().finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream fed in pieces of every size through a small window:
    /// positions stay absolute across trims, the most recent half window
    /// is always held, the digest is the whole stream's, and a read of a
    /// dropped range says so.
    #[test]
    fn positions_and_digest_survive_trims() {
        let stream: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for piece in [1, 3, 63, 64, 65, 500, 4096] {
            let mut c = ConsoleBuffer::with_window(128);
            let mut fed = 0;
            for chunk in stream.chunks(piece) {
                c.push(chunk);
                fed += chunk.len();
                assert_eq!(c.end(), fed as u64);
                assert!(c.held().len() <= 128, "piece {piece}: {}", c.held().len());
                assert!(
                    c.held().len() >= fed.min(64),
                    "piece {piece}: the last half window is held"
                );
                let start = c.start() as usize;
                assert_eq!(c.held(), &stream[start..fed]);
            }
            assert_eq!(c.sha256_hex(), hex::encode(Sha256::digest(&stream)));
            let end = c.end();
            assert_eq!(c.since(end).unwrap(), b"");
            assert_eq!(c.since(end + 10).unwrap(), b"");
            assert_eq!(c.since(end - 10).unwrap(), &stream[stream.len() - 10..]);
            let err = c.since(5).unwrap_err();
            assert_eq!(err.from, 5);
            assert_eq!(err.held_from, c.start());
            assert!(err.to_string().contains("no longer held"), "{err}");
            assert_eq!(c.held_since(5), (c.start(), c.held()));
        }
    }

    /// Trimming happens once per half window of output, not at every
    /// byte, so a byte-at-a-time guest costs O(1) a byte.
    #[test]
    fn trims_are_amortised() {
        let mut c = ConsoleBuffer::with_window(256 << 10);
        let started = std::time::Instant::now();
        for i in 0..(4u32 << 20) {
            c.push(&[i as u8]);
        }
        assert_eq!(c.end(), 4 << 20);
        assert!(c.held().len() <= 256 << 10);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "4 MiB a byte at a time took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_push_larger_than_the_window_keeps_its_tail() {
        let mut c = ConsoleBuffer::with_window(10);
        c.push(b"abc");
        c.push(b"0123456789xyz");
        assert_eq!(c.end(), 16);
        assert_eq!(c.held(), b"89xyz");
        assert_eq!(c.start(), 11);
    }
}
