// SPDX-License-Identifier: GPL-2.0-or-later
//! The replayed kernel's console compared with the recorded one as both
//! grow. The recorded bytes come from the log's console events, read ahead
//! of the replay; the replayed ones from the kernel's writes to the UART,
//! which can also come first (a vCPU run's output is logged after the run).
//! Only what one side has produced and the other not yet is kept, so
//! neither a long replay nor a recording holding gigabytes of console
//! events makes memory grow without bound, and a mismatch is found at its
//! first differing byte.

use krr_devices::console::{ConsoleBuffer, CONSOLE_WINDOW_BYTES};
use std::collections::VecDeque;

/// The most bytes one side may be ahead of the other. A vCPU run prints a
/// few hundred kilobytes at most, and Linux's console driver reads the
/// UART's status (a logged event) before each byte, so a replay that
/// follows its recording stays far closer.
pub(crate) const CONSOLE_AHEAD_BYTES: usize = CONSOLE_WINDOW_BYTES;

/// Where the two consoles stopped agreeing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConsoleMismatch {
    /// Byte `offset` of the output differs.
    Differs {
        offset: u64,
        recorded: u8,
        replayed: u8,
    },
    /// One side got more than the limit ahead of the other from byte
    /// `offset` on.
    TooFarAhead { offset: u64, recorded_side: bool },
}

/// What a console mismatch makes of the replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConsoleProblem {
    /// The replay's console output is not the recorded one.
    Diverged { expected: String, found: String },
    /// The log's console output runs further ahead of the replay than
    /// replay keeps to compare.
    Unsupported { why: String },
}

/// The comparison of the recorded and the replayed console output.
#[derive(Debug, Clone)]
pub(crate) struct ConsoleComparison {
    /// Bytes both sides produced, equal.
    matched: u64,
    /// What one side produced and the other has not yet, oldest first.
    ahead: VecDeque<u8>,
    /// `ahead` holds recorded bytes (else replayed ones).
    recorded_ahead: bool,
    recorded: u64,
    replayed: u64,
    limit: usize,
    mismatch: Option<ConsoleMismatch>,
}

impl Default for ConsoleComparison {
    fn default() -> ConsoleComparison {
        ConsoleComparison::with_limit(CONSOLE_AHEAD_BYTES)
    }
}

impl ConsoleComparison {
    /// A comparison where one side may be at most `limit` bytes ahead.
    pub(crate) fn with_limit(limit: usize) -> ConsoleComparison {
        ConsoleComparison {
            matched: 0,
            ahead: VecDeque::new(),
            recorded_ahead: false,
            recorded: 0,
            replayed: 0,
            limit,
            mismatch: None,
        }
    }

    /// Console bytes of the log, in order.
    pub(crate) fn recorded(&mut self, bytes: &[u8]) {
        self.recorded += bytes.len() as u64;
        for &b in bytes {
            if !self.meet(b, true) {
                break;
            }
        }
    }

    /// A byte the replayed kernel printed; true when it is where the
    /// consoles first disagree.
    pub(crate) fn replayed(&mut self, byte: u8) -> bool {
        self.replayed += 1;
        let before = self.mismatch.is_some();
        self.meet(byte, false);
        !before && self.mismatch.is_some()
    }

    /// Compares `byte` of one side with the other's oldest pending byte,
    /// or keeps it pending; false once they disagree.
    fn meet(&mut self, byte: u8, from_recorded: bool) -> bool {
        if self.mismatch.is_some() {
            return false;
        }
        if self.recorded_ahead != from_recorded {
            if let Some(other) = self.ahead.pop_front() {
                let (recorded, replayed) = match from_recorded {
                    true => (byte, other),
                    false => (other, byte),
                };
                if recorded != replayed {
                    self.fail(ConsoleMismatch::Differs {
                        offset: self.matched,
                        recorded,
                        replayed,
                    });
                    return false;
                }
                self.matched += 1;
                return true;
            }
            self.recorded_ahead = from_recorded;
        }
        if self.ahead.len() >= self.limit {
            self.fail(ConsoleMismatch::TooFarAhead {
                offset: self.matched,
                recorded_side: from_recorded,
            });
            return false;
        }
        self.ahead.push_back(byte);
        true
    }

    fn fail(&mut self, mismatch: ConsoleMismatch) {
        self.mismatch = Some(mismatch);
        self.ahead = VecDeque::new();
    }

