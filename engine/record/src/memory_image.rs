// SPDX-License-Identifier: GPL-2.0-or-later
//! The start snapshot's guest RAM, taken without stopping the guest for
//! long.
//!
//! Compressing and syncing all of guest RAM took 0.3-0.6 s of a recording's
//! start on a 512 MiB guest, with the guest stopped: more than the rest of a
//! short recording costs. So the start is split in two. [`MemoryCopy::take`]
//! runs with the machine stopped and copies only the pages the host has
//! ever given the guest (guest RAM is private anonymous memory: a page that
//! `/proc/self/pagemap` shows neither present nor swapped reads as zeros);
//! [`MemoryCopy::write_in_background`] then compresses, writes and syncs the
//! image on another thread while the guest runs on (the recording's events
//! reach their file only once the image is published, so a recording killed
//! with events on disk has its image). The file format is the one
//! [`super::recording`] reads; a recording whose image is not written yet
//! lacks `snapshot/memory.zst`, which `krr log verify` reports.

use super::recording::{io_err, tmp_name, RecordingError, MEMORY_MAGIC, MEMORY_VERSION};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// The host page size pagemap entries describe.
const PAGE: u64 = 4096;
/// pagemap entry bits: page present in RAM, page swapped out.
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

/// One guest RAM region: which of its pages hold data, and those pages.
struct RegionCopy {
    guest_start: u64,
    len: u64,
    /// Runs of pages with data: (first page, page count), ascending.
    runs: Vec<(u64, u64)>,
    /// The runs' bytes, concatenated.
    data: Vec<u8>,
}

/// Guest RAM as it was when [`MemoryCopy::take`] ran.
pub struct MemoryCopy {
    regions: Vec<RegionCopy>,
}

impl MemoryCopy {
    /// Copies guest RAM; call it with every vCPU and device stopped. Pages
    /// the host never backed are left out (they are zeros); where pagemap
    /// cannot be read, every page is copied.
    pub fn take<M: GuestMemoryBackend>(mem: &M) -> Result<MemoryCopy, String> {
        let mut pagemap = File::open("/proc/self/pagemap").ok();
        let mut regions = Vec::new();
        for (i, r) in mem.iter().enumerate() {
            let len = r.len();
            let pages = len.div_ceil(PAGE);
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .ok()
                .map(|p| p as u64);
            let runs = match (host, pagemap.as_mut()) {
                (Some(host), Some(pm)) if host % PAGE == 0 => {
                    backed_runs(pm, host, pages).unwrap_or_else(|_| vec![(0, pages)])
                }
                _ => vec![(0, pages)],
            };
            let bytes: u64 = runs.iter().map(|&(_, n)| n * PAGE).sum();
            let mut data = vec![0u8; bytes.min(len) as usize];
            let mut at = 0usize;
            for &(first, count) in &runs {
                let from = first * PAGE;
                let n = (count * PAGE).min(len - from) as usize;
                r.read_slice(&mut data[at..at + n], MemoryRegionAddress(from))
                    .map_err(|e| format!("copying guest RAM region {i} at {from:#x}: {e}"))?;
                at += n;
            }
            regions.push(RegionCopy {
                guest_start: r.start_addr().0,
                len,
                runs,
                data,
            });
        }
        Ok(MemoryCopy { regions })
    }

    /// Bytes copied (the pages with data).
    pub fn copied_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.data.len() as u64).sum()
    }

    /// Writes the image to `path` (through `path.tmp`, synced, then
    /// renamed) on a new thread; the handle yields the seconds it took.
    /// `done` is dropped when the thread ends (the image written, or not).
    pub fn write_in_background(
        self,
        path: PathBuf,
        done: Option<std::sync::mpsc::Sender<()>>,
    ) -> Result<JoinHandle<Result<f64, RecordingError>>, RecordingError> {
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("krr-snapshot".into())
            .spawn(move || {
                let _done = done;
                let started = Instant::now();
                self.write(&thread_path)?;
                Ok(started.elapsed().as_secs_f64())
            })
            .map_err(io_err(&path))
    }

    /// Writes the image to `path` through a temporary file and a rename.
    /// Version 2 is sparse: per region the runs of pages holding data, then
    /// their bytes; pages of zeros are left out (they cost neither the
    /// compressor here nor the decompressor in replay).
    fn write(&self, path: &Path) -> Result<(), RecordingError> {
        let tmp = tmp_name(path);
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        // One thread: the guest runs on the others.
        let mut enc =
            zstd::stream::write::Encoder::new(BufWriter::new(file), 1).map_err(io_err(&tmp))?;
        enc.include_checksum(true).map_err(io_err(&tmp))?;
        let runs: Vec<Vec<DataRun>> = self.regions.iter().map(RegionCopy::data_runs).collect();
        let mut head = Vec::with_capacity(16 + 24 * self.regions.len());
        head.extend_from_slice(&MEMORY_MAGIC);
        head.extend_from_slice(&MEMORY_VERSION.to_le_bytes());
        head.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for (r, runs) in self.regions.iter().zip(&runs) {
            head.extend_from_slice(&r.guest_start.to_le_bytes());
            head.extend_from_slice(&r.len.to_le_bytes());
            head.extend_from_slice(&(runs.len() as u64).to_le_bytes());
        }
        enc.write_all(&head).map_err(io_err(&tmp))?;
        for (r, runs) in self.regions.iter().zip(&runs) {
            let mut list = Vec::with_capacity(16 * runs.len());
            for run in runs {
                list.extend_from_slice(&run.first_page.to_le_bytes());
                list.extend_from_slice(&run.pages.to_le_bytes());
            }
            enc.write_all(&list).map_err(io_err(&tmp))?;
            for run in runs {
                enc.write_all(&r.data[run.data..run.data + run.bytes])
                    .map_err(io_err(&tmp))?;
            }
        }
        let mut out = enc.finish().map_err(io_err(&tmp))?;
        out.flush().map_err(io_err(&tmp))?;
        out.get_ref().sync_data().map_err(io_err(&tmp))?;
        drop(out);
        fs::rename(&tmp, path).map_err(io_err(path))
    }
}

