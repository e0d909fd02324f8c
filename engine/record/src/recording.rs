// SPDX-License-Identifier: GPL-2.0-or-later
//! The recording directory: everything one recording needs to be replayed
//! and checked, self-described.
//!
//! ```text
//! $KRR_RECORDINGS/NAME/            (default parent: results/recordings)
//!   header.json        RecordingHeader, written first (atomically)
//!   snapshot/
//!     memory.zst       guest RAM at the start (layout below)
//!     cpus.json        Vec<CpuSnapshot>
//!     devices.json     the machine's device state (opaque JSON)
//!   events.krrlog      the event stream (super::log, kind "events")
//!   dma.krrlog         bytes devices wrote to guest memory (kind "dma")
//!   end.json           RecordingEnd, written last (atomically)
//! ```
//!
//! A directory without `end.json` is an unfinished recording: the engine
//! was killed or is still running. Its flushed prefix is still valid;
//! [`verify`] says where it ends.
//!
//! `snapshot/memory.zst` is one zstd frame (with zstd's content checksum)
//! of: the magic `"KRRMEM\0\0"`, u32 version (1), u32 region count, then
//! per region u64 guest-physical address and u64 length (little-endian),
//! then the regions' bytes in that order. The other snapshot files are
//! written to a temporary name and renamed, so a file under its final name
//! is complete.

use super::abi;
use super::event::{LogEvent, ENGINE_CLASSES};
use super::log::{
    self, DmaLogWriter, EventLogReader, EventLogWriter, LogError, StreamEnd, StreamScan,
    StreamTotals,
};
use super::memory_image::MemoryCopy;
use krr_hypervisor::{DebugRegs, Regs, Sregs};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Environment variable naming the directory recordings are kept in.
pub const RECORDINGS_ENV: &str = "KRR_RECORDINGS";
/// Default parent of recordings, relative to the current directory.
pub const DEFAULT_RECORDINGS_DIR: &str = "results/recordings";
/// File names inside a recording directory.
pub const HEADER_FILE: &str = "header.json";
pub const END_FILE: &str = "end.json";
pub const EVENTS_FILE: &str = "events.krrlog";
pub const DMA_FILE: &str = "dma.krrlog";
pub const SNAPSHOT_DIR: &str = "snapshot";
pub const MEMORY_FILE: &str = "memory.zst";
pub const CPUS_FILE: &str = "cpus.json";
pub const DEVICES_FILE: &str = "devices.json";
/// Magic and version of the memory image inside `memory.zst`.
pub(super) const MEMORY_MAGIC: [u8; 8] = *b"KRRMEM\0\0";
pub(super) const MEMORY_VERSION: u32 = 1;

/// Errors of the recording directory.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error(
        "{path} already exists and is not empty: refusing to overwrite a recording \
         (pick another name or remove it)"
    )]
    Exists { path: PathBuf },
    #[error(
        "no recording named {name} under {parent} (set {RECORDINGS_ENV}, or pass a path with a '/'){hint}"
    )]
    NotFound {
        name: String,
        parent: PathBuf,
        hint: String,
    },
    #[error("{path} is not a recording: it has no {HEADER_FILE}")]
    NotARecording { path: PathBuf },
    #[error(transparent)]
    Log(#[from] LogError),
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RecordingError + '_ {
    move |source| RecordingError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, problem: impl Into<String>) -> RecordingError {
    RecordingError::Invalid {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// The directory recordings are kept in: `$KRR_RECORDINGS`, else
/// `results/recordings` under the current directory.
pub fn recordings_dir() -> PathBuf {
    match std::env::var_os(RECORDINGS_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_RECORDINGS_DIR),
    }
}

/// The one rule for naming a recording (`krr replay`, `krr log`, the
/// harness): an argument with a `/` is a path (`./NAME`, `/abs/dir`); a
/// plain name, which is what `krr record --name` accepts, is a directory
/// under [`recordings_dir`], whatever the current directory holds.
pub fn resolve(name_or_path: &str) -> PathBuf {
    if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        recordings_dir().join(name_or_path)
    }
}

/// [`resolve`], checked: the directory exists and has a `header.json`.
pub fn find(name_or_path: &str) -> Result<PathBuf, RecordingError> {
    let dir = resolve(name_or_path);
    if !dir.exists() {
        let local = Path::new(name_or_path);
        let hint = if !name_or_path.contains('/') && local.join(HEADER_FILE).exists() {
            format!("; ./{name_or_path} is a recording: a path needs a '/', as in ./{name_or_path}")
        } else {
            String::new()
        };
        return Err(RecordingError::NotFound {
            name: name_or_path.to_string(),
            parent: recordings_dir(),
            hint,
        });
    }
    if !dir.join(HEADER_FILE).exists() {
        return Err(RecordingError::NotARecording { path: dir });
    }
    Ok(dir)
}

/// A file and its sha256.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub path: String,
    /// Lower-case hex.
    pub sha256: String,
}

impl FileDigest {
    /// Hashes `path` (streaming).
    pub fn of(path: &Path) -> Result<FileDigest, RecordingError> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        io::copy(&mut reader, &mut hasher).map_err(io_err(path))?;
        Ok(FileDigest {
            path: path.display().to_string(),
            sha256: format!("{:x}", hasher.finalize()),
        })
    }
}

