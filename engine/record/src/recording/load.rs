// SPDX-License-Identifier: GPL-2.0-or-later
//! Reading a recording back: its JSON files and the start snapshot's
//! memory image.

use super::{
    invalid, io_err, read_json, CpuSnapshot, RecordingEnd, RecordingError, RecordingHeader,
    CPUS_FILE, DEVICES_FILE, END_FILE, HEADER_FILE, MEMORY_FILE, MEMORY_MAGIC, MEMORY_VERSION,
    SNAPSHOT_DIR,
};
use crate::log;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

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
    // Replay sizes per-vCPU state and guest RAM from these: a hostile or
    // damaged header must not make it allocate without bound.
    if header.vcpus == 0 || header.vcpus > krr_machine::MAX_VCPUS {
        return Err(invalid(
            &path,
            format!(
                "vcpus {} is outside 1..={}",
                header.vcpus,
                krr_machine::MAX_VCPUS
            ),
        ));
    }
    // (Small test guests record less than a machine's least RAM.)
    if header.mem_bytes == 0 || header.mem_bytes > *krr_machine::MEMORY_BYTES.end() {
        return Err(invalid(
            &path,
            format!(
                "mem_bytes {} is outside 1..={}",
                header.mem_bytes,
                krr_machine::MEMORY_BYTES.end()
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
pub(super) fn read_memory_image(
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Replay sizes per-vCPU state and guest RAM from the header: values no
    /// machine has are refused, naming the field.
    #[test]
    fn a_header_with_impossible_sizes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |vcpus: usize, mem_bytes: u64| {
            let header = RecordingHeader {
                vcpus,
                mem_bytes,
                ..RecordingHeader::new("hostile")
            };
            std::fs::write(
                dir.path().join(HEADER_FILE),
                serde_json::to_vec(&header).unwrap(),
            )
            .unwrap();
        };
        write(2, 512 << 20);
        assert_eq!(load_header(dir.path()).unwrap().vcpus, 2);
        for (vcpus, mem, field) in [
            (1 << 40, 512 << 20, "vcpus 1099511627776"),
            (1_000_000, 512 << 20, "vcpus 1000000 is outside 1..=8"),
            (0, 512 << 20, "vcpus 0"),
            (1, 1 << 50, "mem_bytes 1125899906842624"),
            (1, 0, "mem_bytes 0"),
        ] {
            write(vcpus, mem);
            let e = load_header(dir.path()).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains("header.json"), "{e}");
        }
    }
}
