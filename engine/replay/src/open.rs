// SPDX-License-Identifier: GPL-2.0-or-later
//! Loading a recording for replay: its memory image into a fresh software
//! CPU, the vCPUs as the snapshot left them, the recording's end counts.

use super::*;
use std::fs::File;
use std::sync::Arc;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

/// The memory image of a recording's start, decompressed once into a
/// memory-backed file and shared by every replay opened from it
/// ([`Replayer::open_from`]): each maps it privately, copy-on-write, so a
/// debugger's restart costs neither decompressing nor copying the guest's
/// RAM, and only the pages a replay writes take memory of their own.
pub struct StartImage {
    file: Arc<File>,
    bytes: u64,
    /// The image itself (shared, never written after loading), which
    /// snapshots compare guest memory with.
    view: GuestMemoryMmap,
}

impl StartImage {
    /// Decompresses the memory image of the recording at `dir`.
    pub fn load(dir: &Path) -> Result<StartImage, ReplayError> {
        let header = recording::load_header(dir)?;
        let io = |e: std::io::Error| ReplayError::Setup(format!("start memory image: {e}"));
        let file = tempfile::tempfile_in("/dev/shm")
            .or_else(|_| tempfile::tempfile())
            .map_err(io)?;
        file.set_len(header.mem_bytes).map_err(io)?;
        let file = Arc::new(file);
        let view = map(&file, header.mem_bytes, libc::MAP_SHARED)?;
        recording::load_memory_into(dir, &view)?;
        Ok(StartImage {
            file,
            bytes: header.mem_bytes,
            view,
        })
    }

    /// The image as guest memory (read it only).
    pub(crate) fn view(&self) -> &GuestMemoryMmap {
        &self.view
    }

    /// A private, copy-on-write view of the image as guest memory.
    fn private_copy(&self) -> Result<GuestMemoryMmap, ReplayError> {
        map(
            &self.file,
            self.bytes,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
    }
}

/// `file` mapped as guest memory at 0 (`flags`: shared, or private).
fn map(file: &Arc<File>, bytes: u64, flags: i32) -> Result<GuestMemoryMmap, ReplayError> {
    let err = |e: String| ReplayError::Setup(format!("mapping the start memory image: {e}"));
    let region = MmapRegionBuilder::new(bytes as usize)
        .with_file_offset(FileOffset::from_arc(file.clone(), 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| err("a region at 0 of that size".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| err(e.to_string()))
}

impl Replayer {
    /// Loads the recording at `dir` (snapshot into a fresh software CPU).
    pub fn open(dir: &Path) -> Result<Replayer, ReplayError> {
        let header = recording::load_header(dir)?;
        let mem = krr_machine::create_memory(header.mem_bytes)
            .map_err(|e| ReplayError::Setup(e.to_string()))?;
        recording::load_memory_into(dir, &mem)?;
        Replayer::open_with(dir, mem)
    }

    /// [`Replayer::open`] with the start's memory from `image` (loaded once
    /// for many replays of the same recording).
    pub fn open_from(dir: &Path, image: &StartImage) -> Result<Replayer, ReplayError> {
        Replayer::open_with(dir, image.private_copy()?)
    }

    /// Opens the recording at `dir` with `mem` holding its start's memory.
    fn open_with(dir: &Path, mem: GuestMemoryMmap) -> Result<Replayer, ReplayError> {
        let header = recording::load_header(dir)?;
        let end = recording::load_end(dir)?;
        let cpus = recording::load_cpus(dir)?;
        if cpus.len() != header.vcpus || cpus.iter().enumerate().any(|(i, c)| c.id != i) {
            return Err(ReplayError::Setup(format!(
                "{}: the snapshot holds vCPUs {:?}; the header says {} vCPUs",
                dir.display(),
                cpus.iter().map(|c| c.id).collect::<Vec<_>>(),
                header.vcpus
            )));
        }
        if mem.iter().map(|r| r.len()).sum::<u64>() != header.mem_bytes {
            return Err(ReplayError::Setup(format!(
                "{}: the header says {} bytes of memory; the image has others",
                dir.display(),
                header.mem_bytes
            )));
        }
        let setup = |e: krr_hypervisor::HypervisorError| ReplayError::Setup(e.to_string());
        let mut vm: Box<dyn Vm> = Box::new(UnicornVm::new(&mem).map_err(setup)?);
        vm.add_mmio_region(LAPIC_BASE, LAPIC_SIZE).map_err(setup)?;
        vm.add_mmio_region(IOAPIC_BASE, IOAPIC_SIZE)
            .map_err(setup)?;
        if header.disk.is_some() {
            vm.add_mmio_region(VIRTIO_BASE, VIRTIO_MMIO_WINDOW_SIZE)
                .map_err(setup)?;
        }
        let mut vcpus = Vec::new();
        for cpu in &cpus {
            let mut vcpu = vm.create_vcpu(cpu.id).map_err(setup)?;
            vcpu.set_sregs(&cpu.sregs).map_err(setup)?;
            vcpu.set_regs(&cpu.regs).map_err(setup)?;
            vcpu.set_fpu(&krr_hypervisor::FpuState {
                xsave: cpu.fpu.clone(),
            })
            .map_err(setup)?;
            for &(msr, value) in &cpu.msrs {
                vcpu.set_msr(msr, value).map_err(setup)?;
            }
            vcpu.set_stop_at_user_mode(true).map_err(setup)?;
            vcpus.push(vcpu);
        }
        // The ring's control as it was while recording (the snapshot may
        // predate the engine setting it).
        if let (Some(ring), Some(control)) = (
            header.ring,
            header.machine.get("ring_control").and_then(|v| v.as_u64()),
        ) {
            mem.write_obj(
                control as u32,
                GuestAddress(ring.phys + abi::CONTROL_OFFSET as u64),
            )
            .map_err(|e| ReplayError::Setup(format!("ring control: {e}")))?;
        }
        let symbols = header
            .vmlinux
            .as_ref()
            .and_then(|v| Symbols::beside(Path::new(&v.path)))
            .or_else(|| Symbols::beside(Path::new(&header.kernel.path)))
            .unwrap_or_default();
        Ok(Replayer {
            dir: dir.to_path_buf(),
            complete: end.is_some(),
            recorded_wall: end.as_ref().map(|e| e.wall_seconds),
            // Recordings of log format 3 before the kernel counts were
            // added give only the total counts: a looser bound.
            recorded_end_icounts: end
                .as_ref()
                .map(|e| {
                    if e.kernel_instructions_per_vcpu.is_empty() {
                        e.instructions_per_vcpu.clone()
                    } else {
                        e.kernel_instructions_per_vcpu.clone()
                    }
                })
                .unwrap_or_default(),
            recorded_triple_fault: end.as_ref().and_then(|e| e.triple_fault_vcpu),
            kernel_image: KernelImage::from_symbols(&symbols),
            header,
            cpus,
            vcpus,
            vm,
            mem,
            symbols,
        })
    }
}