/// The host a recording was made on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    /// `PRETTY_NAME` of /etc/os-release.
    pub os: String,
    /// The host kernel's release (`uname -r`).
    pub kernel: String,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    pub cpus: usize,
}

impl HostInfo {
    /// This host (fields it cannot read are left empty).
    pub fn current() -> HostInfo {
        let read = |p: &str| {
            fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        HostInfo {
            hostname: read("/proc/sys/kernel/hostname"),
            os,
            kernel: read("/proc/sys/kernel/osrelease"),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        }
    }
}

/// Where the agent's ring was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingInfo {
    pub phys: u64,
    pub size: u64,
}

/// `header.json`: what was recorded, on what, how.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordingHeader {
    /// [`log::FORMAT_VERSION`] of the whole directory.
    pub format_version: u32,
    /// The engine's package version.
    pub engine_version: String,
    pub name: String,
    /// 1 for the first recording of a VM run, 2 for the second, ...
    pub segment: u32,
    /// Unix seconds at creation.
    pub created: u64,
    pub kernel: FileDigest,
    pub vmlinux: Option<FileDigest>,
    pub initrd: Option<FileDigest>,
    /// The disk image as it was when the VM started.
    pub disk: Option<FileDigest>,
    pub cmdline: String,
    pub vcpus: usize,
    pub mem_bytes: u64,
    /// CPU backend ("tcg", "kvm", ...).
    pub backend: String,
    pub host: HostInfo,
    pub ring: Option<RingInfo>,
    /// "boot", "marker:TEXT", "guest".
    pub start_trigger: String,
    /// "end", "marker:TEXT", "guest".
    pub stop_trigger: String,
    /// Further machine settings replay needs to match (quantum, ...).
    #[serde(default)]
    pub machine: serde_json::Value,
}

impl RecordingHeader {
    /// A header with the format and engine version, creation time and host
    /// filled in; the caller fills the rest.
    pub fn new(name: &str) -> RecordingHeader {
        RecordingHeader {
            format_version: log::FORMAT_VERSION,
            engine_version: env!("CARGO_PKG_VERSION").to_string(),
            name: name.to_string(),
            segment: 1,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            host: HostInfo::current(),
            ..RecordingHeader::default()
        }
    }
}

/// One vCPU's state in the start snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuSnapshot {
    pub id: usize,
    /// "running", "halted", "wait-for-sipi", "stopped".
    pub state: String,
    /// Instructions retired so far (the backend's count; see
    /// [`super::event::Position`]).
    pub icount: u64,
    /// Of `icount`, instructions of kernel code (replay of the kernel alone
    /// counts from here).
    #[serde(default)]
    pub kernel_icount: u64,
    pub regs: Regs,
    pub sregs: Sregs,
    /// FXSAVE/XSAVE area, as a hex string in JSON.
    #[serde(with = "hex_bytes")]
    pub fpu: Vec<u8>,
    /// (index, value) of the MSRs the backend saves.
    pub msrs: Vec<(u32, u64)>,
    pub debug: DebugRegs,
}

/// Byte vectors as hex strings in JSON (4 KiB of XSAVE area stays one
/// short line instead of 4096 array elements).
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(&text).map_err(serde::de::Error::custom)
    }
}

/// `end.json`: how the recording ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordingEnd {
    /// "run ended: ...", "stopped by guest", "marker", "interrupted
    /// (SIGINT)", "agent lost events", ...
    pub reason: String,
    /// Replayable as far as the recorder knows.
    pub ok: bool,
    /// Events written ([`RecordingWriter::finish`] fills the stream
    /// totals from its own counts).
    pub events: u64,
    pub event_chunks: u32,
    pub event_bytes_raw: u64,
    pub event_bytes_compressed: u64,
    /// Size of events.krrlog.
    pub event_file_bytes: u64,
    pub dma_bytes: u64,
    pub dma_bytes_compressed: u64,
    pub instructions_per_vcpu: Vec<u64>,
    /// Of `instructions_per_vcpu`, those of kernel code: replay runs the
    /// kernel alone and stops there at the latest.
    #[serde(default)]
    pub kernel_instructions_per_vcpu: Vec<u64>,
    /// The vCPU whose triple fault ended the run (`reboot=t`, or an
    /// exception that could not be delivered): replay ends there too.
    #[serde(default)]
    pub triple_fault_vcpu: Option<usize>,
    /// Guest (virtual clock) time the recording covers.
    pub virtual_ns: u64,
    pub wall_seconds: f64,
    pub agent_events_written: u64,
    pub agent_dropped_events: u64,
    pub agent_doorbells: u64,
    /// Wall seconds the start snapshot stopped the guest (RAM copied, vCPU
    /// and device state written).
    #[serde(default)]
    pub snapshot_seconds: f64,
    /// Wall seconds the memory image took to compress and sync, on a
    /// background thread while the guest ran.
    #[serde(default)]
    pub snapshot_write_seconds: f64,
    /// Unix seconds at the end.
    pub finished: u64,
    /// The kernel's crash report, when the run ended in a panic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash: Option<krr_crash::CrashReport>,
}

