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
    /// Hashes `path`, or takes its digest from the digest cache
    /// ([`DigestCache::default_location`]) when the file is unchanged since
    /// it was hashed there: a 2 GiB root filesystem took 1.7 s to hash at
    /// the start of every recording.
    pub fn of(path: &Path) -> Result<FileDigest, RecordingError> {
        FileDigest::of_cached(path, DigestCache::default_location().as_ref())
    }

    /// [`FileDigest::of`] with the cache at `cache` (`None`: none).
    pub fn of_cached(
        path: &Path,
        cache: Option<&DigestCache>,
    ) -> Result<FileDigest, RecordingError> {
        let key = cache.and_then(|_| FileIdentity::of(path));
        let cached = cache.zip(key.as_ref()).and_then(|(c, k)| c.get(k));
        let sha256 = match cached {
            Some(sha256) => sha256,
            None => {
                let started = std::time::SystemTime::now();
                let file = File::open(path).map_err(io_err(path))?;
                let mut reader = BufReader::with_capacity(1 << 20, file);
                let mut hasher = Sha256::new();
                io::copy(&mut reader, &mut hasher).map_err(io_err(path))?;
                let sha256 = format!("{:x}", hasher.finalize());
                // Kept only when nothing changed the file while it was read,
                // and its last change is older than the file system's clock
                // resolution: a write in the same tick would not show.
                if let (Some(c), Some(k)) = (cache, key) {
                    let settled = started
                        .duration_since(k.changed)
                        .is_ok_and(|age| age >= c.settle);
                    if settled && FileIdentity::of(path).as_ref() == Some(&k) {
                        c.put(&k, &sha256);
                    }
                }
                sha256
            }
        };
        Ok(FileDigest {
            path: path.display().to_string(),
            sha256,
        })
    }
}

/// What identifies a file's content without reading it: where it is, its
/// inode, size, modification and status-change times (any write changes
/// the last, and no call sets it back).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdentity {
    /// All of it, as the cache entry holds it.
    text: String,
    /// The status-change time alone.
    changed: std::time::SystemTime,
}

impl FileIdentity {
    fn of(path: &Path) -> Option<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let canonical = fs::canonicalize(path).ok()?;
        let m = fs::metadata(&canonical).ok()?;
        if !m.is_file() {
            return None;
        }
        let changed = std::time::UNIX_EPOCH
            + std::time::Duration::new(
                u64::try_from(m.ctime()).ok()?,
                u32::try_from(m.ctime_nsec()).ok()?,
            );
        let text = format!(
            "{}\0{}:{}\0{}\0{}.{}\0{}.{}",
            canonical.display(),
            m.dev(),
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        );
        Some(FileIdentity { text, changed })
    }

    /// The cache file's name: the identity's sha256.
    fn name(&self) -> String {
        format!("{:x}", Sha256::digest(self.text.as_bytes()))
    }
}

/// Digests of files already hashed, one small file per [`FileIdentity`].
/// Reading or writing it never fails a recording: a missing or unreadable
/// entry means hashing the file again.
#[derive(Debug, Clone)]
pub struct DigestCache {
    dir: std::path::PathBuf,
    /// How long ago a file must have last changed for its digest to be
    /// kept (timestamps are only as fine as the kernel's clock tick).
    settle: std::time::Duration,
}

impl DigestCache {
    pub fn new(dir: std::path::PathBuf) -> DigestCache {
        DigestCache {
            dir,
            settle: std::time::Duration::from_secs(2),
        }
    }

    /// `$KRR_CACHE/digests`, else `<user cache dir>/krr/digests`, as the
    /// artifact store places its root.
    pub fn default_location() -> Option<DigestCache> {
        let root = match std::env::var_os("KRR_CACHE") {
            Some(dir) if !dir.is_empty() => std::path::PathBuf::from(dir),
            _ => dirs::cache_dir()?.join("krr"),
        };
        Some(DigestCache::new(root.join("digests")))
    }

    fn get(&self, key: &FileIdentity) -> Option<String> {
        let text = fs::read_to_string(self.dir.join(key.name())).ok()?;
        let (identity, sha256) = text.rsplit_once('\n')?;
        let valid = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
        (identity == key.text && valid).then(|| sha256.to_ascii_lowercase())
    }