    pub(crate) fn mismatch(&self) -> Option<ConsoleMismatch> {
        self.mismatch
    }

    /// Whether the replayed output so far is a prefix of the recorded
    /// output read so far.
    pub(crate) fn is_prefix(&self) -> bool {
        self.mismatch.is_none() && (self.ahead.is_empty() || self.recorded_ahead)
    }

    /// Whether both outputs so far are equal.
    pub(crate) fn is_equal(&self) -> bool {
        self.mismatch.is_none() && self.ahead.is_empty()
    }

    /// Bytes pending comparison (host memory the comparison holds).
    pub(crate) fn pending_bytes(&self) -> usize {
        self.ahead.len()
    }

    /// What is wrong with the replayed console where the replay stands:
    /// a mismatch, or, with `at_end` (the replay matched the whole log),
    /// any difference; `None` when nothing is. `replayed` is the replay's
    /// console buffer, for the text before the first differing byte.
    pub(crate) fn problem(&self, at_end: bool, replayed: &ConsoleBuffer) -> Option<ConsoleProblem> {
        let whole = format!("the recorded console output ({} bytes", self.recorded);
        let diverged =
            |expected: String, found: String| ConsoleProblem::Diverged { expected, found };
        match self.mismatch {
            Some(ConsoleMismatch::Differs {
                offset,
                recorded,
                replayed: byte,
            }) => Some(diverged(
                format!(
                    "{whole} so far), whose byte {offset} is '{}'",
                    recorded.escape_ascii()
                ),
                format!(
                    "console output that differs from byte {offset} on: '{}' after {}",
                    byte.escape_ascii(),
                    text_before(replayed, offset)
                ),
            )),
            Some(ConsoleMismatch::TooFarAhead {
                offset,
                recorded_side: true,
            }) => Some(ConsoleProblem::Unsupported {
                why: format!(
                    "its console output from byte {offset} on runs more than {} bytes ahead of the replayed kernel, more than replay keeps to compare",
                    self.limit
                ),
            }),
            Some(ConsoleMismatch::TooFarAhead {
                offset,
                recorded_side: false,
            }) => Some(diverged(
                format!("{whole} so far)"),
                format!(
                    "more than {} bytes of console output from byte {offset} on that the log does not have",
                    self.limit
                ),
            )),
            None if !self.is_prefix() || (at_end && !self.is_equal()) => {
                let found = match self.recorded_ahead {
                    false => format!(
                        "{} bytes of console output, from byte {} on not in the recording",
                        self.replayed, self.matched
                    ),
                    true => format!(
                        "{} bytes of console output: the recorded bytes from {} on were not printed",
                        self.replayed, self.matched
                    ),
                };
                Some(diverged(format!("{whole})"), found))
            }
            None => None,
        }
    }
}