/// Writes `data` to `path` through a temporary file and a rename, so the
/// final name only ever holds a complete file.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), RecordingError> {
    let tmp = tmp_name(path);
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(data).map_err(io_err(&tmp))?;
    file.sync_data().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

pub(super) fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RecordingError> {
    let mut text = serde_json::to_vec_pretty(value)
        .map_err(|e| invalid(path, format!("cannot encode JSON: {e}")))?;
    text.push(b'\n');
    write_atomic(path, &text)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, RecordingError> {
    let text = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&text).map_err(|e| invalid(path, format!("invalid JSON: {e}")))
}

/// Reads `header.json` and checks its format version.
pub fn load_header(dir: &Path) -> Result<RecordingHeader, RecordingError> {
    let path = dir.join(HEADER_FILE);
    if !path.exists() {
        return Err(RecordingError::NotARecording {
            path: dir.to_path_buf(),
        });
    }
    let header: RecordingHeader = read_json(&path)?;
    if header.format_version != log::FORMAT_VERSION {
        return Err(invalid(
            &path,
            format!(
                "format_version {} is not one this engine reads ({})",
                header.format_version,
                log::FORMAT_VERSION
            ),
        ));
    }
    Ok(header)
}

/// Reads `end.json`; `None` when the recording did not finish.
pub fn load_end(dir: &Path) -> Result<Option<RecordingEnd>, RecordingError> {
    let path = dir.join(END_FILE);
    if !path.exists() {
        return Ok(None);
    }
    read_json(&path).map(Some)
}

/// Reads `snapshot/cpus.json`.
pub fn load_cpus(dir: &Path) -> Result<Vec<CpuSnapshot>, RecordingError> {
    read_json(&dir.join(SNAPSHOT_DIR).join(CPUS_FILE))
}

/// Reads `snapshot/devices.json`.
pub fn load_devices(dir: &Path) -> Result<serde_json::Value, RecordingError> {
    read_json(&dir.join(SNAPSHOT_DIR).join(DEVICES_FILE))
}

/// Streams the memory image of `dir`: calls `region` once per region and
/// `data` with its bytes in pieces, in order. Returns the region list.
fn read_memory_image(
    dir: &Path,
    mut data: impl FnMut(usize, u64, &[u8]) -> Result<(), RecordingError>,
) -> Result<Vec<(u64, u64)>, RecordingError> {
    let path = dir.join(SNAPSHOT_DIR).join(MEMORY_FILE);
    let file = File::open(&path).map_err(io_err(&path))?;
    let mut dec = zstd::stream::read::Decoder::new(file).map_err(io_err(&path))?;
    let bad = |what: String| invalid(&path, what);
    let zerr = |e: io::Error| invalid(&path, format!("memory image does not decompress: {e}"));
    let mut head = [0u8; 16];
    dec.read_exact(&mut head).map_err(zerr)?;
    if head[..8] != MEMORY_MAGIC {
        return Err(bad("memory image magic is not \"KRRMEM\\0\\0\"".into()));
    }
    let version = u32::from_le_bytes(head[8..12].try_into().unwrap());
    if version != MEMORY_VERSION {
        return Err(bad(format!(
            "memory image version {version}, expected {MEMORY_VERSION}"
        )));
    }
    let count = u32::from_le_bytes(head[12..16].try_into().unwrap());
    if count > 1024 {
        return Err(bad(format!("memory image claims {count} regions")));
    }
    let mut regions = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let mut r = [0u8; 16];
        dec.read_exact(&mut r).map_err(zerr)?;
        regions.push((
            u64::from_le_bytes(r[..8].try_into().unwrap()),
            u64::from_le_bytes(r[8..].try_into().unwrap()),
        ));
    }
    let mut buf = vec![0u8; 4 << 20];
    for (i, &(_, len)) in regions.iter().enumerate() {
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            dec.read_exact(&mut buf[..n]).map_err(|e| {
                bad(format!(
                    "memory image ends inside region {i} ({at} of {len} bytes): {e}"
                ))
            })?;
            data(i, at, &buf[..n])?;
            at += n as u64;
        }
    }
    // Reading to the end makes zstd check the frame's content checksum.
    let mut rest = Vec::new();
    dec.read_to_end(&mut rest).map_err(zerr)?;
    if !rest.is_empty() {
        return Err(bad(format!(
            "{} bytes follow the last memory region",
            rest.len()
        )));
    }
    Ok(regions)
}

/// The start snapshot's guest RAM: (guest-physical address, bytes) per
/// region.
pub fn load_memory(dir: &Path) -> Result<Vec<(u64, Vec<u8>)>, RecordingError> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let regions = read_memory_image(dir, |i, _, bytes| {
        if out.len() <= i {
            out.resize_with(i + 1, Vec::new);
        }
        out[i].extend_from_slice(bytes);
        Ok(())
    })?;
    out.resize_with(regions.len(), Vec::new);
    Ok(regions.iter().map(|r| r.0).zip(out).collect())
}