    fn put(&self, key: &FileIdentity, sha256: &str) {
        let name = key.name();
        let tmp = self.dir.join(format!("{name}.{}.tmp", std::process::id()));
        let written = fs::create_dir_all(&self.dir)
            .and_then(|_| fs::write(&tmp, format!("{}\n{sha256}", key.text)))
            .and_then(|_| fs::rename(&tmp, self.dir.join(&name)));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
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
    /// The guest's virtual clock at the end (nanoseconds since boot).
    pub virtual_ns: u64,
    /// The virtual clock when the recording started (recordings before
    /// December 2026 lack it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_virtual_ns: Option<u64>,
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

impl RecordingEnd {
    /// Guest (virtual clock) time the recording covers; from boot for a
    /// recording that lacks its start time.
    pub fn covered_virtual_ns(&self) -> u64 {
        self.virtual_ns
            .saturating_sub(self.start_virtual_ns.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_covers_the_guest_time_since_its_start() {
        let mut end = RecordingEnd {
            virtual_ns: 1_045_959_122,
            start_virtual_ns: Some(299_794_517),
            ..RecordingEnd::default()
        };
        assert_eq!(end.covered_virtual_ns(), 746_164_605);
        let json = serde_json::to_string(&end).unwrap();
        assert_eq!(serde_json::from_str::<RecordingEnd>(&json).unwrap(), end);
        // An older end.json has no start: from boot, as it was read then.
        end.start_virtual_ns = None;
        let json = serde_json::to_string(&end).unwrap();
        assert!(!json.contains("start_virtual_ns"));
        assert_eq!(
            serde_json::from_str::<RecordingEnd>(&json)
                .unwrap()
                .covered_virtual_ns(),
            1_045_959_122
        );
    }

    fn sha256_of(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    /// A file is hashed once; its digest comes from the cache while the
    /// file is unchanged, and is hashed again once it changes.
    #[test]
    fn digests_come_from_the_cache_only_while_the_file_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        fs::write(&file, b"first").unwrap();
        // A file changed just now is not kept.
        let cache = DigestCache::new(dir.path().join("digests"));
        let d = FileDigest::of_cached(&file, Some(&cache)).unwrap();
        assert_eq!(d.sha256, sha256_of(b"first"));
        assert!(!cache.dir.exists());
        let cache = DigestCache {
            settle: std::time::Duration::ZERO,
            ..cache
        };
        let d = FileDigest::of_cached(&file, Some(&cache)).unwrap();
        assert_eq!(d.sha256, sha256_of(b"first"));
        let entries: Vec<_> = fs::read_dir(&cache.dir).unwrap().collect();
        assert_eq!(entries.len(), 1);
        let entry = entries[0].as_ref().unwrap().path();

        // The cache is what answers now: make it say something else.
        let text = fs::read_to_string(&entry).unwrap();
        let (identity, _) = text.rsplit_once('\n').unwrap();
        let fake = "ab".repeat(32);
        fs::write(&entry, format!("{identity}\n{fake}")).unwrap();
        assert_eq!(
            FileDigest::of_cached(&file, Some(&cache)).unwrap().sha256,
            fake
        );

        // A changed file is hashed again.
        fs::write(&file, b"other file").unwrap();
        assert_eq!(
            FileDigest::of_cached(&file, Some(&cache)).unwrap().sha256,
            sha256_of(b"other file")
        );
        // A damaged entry is ignored.
        for entry in fs::read_dir(&cache.dir).unwrap() {
            fs::write(entry.unwrap().path(), "not a digest").unwrap();
        }
        assert_eq!(
            FileDigest::of_cached(&file, Some(&cache)).unwrap().sha256,
            sha256_of(b"other file")
        );
        // Without a cache, and with one that cannot be written.
        assert_eq!(
            FileDigest::of_cached(&file, None).unwrap().sha256,
            sha256_of(b"other file")
        );
        let blocked = DigestCache {
            dir: file.join("not-a-dir"),
            ..cache.clone()
        };
        assert_eq!(
            FileDigest::of_cached(&file, Some(&blocked)).unwrap().sha256,
            sha256_of(b"other file")
        );
        let missing = dir.path().join("missing");
        let err = FileDigest::of_cached(&missing, Some(&cache)).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
