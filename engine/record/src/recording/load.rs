// SPDX-License-Identifier: GPL-2.0-or-later
//! Reading a recording back: its JSON files and the start snapshot's
//! memory image.

use super::{
    invalid, io_err, read_json, CpuSnapshot, RecordingEnd, RecordingError, RecordingHeader,
    CPUS_FILE, DEVICES_FILE, END_FILE, HEADER_FILE, MEMORY_FILE, MEMORY_MAGIC, MEMORY_VERSION,
    SNAPSHOT_DIR,
};
use crate::log;
use crate::memory_image::is_zero_page;
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

/// Streams the memory image of `dir`: calls `data` with each region's
/// bytes in pieces, in order, as (region, offset, bytes). Version 1 images
/// hold every byte; version 2 only the pages holding data, the rest of each
/// region reads as zeros. Returns the region list (start, length).
pub(crate) fn read_memory_image(
    dir: &Path,
    data: impl FnMut(usize, u64, &[u8]) -> Result<(), RecordingError>,
) -> Result<Vec<(u64, u64)>, RecordingError> {
    read_memory_image_at(&dir.join(SNAPSHOT_DIR).join(MEMORY_FILE), data)
}

/// [`read_memory_image`] of the image file at `path`.
pub(crate) fn read_memory_image_at(
    path: &Path,
    mut data: impl FnMut(usize, u64, &[u8]) -> Result<(), RecordingError>,
) -> Result<Vec<(u64, u64)>, RecordingError> {
    const PAGE: u64 = 4096;
    let file = File::open(path).map_err(io_err(path))?;
    let mut dec = zstd::stream::read::Decoder::new(file).map_err(io_err(path))?;
    let bad = |what: String| invalid(path, what);
    let zerr = |e: io::Error| invalid(path, format!("memory image does not decompress: {e}"));
    let mut head = [0u8; 16];
    dec.read_exact(&mut head).map_err(zerr)?;
    if head[..8] != MEMORY_MAGIC {
        return Err(bad("memory image magic is not \"KRRMEM\\0\\0\"".into()));
    }
    let version = u32::from_le_bytes(head[8..12].try_into().unwrap());
    if !(1..=MEMORY_VERSION).contains(&version) {
        return Err(bad(format!(
            "memory image version {version}, expected 1 to {MEMORY_VERSION}"
        )));
    }
    let count = u32::from_le_bytes(head[12..16].try_into().unwrap());
    if count > 1024 {
        return Err(bad(format!("memory image claims {count} regions")));
    }
    let read_u64s = |dec: &mut zstd::stream::read::Decoder<_>, n: usize| -> io::Result<Vec<u64>> {
        let mut b = vec![0u8; 8 * n];
        dec.read_exact(&mut b)?;
        Ok(b.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect())
    };
    let fields = if version == 1 { 2 } else { 3 };
    let mut regions = Vec::with_capacity(count as usize);
    let mut run_counts = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let r = read_u64s(&mut dec, fields).map_err(zerr)?;
        regions.push((r[0], r[1]));
        run_counts.push(r.get(2).copied());
    }
    let max = *krr_machine::MEMORY_BYTES.end();
    let total = regions
        .iter()
        .try_fold(0u64, |t, r| t.checked_add(r.1))
        .filter(|&t| t <= max)
        .ok_or_else(|| {
            bad(format!(
                "memory image regions {regions:x?} exceed {max} bytes"
            ))
        })?;
    let mut buf = vec![0u8; (4 << 20).min(total as usize)];
    let mut stream = |dec: &mut zstd::stream::read::Decoder<_>,
                      i: usize,
                      from: u64,
                      n: u64|
     -> Result<(), RecordingError> {
        let mut at = 0u64;
        while at < n {
            let k = (n - at).min(buf.len() as u64) as usize;
            dec.read_exact(&mut buf[..k]).map_err(|e| {
                bad(format!(
                    "memory image ends inside region {i} ({} of {} bytes): {e}",
                    from + at,
                    regions[i].1
                ))
            })?;
            data(i, from + at, &buf[..k])?;
            at += k as u64;
        }
        Ok(())
    };
    for (i, &(_, len)) in regions.iter().enumerate() {
        let Some(runs) = run_counts[i] else {
            stream(&mut dec, i, 0, len)?;
            continue;
        };
        let pages = len.div_ceil(PAGE);
        if runs > pages {
            return Err(bad(format!(
                "memory image region {i} claims {runs} runs of pages in {pages} pages"
            )));
        }
        let mut list = Vec::with_capacity(runs as usize);
        let mut next = 0u64;
        for k in 0..runs {
            let run = read_u64s(&mut dec, 2).map_err(|e| {
                bad(format!(
                    "memory image ends inside region {i}'s run list: {e}"
                ))
            })?;
            let (first, count) = (run[0], run[1]);
            if count == 0 || first < next || first > pages || count > pages - first {
                return Err(bad(format!(
                    "memory image region {i} run {k}: pages {first}+{count} out of order or outside its {pages} pages"
                )));
            }
            next = first + count;
            list.push((first, count));
        }
        for (first, count) in list {
            let from = first * PAGE;
            stream(&mut dec, i, from, (count * PAGE).min(len - from))?;
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

/// Loads the start snapshot's RAM into `mem`, whose regions must be the
/// snapshot's and read as zeros (freshly mapped): pages of zeros are not
/// written, so the host never backs them (most of a booted guest's RAM).
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
        for (offset, run) in nonzero_runs(bytes) {
            let to = at + offset as u64;
            region
                .write_slice(run, MemoryRegionAddress(to))
                .map_err(|e| invalid(&path, format!("region {i} at {to:#x}: {e}")))?;
        }
        Ok(())
    })?;
    if theirs != ours {
        return Err(invalid(
            &path,
            format!("snapshot regions {theirs:x?} differ from guest memory {ours:x?}"),
        ));
    }
    Ok(())
}