/// Loads the start snapshot's RAM into `mem`, whose regions must be the
/// snapshot's.
pub fn load_memory_into<M: GuestMemoryBackend>(dir: &Path, mem: &M) -> Result<(), RecordingError> {
    let path = dir.join(SNAPSHOT_DIR).join(MEMORY_FILE);
    let ours: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let regions: Vec<&M::R> = mem.iter().collect();
    let theirs = read_memory_image(dir, |i, at, bytes| {
        let region = regions.get(i).ok_or_else(|| {
            invalid(
                &path,
                format!("snapshot region {i} does not exist in guest memory {ours:x?}"),
            )
        })?;
        region
            .write_slice(bytes, MemoryRegionAddress(at))
            .map_err(|e| invalid(&path, format!("region {i} at {at:#x}: {e}")))
    })?;
    if theirs != ours {
        return Err(invalid(
            &path,
            format!("snapshot regions {theirs:x?} differ from guest memory {ours:x?}"),
        ));
    }
    Ok(())
}

/// Writes one recording directory.
pub struct RecordingWriter {
    dir: PathBuf,
    events: EventLogWriter,
    dma: DmaLogWriter,
    /// The start snapshot's memory image being written (seconds it took).
    memory_writer: Option<std::thread::JoinHandle<Result<f64, RecordingError>>>,
}

impl RecordingWriter {
    /// Creates `dir` (and its parents; an existing non-empty `dir` is
    /// refused) and writes `header.json`, then opens the two streams.
    pub fn create(dir: &Path, header: &RecordingHeader) -> Result<RecordingWriter, RecordingError> {
        if dir.exists() {
            let mut entries = fs::read_dir(dir).map_err(io_err(dir))?;
            if entries.next().is_some() {
                return Err(RecordingError::Exists {
                    path: dir.to_path_buf(),
                });
            }
        }
        fs::create_dir_all(dir.join(SNAPSHOT_DIR)).map_err(io_err(dir))?;
        let mut header = header.clone();
        header.format_version = log::FORMAT_VERSION;
        write_json(&dir.join(HEADER_FILE), &header)?;
        Ok(RecordingWriter {
            dir: dir.to_path_buf(),
            events: EventLogWriter::create(&dir.join(EVENTS_FILE))?,
            dma: DmaLogWriter::create(&dir.join(DMA_FILE))?,
            memory_writer: None,
        })
    }

    /// The directory written.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the start snapshot: the vCPUs and devices now, and guest RAM
    /// from `memory` on a background thread ([`RecordingWriter::finish`]
    /// waits for it).
    pub fn write_snapshot(
        &mut self,
        memory: MemoryCopy,
        cpus: &[CpuSnapshot],
        devices: serde_json::Value,
    ) -> Result<(), RecordingError> {
        let snap = self.dir.join(SNAPSHOT_DIR);
        write_json(&snap.join(CPUS_FILE), &cpus)?;
        write_json(&snap.join(DEVICES_FILE), &devices)?;
        self.memory_writer = Some(memory.write_in_background(snap.join(MEMORY_FILE))?);
        Ok(())
    }

    /// Waits for the start snapshot's memory image to be on disk; returns
    /// the seconds its background write took (0 if there was none).
    pub fn wait_for_snapshot(&mut self) -> Result<f64, RecordingError> {
        match self.memory_writer.take() {
            None => Ok(0.0),
            Some(handle) => handle.join().unwrap_or_else(|_| {
                Err(invalid(
                    &self.dir.join(SNAPSHOT_DIR).join(MEMORY_FILE),
                    "the snapshot writer thread panicked",
                ))
            }),
        }
    }

    /// Appends one event; returns its index. When the events chunk is full
    /// the DMA stream is flushed first, so a Dma event never reaches the
    /// file before its bytes do.
    pub fn event(&mut self, event: &LogEvent) -> Result<u64, RecordingError> {
        if self.events.is_full() {
            // Events may name DMA bytes of the pending DMA chunk: those are
            // in the file before the events chunk is handed off.
            self.dma.flush()?;
            self.events.close()?;
        }
        Ok(self.events.append_deferred(event)?)
    }

    /// Appends DMA bytes; returns their offset in the DMA stream (for the
    /// [`LogEvent::Dma`] that describes them).
    pub fn dma(&mut self, bytes: &[u8]) -> Result<u64, RecordingError> {
        Ok(self.dma.append(bytes)?)
    }

    /// Closes the current chunks (DMA first): everything so far survives
    /// the engine being killed.
    pub fn flush(&mut self) -> Result<(), RecordingError> {
        self.dma.flush()?;
        self.events.flush()?;
        Ok(())
    }

    /// Totals of the event stream so far.
    pub fn event_totals(&self) -> StreamTotals {
        self.events.totals()
    }

    /// Totals of the DMA stream so far.
    pub fn dma_totals(&self) -> StreamTotals {
        self.dma.totals()
    }

