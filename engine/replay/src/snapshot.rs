// SPDX-License-Identifier: GPL-2.0-or-later
//! Snapshots of a replay in progress, kept in memory, so that a debugger
//! going backwards replays from the nearest one instead of the recording's
//! start. Memory is kept as the pages that differ from the start image
//! (most of the guest's RAM does not change), the vCPUs as their registers
//! and counts, the log position as a reader of its own.

use super::*;
use crate::open::StartImage;
use vm_memory::GuestMemoryBackend;

const PAGE: u64 = 4096;
/// pagemap entry bits: present in RAM, swapped out, a file page (or shared).
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
const PAGEMAP_FILE: u64 = 1 << 61;

/// The guest pages (indices) of `mem`, a private mapping of a file, that
/// the process wrote: present or swapped, and no longer the file's.
/// `None` where `/proc/self/pagemap` cannot be read.
fn written_pages(mem: &GuestMemoryMmap, size: u64) -> Option<Vec<u64>> {
    use std::io::{Read, Seek, SeekFrom};
    let host = mem.get_host_address(GuestAddress(0)).ok()? as u64;
    let mut pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    pagemap.seek(SeekFrom::Start(host / PAGE * 8)).ok()?;
    let pages = size / PAGE;
    let mut written = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut page = 0u64;
    while page < pages {
        let want = ((pages - page) * 8).min(buf.len() as u64) as usize;
        pagemap.read_exact(&mut buf[..want]).ok()?;
        for entry in buf[..want].chunks_exact(8) {
            let e = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            let private =
                e & PAGEMAP_SWAPPED != 0 || (e & PAGEMAP_PRESENT != 0 && e & PAGEMAP_FILE == 0);
            if private {
                written.push(page);
            }
            page += 1;
        }
    }
    Some(written)
}

/// A vCPU as a snapshot keeps it.
struct CpuState {
    regs: krr_hypervisor::Regs,
    sregs: krr_hypervisor::Sregs,
    fpu: krr_hypervisor::FpuState,
    msrs: Vec<(u32, u64)>,
    retired: u64,
    kernel_retired: u64,
}

/// A replay where it stood at a turn boundary ([`Replayer::snapshot`]).
pub struct ReplaySnapshot {
    session: ReplaySession,
    cpus: Vec<CpuState>,
    /// Guest-physical pages that differ from the start image.
    pages: Vec<(u64, Box<[u8]>)>,
    counts: Vec<u64>,
}

impl ReplaySnapshot {
    /// Each vCPU's kernel instruction count (as the recording counts them)
    /// where the snapshot was taken.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Host memory the snapshot holds, about.
    pub fn bytes(&self) -> usize {
        self.pages.len() * PAGE as usize
            + self.cpus.iter().map(|c| c.fpu.xsave.len()).sum::<usize>()
            + self.session.console.held().len()
            + self.session.src.console.pending_bytes()
    }
}

impl ReplaySession {
    /// A copy standing where this one stands, with readers of its own.
    fn duplicate(&self, dir: &Path) -> Result<ReplaySession, ReplayError> {
        let src = self
            .src
            .duplicate(&dir.join(recording::EVENTS_FILE))
            .map_err(|e| ReplayError::Setup(format!("snapshot: {e}")))?;
        Ok(ReplaySession {
            start: self.start,
            src,
            progress: self.progress.clone(),
            entries: self.entries,
            user: self.user,
            dma_reader: DmaLogReader::open(&dir.join(recording::DMA_FILE)).ok(),
            console: self.console.clone(),
            serial_lcr: self.serial_lcr,
            reached: self.reached.clone(),
            segment_reads_due: self.segment_reads_due,
            checkpoints: self.checkpoints.clone(),
            stall_after: self.stall_after,
            watchdog: crate::report::Watchdog::new(self.src.consumed),
            debug: self.debug.clone(),
        })
    }
}

