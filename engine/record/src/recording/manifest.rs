// SPDX-License-Identifier: GPL-2.0-or-later
//! What a recording says about itself: `header.json` ([`RecordingHeader`]),
//! `end.json` ([`RecordingEnd`]) and the snapshot's vCPU state ([`CpuSnapshot`]).

use super::{io_err, RecordingError};
use crate::log;
use krr_hypervisor::{DebugRegs, Regs, Sregs};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::Path;

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
    /// "end", "marker:TEXT", "guest", "report".
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
    /// [`crate::event::Position`]).
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
    /// Events written ([`RecordingWriter::finish`](super::RecordingWriter::finish)
    /// fills the stream totals from its own counts).
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