    /// Waits for the snapshot's memory image, flushes and syncs both
    /// streams and writes `end.json`, its stream totals taken from the
    /// writer's own counts; returns what it wrote.
    pub fn finish(mut self, mut end: RecordingEnd) -> Result<RecordingEnd, RecordingError> {
        end.snapshot_write_seconds = self.wait_for_snapshot()?;
        self.dma.sync()?;
        self.events.sync()?;
        let ev = self.events.totals();
        let dma = self.dma.totals();
        end.events = ev.items;
        end.event_chunks = ev.chunks;
        end.event_bytes_raw = ev.raw_bytes;
        end.event_bytes_compressed = ev.compressed_bytes;
        end.event_file_bytes = ev.file_bytes;
        end.dma_bytes = dma.items;
        end.dma_bytes_compressed = dma.compressed_bytes;
        if end.finished == 0 {
            end.finished = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
        }
        write_json(&self.dir.join(END_FILE), &end)?;
        Ok(end)
    }
}

/// Overall verdict of [`verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyStatus {
    /// Finished, every stream complete and intact.
    Ok,
    /// Unfinished or truncated, but what is there is valid.
    PrefixValid,
    /// Something failed a check.
    Damaged,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub dir: PathBuf,
    pub status: VerifyStatus,
    pub header: Option<RecordingHeader>,
    pub end: Option<RecordingEnd>,
    /// Events in the valid prefix.
    pub events: u64,
    pub event_chunks: usize,
    /// Bytes of events.krrlog that are valid.
    pub event_valid_bytes: u64,
    pub event_file_bytes: u64,
    pub events_end: Option<StreamEnd>,
    /// DMA bytes in the valid prefix.
    pub dma_bytes: u64,
    pub dma_end: Option<StreamEnd>,
    /// Agent records and their first/last sequence numbers.
    pub agent_events: u64,
    pub agent_seq: Option<(u64, u64)>,
    /// Failed checks (each makes the recording DAMAGED).
    pub problems: Vec<String>,
    /// Why the recording is only a prefix, and warnings.
    pub notes: Vec<String>,
}

impl VerifyReport {
    /// `krr log verify`'s exit code: 0 complete and intact, 1 a valid
    /// prefix (truncated or unfinished), 2 damaged.
    pub fn exit_code(&self) -> i32 {
        match self.status {
            VerifyStatus::Ok => 0,
            VerifyStatus::PrefixValid => 1,
            VerifyStatus::Damaged => 2,
        }
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let summary = format!(
            "{} events in {} chunks ({} bytes)",
            self.events, self.event_chunks, self.event_valid_bytes
        );
        match self.status {
            VerifyStatus::Ok => write!(f, "OK: {summary}, complete")?,
            VerifyStatus::PrefixValid => write!(f, "PREFIX VALID: {summary}")?,
            VerifyStatus::Damaged => write!(f, "DAMAGED: {}", self.problems.join("; "))?,
        }
        if self.status == VerifyStatus::Damaged {
            write!(f, "\n  valid before the damage: {summary}")?;
        }
        if self.dma_bytes > 0
            || self
                .dma_end
                .as_ref()
                .is_some_and(|e| *e != StreamEnd::Complete)
        {
            write!(f, "\n  dma: {} bytes", self.dma_bytes)?;
        }
        if let Some((first, last)) = self.agent_seq {
            write!(
                f,
                "\n  agent: {} records, seq {first}..={last}",
                self.agent_events
            )?;
        }
        for note in &self.notes {
            write!(f, "\n  {note}")?;
        }
        Ok(())
    }
}

fn describe_end(file: &str, end: &StreamEnd, items_before: u64, what: &str) -> Option<String> {
    match end {
        StreamEnd::Complete => None,
        StreamEnd::Truncated { offset, reason } => Some(format!(
            "the log ends at byte {offset} of {file} (truncated: {reason})"
        )),
        StreamEnd::Damaged {
            chunk_index,
            offset,
            what: problem,
        } => Some(format!(
            "chunk {chunk_index} at byte offset {offset} of {file}: {problem}; the {items_before} {what} before it are valid"
        )),
    }
}