/// Whether `bytes` (a page, or the part of one a region holds) are all
/// zeros: such pages are neither written to a memory image nor loaded
/// from one.
pub(crate) fn is_zero_page(bytes: &[u8]) -> bool {
    static ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];
    bytes.len() <= ZEROS.len() && bytes == &ZEROS[..bytes.len()]
}

/// Pages of a region that hold data, and where their bytes are in the copy.
struct DataRun {
    first_page: u64,
    pages: u64,
    /// Offset in [`RegionCopy::data`].
    data: usize,
    /// Bytes (less than `pages` pages where the region ends inside one).
    bytes: usize,
}

impl RegionCopy {
    /// The copied runs split where pages read as zeros.
    fn data_runs(&self) -> Vec<DataRun> {
        let mut out: Vec<DataRun> = Vec::new();
        let mut data_at = 0usize;
        for &(first, count) in &self.runs {
            for page in first..first + count {
                let from = page * PAGE;
                if from >= self.len {
                    break;
                }
                let n = PAGE.min(self.len - from) as usize;
                let bytes = &self.data[data_at..data_at + n];
                if !is_zero_page(bytes) {
                    match out.last_mut() {
                        Some(run) if run.first_page + run.pages == page => {
                            run.pages += 1;
                            run.bytes += n;
                        }
                        _ => out.push(DataRun {
                            first_page: page,
                            pages: 1,
                            data: data_at,
                            bytes: n,
                        }),
                    }
                }
                data_at += n;
            }
        }
        out
    }
}

/// Runs of pages in `[host, host + pages * PAGE)` that are present or
/// swapped, from pagemap (8 bytes per page).
fn backed_runs(pagemap: &mut File, host: u64, pages: u64) -> io::Result<Vec<(u64, u64)>> {
    pagemap.seek(SeekFrom::Start(host / PAGE * 8))?;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut page = 0u64;
    while page < pages {
        let want = ((pages - page) * 8).min(buf.len() as u64) as usize;
        pagemap.read_exact(&mut buf[..want])?;
        for entry in buf[..want].chunks_exact(8) {
            let e = u64::from_le_bytes(entry.try_into().unwrap());
            if e & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0 {
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == page => *count += 1,
                    _ => runs.push((page, 1)),
                }
            }
            page += 1;
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn untouched_pages_are_left_out_and_written_as_zeros() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 64 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        mem.write_slice(&[0xab; 5000], GuestAddress(3 * PAGE + 10))
            .unwrap();
        mem.write_slice(&[0xcd; 8], GuestAddress((1 << 32) + (1 << 20) - 8))
            .unwrap();
        let copy = MemoryCopy::take(&mem).unwrap();
        // Two pages written in the first region, one in the second; pagemap
        // may be unreadable (then everything is copied), never fewer.
        let copied = copy.copied_bytes();
        assert!(copied >= 3 * PAGE, "copied {copied}");
        if File::open("/proc/self/pagemap").is_ok() {
            assert!(copied < 8 * PAGE, "untouched pages were copied: {copied}");
        }
        // A later write is not in the copy.
        mem.write_slice(&[0xee; 16], GuestAddress(3 * PAGE + 10))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.zst");
        copy.write_in_background(path.clone(), None)
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        let mut want = vec![0u8; (64 << 20) + (1 << 20)];
        want[3 * PAGE as usize + 10..3 * PAGE as usize + 5010].fill(0xab);
        let end = want.len();
        want[end - 8..].fill(0xcd);
        let mut back = vec![0u8; want.len()];
        let mut pieces = 0;
        let regions = crate::recording::read_memory_image_at(&path, |i, at, bytes| {
            let base = if i == 0 { 0 } else { 64 << 20 };
            back[base + at as usize..][..bytes.len()].copy_from_slice(bytes);
            pieces += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(regions, [(0, 64 << 20), (1 << 32, 1 << 20)]);
        assert!(back == want, "image differs from guest RAM at the copy");
        // Only the pages holding data are in the image: one run per region.
        assert_eq!(pieces, 2);
        assert!(!dir.path().join("memory.zst.tmp").exists());
    }
}
