// SPDX-License-Identifier: GPL-2.0-or-later
//! An [`EventLogReader`] on a thread of its own: chunks are decompressed
//! and events decoded in batches ahead of the consumer, so that replay's
//! run loop does not wait for zstd and postcard (a quarter of a syscall
//! storm's replay on one thread).

use super::{EventLogReader, LogError, ReadEvent, StreamEnd};
use std::path::PathBuf;
use std::sync::mpsc;

/// Events sent to the consumer at once (a channel message per event
/// would cost more than decoding it).
const BATCH_EVENTS: usize = 512;
/// Batches decoded ahead, at most: about 1 MiB of events.
const BATCHES_AHEAD: usize = 8;

enum Message {
    Events(Vec<ReadEvent>),
    /// The log ended, cleanly or not ([`EventLogReader::end`]).
    End(Option<StreamEnd>),
    Failed(LogError),
}

enum State {
    /// Not read from yet: the thread starts at the first read (a replay's
    /// snapshot holds a reader it may never use).
    Idle(Box<EventLogReader>),
    Running(mpsc::Receiver<Message>),
    Ended,
}

/// Reads as [`EventLogReader::next_event`] does, decoding on another
/// thread. Dropping it stops that thread at its next batch.
pub struct PrefetchingEventReader {
    path: PathBuf,
    state: State,
    batch: std::vec::IntoIter<ReadEvent>,
    end: Option<StreamEnd>,
    failure: Option<LogError>,
}

impl PrefetchingEventReader {
    pub fn new(reader: EventLogReader) -> PrefetchingEventReader {
        PrefetchingEventReader {
            path: reader.path().to_path_buf(),
            state: State::Idle(Box::new(reader)),
            batch: Vec::new().into_iter(),
            end: None,
            failure: None,
        }
    }

    /// The next event; `Ok(None)` at the end of the log (then
    /// [`Self::end`] says how it ended), `Err` once where the reader
    /// failed.
    pub fn next_event(&mut self) -> Result<Option<ReadEvent>, LogError> {
        loop {
            if let Some(e) = self.batch.next() {
                return Ok(Some(e));
            }
            let rx = match &self.state {
                State::Ended => {
                    return match self.failure.take() {
                        Some(e) => Err(e),
                        None => Ok(None),
                    };
                }
                State::Running(rx) => rx,
                State::Idle(_) => {
                    self.start();
                    continue;
                }
            };
            match rx.recv() {
                Ok(Message::Events(events)) => self.batch = events.into_iter(),
                Ok(Message::End(end)) => {
                    self.end = end;
                    self.state = State::Ended;
                }
                Ok(Message::Failed(e)) => {
                    self.failure = Some(e);
                    self.state = State::Ended;
                }
                Err(mpsc::RecvError) => {
                    // The thread is gone without a word: it panicked.
                    self.failure = Some(LogError::Io {
                        path: self.path.clone(),
                        source: std::io::Error::other("the log's reader thread stopped"),
                    });
                    self.state = State::Ended;
                }
            }
        }
    }

    /// How the log ends; `None` until the reading reached the end.
    pub fn end(&self) -> Option<&StreamEnd> {
        self.end.as_ref()
    }

    fn start(&mut self) {
        let State::Idle(mut reader) = std::mem::replace(&mut self.state, State::Ended) else {
            return;
        };
        let (tx, rx) = mpsc::sync_channel(BATCHES_AHEAD);
        let spawned = std::thread::Builder::new()
            .name("krr-log-reader".into())
            .spawn(move || loop {
                let mut events = Vec::with_capacity(BATCH_EVENTS);
                let last = loop {
                    if events.len() == BATCH_EVENTS {
                        break None;
                    }
                    match reader.next_event() {
                        Ok(Some(e)) => events.push(e),
                        Ok(None) => break Some(Message::End(reader.end().cloned())),
                        Err(e) => break Some(Message::Failed(e)),
                    }
                };
                if !events.is_empty() && tx.send(Message::Events(events)).is_err() {
                    return;
                }
                if let Some(last) = last {
                    let _ = tx.send(last);
                    return;
                }
            });
        match spawned {
            Ok(_) => self.state = State::Running(rx),
            Err(e) => {
                self.failure = Some(LogError::Io {
                    path: self.path.clone(),
                    source: e,
                });
            }
        }
    }
}