/// Checks a recording directory: header, snapshot, both streams (every
/// chunk), the references of Dma events into the DMA stream, the agent's
/// sequence numbers, and whether it finished. Errors only when `dir` is
/// not a recording at all; everything else is in the report.
pub fn verify(dir: &Path) -> Result<VerifyReport, RecordingError> {
    if !dir.join(HEADER_FILE).exists() {
        return Err(RecordingError::NotARecording {
            path: dir.to_path_buf(),
        });
    }
    let mut r = VerifyReport {
        dir: dir.to_path_buf(),
        status: VerifyStatus::Ok,
        header: None,
        end: None,
        events: 0,
        event_chunks: 0,
        event_valid_bytes: 0,
        event_file_bytes: 0,
        events_end: None,
        dma_bytes: 0,
        dma_end: None,
        agent_events: 0,
        agent_seq: None,
        problems: Vec::new(),
        notes: Vec::new(),
    };
    let mut truncated = false;
    match load_header(dir) {
        Ok(h) => r.header = Some(h),
        Err(e) => r.problems.push(e.to_string()),
    }
    match load_end(dir) {
        Ok(end) => r.end = end,
        Err(e) => r.problems.push(e.to_string()),
    }
    let finished = r.end.is_some();

    // Snapshot.
    let snap = dir.join(SNAPSHOT_DIR);
    let mut snapshot_missing = Vec::new();
    for name in [MEMORY_FILE, CPUS_FILE, DEVICES_FILE] {
        if !snap.join(name).exists() {
            snapshot_missing.push(format!("{SNAPSHOT_DIR}/{name}"));
        }
    }
    if !snapshot_missing.is_empty() {
        let text = format!("the start snapshot lacks {}", snapshot_missing.join(", "));
        if finished {
            r.problems.push(text);
        } else {
            r.notes.push(text);
            truncated = true;
        }
    } else {
        let mut total = 0u64;
        match read_memory_image(dir, |_, _, bytes| {
            total += bytes.len() as u64;
            Ok(())
        }) {
            Ok(regions) => {
                if let Some(h) = &r.header {
                    if total != h.mem_bytes {
                        r.problems.push(format!(
                            "{SNAPSHOT_DIR}/{MEMORY_FILE} holds {total} bytes of RAM in {} regions, header.json says mem_bytes {}",
                            regions.len(),
                            h.mem_bytes
                        ));
                    }
                }
            }
            Err(e) => r.problems.push(e.to_string()),
        }
        match load_cpus(dir) {
            Ok(cpus) => {
                if let Some(h) = &r.header {
                    if cpus.len() != h.vcpus {
                        r.problems.push(format!(
                            "{SNAPSHOT_DIR}/{CPUS_FILE} holds {} vCPUs, header.json says {}",
                            cpus.len(),
                            h.vcpus
                        ));
                    }
                }
            }
            Err(e) => r.problems.push(e.to_string()),
        }
        if let Err(e) = load_devices(dir) {
            r.problems.push(e.to_string());
        }
    }

    // Streams.
    let scan_stream = |name: &str| -> Result<Option<StreamScan>, String> {
        let path = dir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        log::scan(&path).map(Some).map_err(|e| e.to_string())
    };
    let dma_scan = match scan_stream(DMA_FILE) {
        Ok(s) => s,
        Err(e) => {
            r.problems.push(e);
            None
        }
    };
    if let Some(s) = &dma_scan {
        r.dma_bytes = s.items();
        r.dma_end = Some(s.end.clone());
        match &s.end {
            StreamEnd::Complete => {}
            StreamEnd::Truncated { .. } => {
                truncated = true;
                r.notes
                    .extend(describe_end(DMA_FILE, &s.end, s.items(), "bytes"));
            }
            StreamEnd::Damaged { .. } => {
                r.problems
                    .extend(describe_end(DMA_FILE, &s.end, s.items(), "bytes"));
            }
        }
    } else if !dir.join(DMA_FILE).exists() {
        let text = format!("{DMA_FILE} is missing");
        if finished {
            r.problems.push(text);
        } else {
            r.notes.push(text);
        }
    }
    let events_scan = match scan_stream(EVENTS_FILE) {
        Ok(s) => s,
        Err(e) => {
            r.problems.push(e);
            None
        }
    };
    if let Some(s) = &events_scan {
        r.events = s.items();
        r.event_chunks = s.chunks.len();
        r.event_valid_bytes = s.valid_len();
        r.event_file_bytes = s.file_len;
        r.events_end = Some(s.end.clone());
        match &s.end {
            StreamEnd::Complete => {}
            StreamEnd::Truncated { .. } => {
                truncated = true;
                r.notes
                    .extend(describe_end(EVENTS_FILE, &s.end, s.items(), "events"));
            }
            StreamEnd::Damaged { .. } => {
                // The stream's damage leads the report.
                r.problems.insert(
                    0,
                    describe_end(EVENTS_FILE, &s.end, s.items(), "events").unwrap_or_default(),
                );
            }
        }
        check_events(dir, &mut r);
    } else if !dir.join(EVENTS_FILE).exists() {
        let text = format!("{EVENTS_FILE} is missing");
        if finished {
            r.problems.push(text);
        } else {
            r.notes.push(text);
        }
    }

    // The end record against the streams.
    if let Some(end) = &r.end {
        if truncated {
            r.problems.push(format!(
                "{END_FILE} says the recording finished, but its files are cut short"
            ));
        } else if events_scan
            .as_ref()
            .is_some_and(|s| s.end == StreamEnd::Complete)
        {
            if end.events != r.events {
                r.problems.push(format!(
                    "{END_FILE} counts {} events, {EVENTS_FILE} holds {}",
                    end.events, r.events
                ));
            }
            if dma_scan
                .as_ref()
                .is_some_and(|s| s.end == StreamEnd::Complete && end.dma_bytes != s.items())
            {
                r.problems.push(format!(
                    "{END_FILE} counts {} DMA bytes, {DMA_FILE} holds {}",
                    end.dma_bytes, r.dma_bytes
                ));
            }
        }
        if !end.ok {
            r.notes.push(format!(
                "the recorder marked it not replayable: {}",
                end.reason
            ));
        } else {
            r.notes.push(format!("ended: {}", end.reason));
        }
    } else {
        r.notes
            .push(format!("no {END_FILE}: the recorder did not finish"));
    }

    r.status = if !r.problems.is_empty() {
        VerifyStatus::Damaged
    } else if truncated || !finished {
        VerifyStatus::PrefixValid
    } else {
        VerifyStatus::Ok
    };
    Ok(r)
}