impl Replayer {
    /// A snapshot of the replay where it stands (between two turns), or
    /// `None` where it could not be restored exactly: a vCPU has an event
    /// injected but not delivered (a kernel entry from user mode, or an
    /// interrupt), or is in an interrupt shadow (state the registers do not
    /// show).
    pub fn snapshot(
        &self,
        session: &ReplaySession,
        start: &StartImage,
    ) -> Result<Option<ReplaySnapshot>, ReplayError> {
        let err = |e: krr_hypervisor::HypervisorError| ReplayError::Setup(format!("snapshot: {e}"));
        let mut cpus = Vec::new();
        for (c, vcpu) in self.vcpus.iter().enumerate() {
            let regs = vcpu.regs().map_err(err)?;
            let shadowed =
                regs.rflags & (1 << 9) != 0 && !vcpu.interrupt_window_open().map_err(err)?;
            let queued = vcpu.has_pending_injection().map_err(err)?;
            if session.progress[c].delivery_pending || queued || shadowed {
                return Ok(None);
            }
            let mut msrs = Vec::new();
            for &(index, _) in &self.cpus[c].msrs {
                msrs.push((index, vcpu.msr(index).map_err(err)?));
            }
            cpus.push(CpuState {
                regs,
                sregs: vcpu.sregs().map_err(err)?,
                fpu: vcpu.fpu().map_err(err)?,
                msrs,
                retired: vcpu.instructions_retired().unwrap_or(0),
                kernel_retired: vcpu.kernel_instructions_retired().unwrap_or(0),
            });
        }
        // The pages this replay wrote are the private ones of its
        // copy-on-write mapping of the start image (pagemap tells them
        // apart); the others are the start image's. Without pagemap, every
        // page is compared.
        let size = self.header.mem_bytes;
        let candidates =
            written_pages(&self.mem, size).unwrap_or_else(|| (0..size / PAGE).collect());
        let mut pages = Vec::new();
        let (mut ours, mut theirs) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
        for page in candidates {
            let at = GuestAddress(page * PAGE);
            let read = self.mem.read_slice(&mut ours, at).is_ok()
                && start.view().read_slice(&mut theirs, at).is_ok();
            if read && ours != theirs {
                pages.push((page * PAGE, ours.clone().into_boxed_slice()));
            }
        }
        let counts = (0..self.vcpus.len())
            .map(|c| self.kernel_count(session, c))
            .collect();
        Ok(Some(ReplaySnapshot {
            session: session.duplicate(&self.dir)?,
            cpus,
            pages,
            counts,
        }))
    }

    /// A replay of the recording at `dir` standing where `snap` was taken
    /// (its memory from `start`, the image `snap` was taken against).
    pub fn restore(
        dir: &Path,
        start: &StartImage,
        snap: &ReplaySnapshot,
    ) -> Result<(Replayer, ReplaySession), ReplayError> {
        let mut replayer = Replayer::open_from(dir, start)?;
        for (gpa, page) in &snap.pages {
            replayer
                .mem
                .write_slice(page, GuestAddress(*gpa))
                .map_err(|e| ReplayError::Setup(format!("restoring page {gpa:#x}: {e}")))?;
        }
        let err = |e: krr_hypervisor::HypervisorError| ReplayError::Setup(format!("restore: {e}"));
        for (vcpu, cpu) in replayer.vcpus.iter_mut().zip(&snap.cpus) {
            vcpu.set_sregs(&cpu.sregs).map_err(err)?;
            vcpu.set_regs(&cpu.regs).map_err(err)?;
            vcpu.set_fpu(&cpu.fpu).map_err(err)?;
            for &(index, value) in &cpu.msrs {
                vcpu.set_msr(index, value).map_err(err)?;
            }
            vcpu.set_instructions_retired(cpu.retired, cpu.kernel_retired)
                .map_err(err)?;
        }
        let mut session = snap.session.duplicate(dir)?;
        // What a debugger asked of the turns when the snapshot was taken
        // is not what it asks now.
        session.debug = DebugControl::default();
        Ok((replayer, session))
    }
}