/// The replayed text just before byte `offset` (the end of its line, at
/// most 60 bytes), quoted, as far as `console` still holds it.
fn text_before(console: &ConsoleBuffer, offset: u64) -> String {
    let from = offset.saturating_sub(60);
    let bytes = console.since(from).unwrap_or_default();
    let bytes = &bytes[..bytes.len().min((offset - from) as usize)];
    let line = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(nl) if nl + 1 < bytes.len() => &bytes[nl + 1..],
        _ => bytes,
    };
    format!("\"{}\"", line.escape_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replayed(c: &mut ConsoleComparison, buffer: &mut ConsoleBuffer, bytes: &[u8]) -> bool {
        let mut found = false;
        for &b in bytes {
            buffer.push(&[b]);
            found |= c.replayed(b);
        }
        found
    }

    /// Whichever side comes first, equal output is equal, a shorter
    /// replay is a prefix (a mismatch only at the end), and nothing is
    /// left pending.
    #[test]
    fn equal_and_prefix_whichever_side_comes_first() {
        let text = b"Linux version 6.1\nRun /init as init process\n";
        for cut in [0, 1, 10, text.len()] {
            let mut c = ConsoleComparison::default();
            let mut buffer = ConsoleBuffer::new();
            c.recorded(&text[..cut]);
            assert!(!replayed(&mut c, &mut buffer, &text[..20]));
            c.recorded(&text[cut..]);
            assert!(c.is_prefix(), "cut {cut}");
            assert!(!c.is_equal());
            assert_eq!(c.problem(false, &buffer), None);
            let at_end = c.problem(true, &buffer).expect("shorter at the end");
            assert!(
                matches!(&at_end, ConsoleProblem::Diverged { found, .. } if found.contains("from 20 on were not printed")),
                "{at_end:?}"
            );
            assert!(!replayed(&mut c, &mut buffer, &text[20..]));
            assert!(c.is_equal());
            assert_eq!(c.problem(true, &buffer), None);
            assert_eq!(c.pending_bytes(), 0);
        }
    }

    /// The first differing byte is found when its second side arrives,
    /// with its offset, and the replay's text before it.
    #[test]
    fn the_first_differing_byte_is_named() {
        let recorded = b"line one\nsecond line: ok\nthird\n";
        let printed = b"line one\nsecond line: KO\nthird\n";
        // The replay first: found when the log's bytes arrive.
        let mut c = ConsoleComparison::default();
        let mut buffer = ConsoleBuffer::new();
        assert!(!replayed(&mut c, &mut buffer, printed));
        c.recorded(recorded);
        // The log first: found at the replayed byte.
        let mut d = ConsoleComparison::default();
        let mut buffer_d = ConsoleBuffer::new();
        d.recorded(recorded);
        assert!(!replayed(&mut d, &mut buffer_d, &printed[..22]));
        assert!(replayed(&mut d, &mut buffer_d, &printed[22..]));
        for (c, buffer) in [(&c, &buffer), (&d, &buffer_d)] {
            assert_eq!(
                c.mismatch(),
                Some(ConsoleMismatch::Differs {
                    offset: 22,
                    recorded: b'o',
                    replayed: b'K'
                })
            );
            assert!(!c.is_prefix());
            let Some(ConsoleProblem::Diverged { expected, found }) = c.problem(false, buffer)
            else {
                panic!("a divergence");
            };
            assert!(expected.contains("byte 22 is 'o'"), "{expected}");
            assert!(
                found.contains("from byte 22 on: 'K' after \"second line: \""),
                "{found}"
            );
        }
    }

    /// More replayed output than the log has is not a prefix.
    #[test]
    fn a_replay_that_prints_more_is_not_a_prefix() {
        let mut c = ConsoleComparison::default();
        let mut buffer = ConsoleBuffer::new();
        c.recorded(b"abc");
        replayed(&mut c, &mut buffer, b"abcdef");
        assert!(!c.is_prefix());
        let Some(ConsoleProblem::Diverged { found, .. }) = c.problem(false, &buffer) else {
            panic!("a divergence");
        };
        assert!(
            found.contains("from byte 3 on not in the recording"),
            "{found}"
        );
    }

    /// A recording whose console runs far ahead of its replay (gigabytes
    /// of console events, say) is not kept beyond the limit: the
    /// comparison gives up with a clear answer and holds nothing more.
    #[test]
    fn a_recorded_console_far_larger_than_the_limit_is_not_kept() {
        let mut c = ConsoleComparison::with_limit(4096);
        let chunk = [b'x'; 1000];
        for _ in 0..1_000 {
            c.recorded(&chunk);
            assert!(c.pending_bytes() <= 4096);
        }
        assert_eq!(
            c.mismatch(),
            Some(ConsoleMismatch::TooFarAhead {
                offset: 0,
                recorded_side: true
            })
        );
        assert_eq!(c.pending_bytes(), 0);
        let problem = c.problem(false, &ConsoleBuffer::new());
        assert!(
            matches!(&problem, Some(ConsoleProblem::Unsupported { why }) if why.contains("more than 4096 bytes ahead")),
            "{problem:?}"
        );
        // Compared as it goes, a long console keeps nothing.
        let mut c = ConsoleComparison::with_limit(4096);
        let mut buffer = ConsoleBuffer::with_window(4096);
        for _ in 0..1_000 {
            c.recorded(&chunk);
            replayed(&mut c, &mut buffer, &chunk);
            assert_eq!(c.pending_bytes(), 0);
        }
        assert!(c.is_equal());
        // A replay printing far more than the log has is a divergence.
        let mut c = ConsoleComparison::with_limit(4096);
        assert!(replayed(&mut c, &mut buffer, &[b'y'; 5000]));
        let Some(ConsoleProblem::Diverged { found, .. }) = c.problem(false, &buffer) else {
            panic!("a divergence");
        };
        assert!(found.contains("more than 4096 bytes"), "{found}");
    }
}