/// The per-event checks of [`verify`] over the valid prefix.
fn check_events(dir: &Path, r: &mut VerifyReport) {
    let vcpus = r.header.as_ref().map_or(0, |h| h.vcpus);
    let mut reader = match EventLogReader::open(&dir.join(EVENTS_FILE)) {
        Ok(reader) => reader,
        Err(e) => {
            r.problems.push(e.to_string());
            return;
        }
    };
    let mut last_seq: Option<u64> = None;
    let mut first_seq: Option<u64> = None;
    let mut dma_beyond = 0u64;
    let mut bad_cpu = 0u64;
    let mut lost_total = 0u64;
    let mut first_problem: Vec<String> = Vec::new();
    let note_first = |what: String, list: &mut Vec<String>| {
        if list.len() < 5 {
            list.push(what);
        }
    };
    // The stream's own damage was reported from the scan; stop there.
    while let Ok(Some(read)) = reader.next_event() {
        let i = read.index;
        let event = &read.event;
        if vcpus > 0 && usize::from(event.cpu()) >= vcpus {
            bad_cpu += 1;
            if bad_cpu == 1 {
                note_first(
                    format!(
                        "event #{i} belongs to cpu{}, the machine has {vcpus} vCPUs",
                        event.cpu()
                    ),
                    &mut first_problem,
                );
            }
        }
        match event {
            LogEvent::Dma {
                len, dma_offset, ..
            } => {
                let end = dma_offset.saturating_add(u64::from(*len));
                if end > r.dma_bytes {
                    dma_beyond += 1;
                    if dma_beyond == 1 {
                        note_first(
                            format!(
                                "event #{i}: its DMA bytes {dma_offset}..{end} lie past the {} valid bytes of {DMA_FILE}",
                                r.dma_bytes
                            ),
                            &mut first_problem,
                        );
                    }
                }
            }
            LogEvent::Agent { record } => {
                r.agent_events += 1;
                match abi::decode_record(record) {
                    Ok(agent) => {
                        if let Some(prev) = last_seq {
                            if agent.seq != prev.wrapping_add(1) {
                                note_first(
                                    format!(
                                        "event #{i}: agent seq {} follows seq {prev}: {} agent records are missing from the log",
                                        agent.seq,
                                        agent.seq.wrapping_sub(prev).wrapping_sub(1) as i64
                                    ),
                                    &mut first_problem,
                                );
                            }
                        }
                        if let abi::EventBody::Lost(l) = &agent.body {
                            lost_total += l.events;
                        }
                        first_seq.get_or_insert(agent.seq);
                        last_seq = Some(agent.seq);
                    }
                    Err(e) => note_first(
                        format!("event #{i}: agent record does not decode: {e}"),
                        &mut first_problem,
                    ),
                }
            }
            _ => {}
        }
    }
    if dma_beyond > 1 {
        first_problem.push(format!(
            "{dma_beyond} Dma events in all point past the DMA log"
        ));
    }
    if bad_cpu > 1 {
        first_problem.push(format!(
            "{bad_cpu} events in all name a vCPU that does not exist"
        ));
    }
    r.problems.extend(first_problem);
    if lost_total > 0 {
        r.notes.push(format!(
            "the agent dropped {lost_total} events (ring full; LOST records): not replayable"
        ));
    }
    r.agent_seq = first_seq.zip(last_seq);
}

/// One row of [`Stats`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassStats {
    pub class: String,
    pub count: u64,
    /// Raw (postcard) bytes of these events.
    pub bytes: u64,
}

/// `krr log stats`: counts per event class, like KRR's "Event Stats".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub dir: PathBuf,
    pub name: String,
    pub classes: Vec<ClassStats>,
    /// Exceptions taken at CPL 3 (a subset of "exception").
    pub exceptions_from_user: u64,
    pub events: u64,
    pub raw_bytes: u64,
    /// Bytes of events.krrlog (valid prefix, headers included).
    pub file_bytes: u64,
    pub bytes_per_event: f64,
    pub dma_bytes: u64,
    pub virtual_ns: Option<u64>,
    pub wall_seconds: Option<f64>,
    /// Events per second of recording wall time.
    pub events_per_second: Option<f64>,
    /// How the event stream ends, when not complete.
    pub incomplete: Option<String>,
    pub finished: bool,
}

const AGENT_CLASSES: &[&str] = &[
    "syscall",
    "copy_from_user",
    "strncpy_from_user",
    "strnlen_user",
    "get_user",
    "rdtsc",
    "random",
    "rdrand",
    "pte_read",
    "exec_lock",
    "lost",
];

