// SPDX-License-Identifier: GPL-2.0-or-later
//! `runs.jsonl`: one JSON object per line, written as each cell finishes.
//! It is both the eval's raw results and the journal `--resume` continues
//! from: a provenance line when a run starts or resumes, then one line per
//! finished cell.

use super::plan::Matrix;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

pub const JOURNAL_FILE: &str = "runs.jsonl";

/// Where and on what the cells ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    pub started_at: String,
    /// Whether this line starts a resumed run.
    pub resumed: bool,
    pub project_commit: String,
    pub host_kernel: String,
    pub cpu_model: String,
    pub host_cpus: usize,
    pub qemu_version: String,
    /// The backend `krr` uses for `native` and `krr` cells, and why.
    pub backend: String,
    pub backend_reason: String,
    /// Image name -> file name -> sha256.
    pub images: BTreeMap<String, BTreeMap<String, String>>,
    pub matrix: Matrix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Failed,
    /// The scheme cannot run this configuration (the peer refuses it).
    Unsupported,
}

/// One finished cell.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CellRecord {
    pub key: String,
    pub workload: String,
    pub scheme: String,
    pub vcpus: u32,
    pub repetition: u32,
    pub status: Option<Status>,
    /// Why a cell failed or is unsupported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Host wall seconds of the measured window (the console lines around
    /// the workload's command, stamped as they arrived).
    pub wall_seconds: Option<f64>,
    /// Host wall seconds of the whole guest process (boot included).
    pub process_wall_seconds: Option<f64>,
    /// Guest instructions in the window (engine schemes).
    pub guest_instructions: Option<u64>,
    /// Guest (virtual) seconds of the window, on the engine's clock (one
    /// instruction per nanosecond while running).
    pub virtual_seconds: Option<f64>,
    /// The workload's own metrics, from the console, on the guest's clock.
    pub metrics: BTreeMap<String, f64>,
    pub exit_status: Option<i32>,
    pub guest_status: Option<i32>,
    /// Bytes of the recording's logs (events and DMA; QEMU's replay file).
    pub log_bytes: Option<u64>,
    pub log_events: Option<u64>,
    /// Bytes of the recording's start snapshot (memory, CPUs, devices).
    pub snapshot_bytes: Option<u64>,
    /// Seconds the guest stood still for the start snapshot.
    pub snapshot_pause_seconds: Option<f64>,
    pub replay_seconds: Option<f64>,
    /// `matched`, or what ended the replay otherwise.
    pub replay_verdict: Option<String>,
    /// Where a failed cell's recording was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_recording: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_console_lines: Vec<String>,
    pub finished_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    Provenance(Box<Provenance>),
    Cell(Box<CellRecord>),
}

/// The journal of one eval directory.
pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Opens (creating) `dir/runs.jsonl` for appending.
    pub fn open(dir: &Path) -> Result<Journal> {
        Journal::open_file(&dir.join(JOURNAL_FILE))
    }

    /// Opens (creating) a JSON-lines file for appending.
    pub fn open_file(path: &Path) -> Result<Journal> {
        let path = path.to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Journal { path, file })
    }

    /// Appends one line and syncs it, so a crash loses no finished cell.
    pub fn append(&mut self, entry: &impl Serialize) -> Result<()> {
        let mut line = serde_json::to_string(entry)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Every entry of `dir/runs.jsonl`. A last line cut short by a crash is
/// dropped (its cell runs again); a broken line elsewhere is an error
/// naming it.
pub fn read(dir: &Path) -> Result<Vec<Entry>> {
    read_lines(&dir.join(JOURNAL_FILE))
}

/// Every line of a JSON-lines journal at `path` (see [`read`]).
pub fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", path.display()))?;
    let mut entries = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<T>(line) {
            Ok(e) => entries.push(e),
            Err(_) if i + 1 == lines.len() && !line.ends_with('}') => break,
            Err(e) => bail!("{}:{}: not a journal entry: {e}", path.display(), i + 1),
        }
    }
    Ok(entries)
}

/// The cells of `entries`, the last record of each key winning.
pub fn cells(entries: &[Entry]) -> Vec<CellRecord> {
    let mut by_key: BTreeMap<String, (usize, CellRecord)> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        if let Entry::Cell(c) = e {
            by_key.insert(c.key.clone(), (i, (**c).clone()));
        }
    }
    let mut cells: Vec<(usize, CellRecord)> = by_key.into_values().collect();
    cells.sort_by_key(|(i, _)| *i);
    cells.into_iter().map(|(_, c)| c).collect()
}

/// The first provenance line: the matrix the run was started with.
pub fn first_provenance(entries: &[Entry]) -> Option<&Provenance> {
    entries.iter().find_map(|e| match e {
        Entry::Provenance(p) => Some(&**p),
        Entry::Cell(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(key: &str, status: Status) -> Entry {
        Entry::Cell(Box::new(CellRecord {
            key: key.into(),
            status: Some(status),
            ..CellRecord::default()
        }))
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_a_broken_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(&cell("a", Status::Failed)).unwrap();
        j.append(&cell("b", Status::Ok)).unwrap();
        j.append(&cell("a", Status::Ok)).unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"type\":\"cell\",\"key\":\"c\",\"wal");
        std::fs::write(&path, &text).unwrap();
        let entries = read(dir.path()).unwrap();
        let got: Vec<(String, Option<Status>)> = cells(&entries)
            .into_iter()
            .map(|c| (c.key, c.status))
            .collect();
        assert_eq!(
            got,
            [
                ("b".to_string(), Some(Status::Ok)),
                ("a".into(), Some(Status::Ok))
            ]
        );
        std::fs::write(&path, format!("not json\n{text}")).unwrap();
        let err = format!("{:#}", read(dir.path()).unwrap_err());
        assert!(err.contains("runs.jsonl:1: not a journal entry"), "{err}");
    }
}