/// The runs of `bytes` that are not whole 4 KiB pages of zeros, with their
/// offsets.
fn nonzero_runs(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    const PAGE: usize = 4096;
    let pages = bytes.len().div_ceil(PAGE);
    let is_data =
        move |p: usize| !is_zero_page(&bytes[p * PAGE..((p + 1) * PAGE).min(bytes.len())]);
    let mut p = 0;
    std::iter::from_fn(move || {
        while p < pages && !is_data(p) {
            p += 1;
        }
        if p == pages {
            return None;
        }
        let first = p;
        while p < pages && is_data(p) {
            p += 1;
        }
        let end = (p * PAGE).min(bytes.len());
        Some((first * PAGE, &bytes[first * PAGE..end]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A memory image file from its uncompressed bytes.
    fn image_file(body: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.zst");
        std::fs::write(&path, zstd::encode_all(body, 1).unwrap()).unwrap();
        (dir, path)
    }

    fn head(version: u32, regions: &[&[u64]]) -> Vec<u8> {
        let mut b = MEMORY_MAGIC.to_vec();
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        for r in regions {
            for v in *r {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    /// Regions (start, length) and the bytes of every region concatenated.
    type WholeImage = (Vec<(u64, u64)>, Vec<u8>);

    /// Reads an image whole.
    fn read_all(path: &Path) -> Result<WholeImage, RecordingError> {
        let mut pieces: Vec<(usize, u64, Vec<u8>)> = Vec::new();
        let regions = read_memory_image_at(path, |i, at, b| {
            pieces.push((i, at, b.to_vec()));
            Ok(())
        })?;
        let mut starts = vec![0usize];
        for r in &regions {
            starts.push(starts.last().unwrap() + r.1 as usize);
        }
        let mut all = vec![0u8; *starts.last().unwrap()];
        for (i, at, b) in pieces {
            all[starts[i] + at as usize..][..b.len()].copy_from_slice(&b);
        }
        Ok((regions, all))
    }

    /// Recordings made before the sparse format still replay.
    #[test]
    fn a_version_1_image_holding_every_byte_still_reads() {
        let mut body = head(1, &[&[0, 8192], &[1 << 32, 100]]);
        let mut ram = vec![0u8; 8192 + 100];
        ram[5] = 7;
        ram[8192 + 99] = 9;
        body.extend_from_slice(&ram);
        let (_dir, path) = image_file(&body);
        let (regions, all) = read_all(&path).unwrap();
        assert_eq!(regions, [(0, 8192), (1 << 32, 100)]);
        assert_eq!(all, ram);
    }

    #[test]
    fn a_sparse_image_reads_its_runs_and_zeros_elsewhere() {
        // Region 0: 4 pages, data in pages 1-2; region 1: 100 bytes, its one
        // (partial) page holding data.
        let mut body = head(2, &[&[0, 4 * 4096, 1], &[1 << 32, 100, 1]]);
        for v in [1u64, 2] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(&[0xaa; 2 * 4096]);
        for v in [0u64, 1] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(&[0xbb; 100]);
        let (_dir, path) = image_file(&body);
        let (regions, all) = read_all(&path).unwrap();
        assert_eq!(regions, [(0, 4 * 4096), (1 << 32, 100)]);
        let mut want = vec![0u8; 4 * 4096 + 100];
        want[4096..3 * 4096].fill(0xaa);
        want[4 * 4096..].fill(0xbb);
        assert!(all == want);
    }

    /// A hostile image cannot claim more RAM than a machine has, runs outside
    /// its region or out of order, or more runs than pages.
    #[test]
    fn a_sparse_image_with_impossible_runs_is_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (head(2, &[&[0, 1 << 40, 0]]), "exceed"),
            (head(2, &[&[0, u64::MAX, 0], &[0, 2, 0]]), "exceed"),
            (
                head(2, &[&[0, 4 * 4096, 5]]),
                "claims 5 runs of pages in 4 pages",
            ),
            (
                [
                    head(2, &[&[0, 4 * 4096, 1]]),
                    [3u64, 2].map(u64::to_le_bytes).concat(),
                ]
                .concat(),
                "run 0: pages 3+2",
            ),
            (
                [
                    head(2, &[&[0, 4 * 4096, 2]]),
                    [2u64, 1, 1, 1].map(u64::to_le_bytes).concat(),
                ]
                .concat(),
                "run 1: pages 1+1 out of order",
            ),
            (
                [
                    head(2, &[&[0, 4 * 4096, 1]]),
                    [1u64, 0].map(u64::to_le_bytes).concat(),
                ]
                .concat(),
                "run 0: pages 1+0",
            ),
            (head(2, &[&[0, 4 * 4096, 1]]), "run list"),
            (
                [
                    head(2, &[&[0, 4 * 4096, 1]]),
                    [0u64, 1].map(u64::to_le_bytes).concat(),
                ]
                .concat(),
                "ends inside region 0",
            ),
            (head(3, &[]), "version 3, expected 1 to 2"),
        ];
        for (body, want) in cases {
            let (_dir, path) = image_file(&body);
            let err = read_all(&path).unwrap_err().to_string();
            assert!(err.contains(want), "expected {want:?} in {err:?}");
            assert!(err.contains("memory.zst"), "{err}");
        }
    }

    #[test]
    fn only_pages_holding_data_are_written() {
        let mut bytes = vec![0u8; 6 * 4096 + 100];
        bytes[4096] = 1; // page 1
        bytes[2 * 4096 + 4095] = 2; // page 2
        bytes[5 * 4096] = 3; // page 5
        let runs: Vec<(usize, usize)> = nonzero_runs(&bytes).map(|(o, r)| (o, r.len())).collect();
        // The partial last page is all zeros here, so it is left out too.
        assert_eq!(runs, [(4096, 2 * 4096), (5 * 4096, 4096)]);
        bytes[6 * 4096 + 99] = 4;
        let runs: Vec<(usize, usize)> = nonzero_runs(&bytes).map(|(o, r)| (o, r.len())).collect();
        assert_eq!(runs, [(4096, 2 * 4096), (5 * 4096, 4096 + 100)]);
        assert_eq!(nonzero_runs(&[0u8; 3 * 4096]).count(), 0);
        assert_eq!(nonzero_runs(&[]).count(), 0);
    }

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