/// Counts the events of the valid prefix per class.
pub fn stats(dir: &Path) -> Result<Stats, RecordingError> {
    let header = load_header(dir)?;
    let end = load_end(dir)?;
    let events_path = dir.join(EVENTS_FILE);
    let mut reader = EventLogReader::open(&events_path)?;
    let mut counts: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
    let mut from_user = 0u64;
    let mut events = 0u64;
    let mut raw = 0u64;
    let mut incomplete = None;
    loop {
        match reader.next_event() {
            Ok(Some(read)) => {
                let class = read.event.class();
                let c = counts.entry(class).or_default();
                c.0 += 1;
                c.1 += read.encoded_len as u64;
                if let LogEvent::Exception {
                    from_user: true, ..
                } = read.event
                {
                    from_user += 1;
                }
                events += 1;
                raw += read.encoded_len as u64;
            }
            Ok(None) => break,
            Err(e) => {
                incomplete = Some(format!("damaged: {e}"));
                break;
            }
        }
    }
    if incomplete.is_none() {
        incomplete = reader
            .end()
            .and_then(|end| describe_end(EVENTS_FILE, end, events, "events"));
    }
    let scanned_len = fs::metadata(&events_path).map_or(0, |m| m.len());
    let file_bytes = match reader.end() {
        Some(StreamEnd::Truncated { offset, .. }) | Some(StreamEnd::Damaged { offset, .. }) => {
            *offset
        }
        _ => scanned_len,
    };
    let mut classes: Vec<ClassStats> = AGENT_CLASSES
        .iter()
        .chain(ENGINE_CLASSES)
        .map(|&class| {
            let (count, bytes) = counts.remove(class).unwrap_or_default();
            ClassStats {
                class: class.to_string(),
                count,
                bytes,
            }
        })
        .collect();
    classes.extend(
        counts
            .into_iter()
            .map(|(class, (count, bytes))| ClassStats {
                class: class.to_string(),
                count,
                bytes,
            }),
    );
    let dma_bytes = log::scan(&dir.join(DMA_FILE)).map_or(0, |s| s.items());
    let wall = end.as_ref().map(|e| e.wall_seconds);
    Ok(Stats {
        dir: dir.to_path_buf(),
        name: header.name,
        classes,
        exceptions_from_user: from_user,
        events,
        raw_bytes: raw,
        file_bytes,
        bytes_per_event: if events > 0 {
            file_bytes as f64 / events as f64
        } else {
            0.0
        },
        dma_bytes,
        virtual_ns: end.as_ref().map(|e| e.virtual_ns),
        wall_seconds: wall,
        events_per_second: wall.filter(|w| *w > 0.0).map(|w| events as f64 / w),
        incomplete,
        finished: end.is_some(),
    })
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Event Stats of {} ({})", self.name, self.dir.display())?;
        writeln!(f, "{:<20} {:>12} {:>14}", "event", "count", "raw bytes")?;
        for c in &self.classes {
            writeln!(f, "{:<20} {:>12} {:>14}", c.class, c.count, c.bytes)?;
            if c.class == "exception" && self.exceptions_from_user > 0 {
                writeln!(
                    f,
                    "{:<20} {:>12}",
                    "  (from user)", self.exceptions_from_user
                )?;
            }
        }
        writeln!(
            f,
            "{:<20} {:>12} {:>14}",
            "total", self.events, self.raw_bytes
        )?;
        writeln!(
            f,
            "log: {} bytes ({:.1} bytes/event), dma: {} bytes",
            self.file_bytes, self.bytes_per_event, self.dma_bytes
        )?;
        match (self.virtual_ns, self.wall_seconds) {
            (Some(ns), Some(wall)) => {
                write!(
                    f,
                    "duration: {:.3} s guest time, {:.3} s wall",
                    ns as f64 / 1e9,
                    wall
                )?;
                if let Some(rate) = self.events_per_second {
                    write!(f, ", {rate:.0} events/s")?;
                }
                writeln!(f)?;
            }
            _ => writeln!(
                f,
                "duration: unknown (no {END_FILE}: the recorder did not finish)"
            )?,
        }
        if let Some(why) = &self.incomplete {
            writeln!(f, "note: only a prefix: {why}")?;
        }
        Ok(())
    }
}

/// Writes events `from..from+count` (all from `from` when `count` is
/// `None`) as `#index <event>` lines. Returns a note when the log ends
/// early (truncated or damaged).
pub fn dump(
    dir: &Path,
    from: u64,
    count: Option<u64>,
    out: &mut dyn Write,
) -> Result<Option<String>, RecordingError> {
    let path = dir.join(EVENTS_FILE);
    let mut reader = EventLogReader::open(&path)?.seek(from);
    let mut written = 0u64;
    let wr = |e: io::Error| RecordingError::Io {
        path: PathBuf::from("<output>"),
        source: e,
    };
    while count.is_none_or(|c| written < c) {
        match reader.next_event() {
            Ok(Some(read)) => {
                writeln!(out, "#{} {}", read.index, read.event).map_err(wr)?;
                written += 1;
            }
            Ok(None) => break,
            Err(e) => return Ok(Some(format!("the log is damaged here: {e}"))),
        }
    }
    Ok(reader
        .end()
        .and_then(|end| describe_end(EVENTS_FILE, end, 0, "events"))
        .map(|d| format!("end of the valid prefix: {d}")))
}
