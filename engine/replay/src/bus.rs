// SPDX-License-Identifier: GPL-2.0-or-later
//! The bus of a replay: no devices, the log answers every read, and
//! positions are rebased to the recording's kernel counts.

use super::source::{position_of, EventSource};
use krr_devices::console::ConsoleBuffer;
use krr_devices::serial::COM1_BASE;
use krr_hypervisor::{DeliveredException, IoBus, Position, RunEvents, UserEntry, Vcpu, VmExit};
use krr_machine::cpuid::{cpuid, CpuidConfig};
use krr_record::abi;
use krr_record::event::LogEvent;
use krr_record::log::DmaLogReader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The bus of a replay: no devices, the log answers.
pub(super) struct ReplayBus<'a> {
    pub(super) src: &'a mut EventSource,
    pub(super) mem: GuestMemoryMmap,
    pub(super) dma: Option<DmaLogReader>,
    pub(super) cpuid: CpuidConfig,
    pub(super) ring_phys: Option<u64>,
    /// The vCPU running and where it is.
    pub(super) cpu: usize,
    pub(super) at: Position,
    /// The first mismatch; the vCPU is stopped at the next access.
    pub(super) divergence: Option<(u64, String, String)>,
    /// Every event of the log was consumed and the kernel asked for more:
    /// the replay is at the recording's end (the guest was stopped there,
    /// e.g. by its reset, which replay does not carry out).
    pub(super) log_end: bool,
    /// Guest-physical ranges DMA wrote (translated code to drop).
    pub(super) dma_ranges: Vec<(u64, u64)>,
    /// Console output of the replayed kernel (its most recent bytes).
    pub(super) console: ConsoleBuffer,
    pub(super) serial_lcr: u8,
    pub(super) echo: bool,
    /// The vCPU executes one instruction (a debugger's step): an access it
    /// makes is counted at that instruction, not at the end of the block
    /// it belonged to when recorded, so counts are not compared (the
    /// event's order, kind, address and RIP still are).
    pub(super) stepping: bool,
}

impl ReplayBus<'_> {
    /// Whether a recorded kernel count matches the replay's.
    fn same_count(&self, recorded: u64, now: u64) -> bool {
        self.stepping || recorded == now
    }

    pub(super) fn diverge(&mut self, index: u64, expected: String, found: String) {
        if self.divergence.is_none() {
            self.divergence = Some((index, expected, found));
        }
    }

    /// Checks that the next event is a read of this kind and returns its
    /// value.
    pub(super) fn read_value(
        &mut self,
        what: &str,
        matches: impl Fn(&LogEvent) -> Option<u64>,
    ) -> u64 {
        if self.divergence.is_some() {
            return 0;
        }
        let at = self.at;
        match self.src.pop() {
            Some((i, e)) => match matches(&e) {
                Some(_) if usize::from(e.cpu()) != self.cpu => {
                    self.diverge(i, format!("{e}"), format!("{what} on vCPU {}", self.cpu));
                    0
                }
                Some(v) => {
                    if let Some(rec) = position_of(&e) {
                        if !self.same_count(rec.kernel_icount, at.kernel_icount) {
                            self.diverge(
                                i,
                                format!("{e}"),
                                format!("{what} at kernel instruction {}", at.kernel_icount),
                            );
                        }
                    }
                    v
                }
                None => {
                    self.diverge(i, format!("{e}"), format!("{what} at {at}"));
                    0
                }
            },
            None => {
                self.log_end = true;
                0
            }
        }
    }
}

impl IoBus for ReplayBus<'_> {
    fn pio_read(&mut self, _vcpu: usize, port: u16, data: &mut [u8]) {
        let size = data.len() as u8;
        let v = self.read_value(&format!("in{size} port {port:#x}"), |e| match e {
            LogEvent::PioRead {
                port: p,
                size: s,
                value,
                ..
            } if *p == port && *s == size => Some(u64::from(*value)),
            _ => None,
        });
        let bytes = v.to_le_bytes();
        let n = data.len();
        data.copy_from_slice(&bytes[..n]);
    }

    fn pio_write(&mut self, _vcpu: usize, port: u16, data: &[u8]) {
        // The console: COM1's transmit register (LCR bit 7 selects the
        // divisor latch instead).
        if port == COM1_BASE + 3 {
            self.serial_lcr = data[0];
        } else if port == COM1_BASE && self.serial_lcr & 0x80 == 0 {
            self.console.push(&data[..1]);
            // A mismatch stops the vCPU here; the turn reports it.
            self.src.console.replayed(data[0]);
            if self.echo {
                use std::io::Write;
                let _ = std::io::stdout().write_all(&data[..1]);
                let _ = std::io::stdout().flush();
            }
        } else if port == abi::DOORBELL_PORT && data.len() == 4 {
            let reason = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            if abi::Doorbell::from_value(reason).is_some_and(|d| d.wants_drain()) {
                let at = self.at;
                match self.src.pop() {
                    Some((
                        _,
                        LogEvent::Doorbell {
                            reason: r, tail, ..
                        },
                    )) if r == reason => {
                        if let Some(ring) = self.ring_phys {
                            let _ = self
                                .mem
                                .write_obj(tail, GuestAddress(ring + abi::TAIL_OFFSET as u64));
                        }
                    }
                    Some((i, e)) => {
                        self.diverge(i, format!("{e}"), format!("doorbell {reason} at {at}"))
                    }
                    None => self.log_end = true,
                }
            }
        }
    }

    fn mmio_read(&mut self, _vcpu: usize, addr: u64, data: &mut [u8]) {
        let size = data.len() as u8;
        let v = self.read_value(&format!("mmio-read{size} {addr:#x}"), |e| match e {
            LogEvent::MmioRead {
                addr: a,
                size: s,
                value,
                ..
            } if *a == addr && *s == size => Some(*value),
            _ => None,
        });
        let bytes = v.to_le_bytes();
        let n = data.len();
        data.copy_from_slice(&bytes[..n]);
    }

    fn mmio_write(&mut self, _vcpu: usize, _addr: u64, _data: &[u8]) {
        // DMA the device made during this access (a queue notification).
        let (stepping, now) = (self.stepping, self.at);
        while let Some((_, LogEvent::Dma { at, .. })) = self.src.peek() {
            if !(stepping || at.kernel_icount == now.kernel_icount) || at.rip != now.rip {
                break;
            }
            let Some((
                i,
                LogEvent::Dma {
                    gpa,
                    len,
                    dma_offset,
                    ..
                },
            )) = self.src.pop()
            else {
                break;
            };
            // A recording's DMA lands in guest RAM or nowhere; checked before
            // the DMA log is read for it.
            if !in_ram(&self.mem, gpa, len) {
                let ram = self.mem.last_addr().0.saturating_add(1);
                self.diverge(
                    i,
                    format!("DMA of {len} bytes to guest-physical {gpa:#x}, inside guest RAM"),
                    format!("guest RAM ends at {ram:#x}: the recording's DMA lies outside it"),
                );
                break;
            }
            let bytes = self.dma.as_mut().map(|d| d.read(dma_offset, len as usize));
            match bytes {
                Some(Ok(bytes)) => {
                    let _ = self.mem.write_slice(&bytes, GuestAddress(gpa));
                    self.dma_ranges.push((gpa, u64::from(len)));
                }
                _ => self.diverge(
                    i,
                    format!("DMA data at offset {dma_offset} of dma.krrlog"),
                    "no such data in the DMA log".into(),
                ),
            }
        }
    }

    fn cpuid(&mut self, vcpu: usize, leaf: u32, subleaf: u32) -> [u32; 4] {
        cpuid(&self.cpuid, vcpu, leaf, subleaf)
    }

    fn rdtsc(&mut self, _vcpu: usize) -> u64 {
        self.read_value("rdtsc", |e| match e {
            LogEvent::Rdtsc { value, .. } => Some(*value),
            _ => None,
        })
    }
}

impl RunEvents for ReplayBus<'_> {
    fn stop_requested(&self) -> bool {
        self.divergence.is_some() || self.log_end || self.src.console.mismatch().is_some()
    }

    fn position(&mut self, vcpu: usize, at: Position) {
        self.cpu = vcpu;
        self.at = at;
    }

    fn exception(&mut self, _vcpu: usize, at: Position, e: &DeliveredException) {
        if self.divergence.is_some() {
            return;
        }
        let found = format!(
            "exception vector {} (cpl {}){}{} at kernel instruction {} rip {:#x}",
            e.vector,
            e.cpl,
            e.error_code
                .map(|c| format!(" error={c:#x}"))
                .unwrap_or_default(),
            e.cr2
                .map(|c| {
                    let name = if e.vector == 1 { "dr6" } else { "cr2" };
                    format!(" {name}={c:#x}")
                })
                .unwrap_or_default(),
            at.kernel_icount,
            at.rip
        );
        // An exception at CPL 3 without user code having run: the kernel
        // returned to a user page that is not present, and fetching its
        // first instruction faults, as it did when recorded (a kernel entry
        // the CPU makes by itself).
        let stepping = self.stepping;
        match self.src.pop() {
            Some((
                _,
                LogEvent::Exception {
                    vector,
                    at: rec,
                    from_user,
                    cr2,
                    ..
                },
            )) if vector == e.vector
                && from_user == (e.cpl == 3)
                // Recordings before December 2026 log no DR6 for #DB.
                && (cr2 == e.cr2 || (vector == 1 && cr2.is_none()))
                && (stepping || rec.kernel_icount == at.kernel_icount)
                && rec.rip == at.rip => {}
            Some((i, other)) => self.diverge(i, format!("{other}"), found),
            None => self.log_end = true,
        }
    }

    fn syscall(&mut self, _vcpu: usize, at: Position, _entry: &UserEntry) {
        // The kernel itself never executes SYSCALL; user code does not run.
        self.diverge(
            self.src.consumed,
            "no SYSCALL executed in the replay".into(),
            format!("SYSCALL at {at}"),
        );
    }
}

/// Whether guest-physical `[gpa, gpa + len)` is all guest RAM.
pub(super) fn in_ram(mem: &GuestMemoryMmap, gpa: u64, len: u32) -> bool {
    gpa.checked_add(u64::from(len)).is_some()
        && GuestMemoryBackend::check_range(mem, GuestAddress(gpa), len as usize)
}

/// Runs the vCPU with positions rebased to the recording's counts: the
/// bus sees `kernel_icount` as the recording counted it.
pub(super) fn run_rebased(
    vcpu: &mut dyn Vcpu,
    bus: &mut ReplayBus<'_>,
    budget: Option<u64>,
    base_kernel: u64,
) -> krr_hypervisor::Result<VmExit> {
    struct Rebased<'b, 'c> {
        inner: &'b mut ReplayBus<'c>,
        base: u64,
    }
    impl Rebased<'_, '_> {
        fn rebase(&self, mut at: Position) -> Position {
            at.kernel_icount = at.kernel_icount.saturating_add(self.base);
            at
        }
    }
    impl IoBus for Rebased<'_, '_> {
        fn pio_read(&mut self, vcpu: usize, port: u16, data: &mut [u8]) {
            self.inner.pio_read(vcpu, port, data)
        }
        fn pio_write(&mut self, vcpu: usize, port: u16, data: &[u8]) {
            self.inner.pio_write(vcpu, port, data)
        }
        fn mmio_read(&mut self, vcpu: usize, addr: u64, data: &mut [u8]) {
            self.inner.mmio_read(vcpu, addr, data)
        }
        fn mmio_write(&mut self, vcpu: usize, addr: u64, data: &[u8]) {
            self.inner.mmio_write(vcpu, addr, data)
        }
        fn cpuid(&mut self, vcpu: usize, leaf: u32, subleaf: u32) -> [u32; 4] {
            self.inner.cpuid(vcpu, leaf, subleaf)
        }
        fn rdtsc(&mut self, vcpu: usize) -> u64 {
            self.inner.rdtsc(vcpu)
        }
    }

    impl RunEvents for Rebased<'_, '_> {
        fn stop_requested(&self) -> bool {
            self.inner.stop_requested()
        }
        fn position(&mut self, vcpu: usize, at: Position) {
            let at = self.rebase(at);
            self.inner.position(vcpu, at)
        }
        fn exception(&mut self, vcpu: usize, at: Position, e: &DeliveredException) {
            let at = self.rebase(at);
            self.inner.exception(vcpu, at, e)
        }
        fn syscall(&mut self, vcpu: usize, at: Position, entry: &UserEntry) {
            let at = self.rebase(at);
            self.inner.syscall(vcpu, at, entry)
        }
    }
    let mut rebased = Rebased {
        inner: bus,
        base: base_kernel,
    };
    vcpu.run(&mut rebased, budget)
}

#[cfg(test)]
mod tests {
    use super::*;
    use krr_record::log::{DmaLogWriter, EventLogWriter};

    /// The bus of a replay of a log holding `events`, and one DMA log of 64
    /// bytes, over 1 MiB of guest RAM.
    fn replay_of(
        dir: &std::path::Path,
        events: &[LogEvent],
    ) -> (EventSource, GuestMemoryMmap, DmaLogReader) {
        let events_path = dir.join("events.krrlog");
        let mut w = EventLogWriter::with_target(&events_path, 4096).unwrap();
        for e in events {
            w.append(e).unwrap();
        }
        w.flush().unwrap();
        let dma_path = dir.join("dma.krrlog");
        let mut d = DmaLogWriter::with_target(&dma_path, 4096).unwrap();
        d.append(&[0x5a; 64]).unwrap();
        d.flush().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        (
            EventSource::open(&events_path, false).unwrap(),
            mem,
            DmaLogReader::open(&dma_path).unwrap(),
        )
    }

    fn dma(gpa: u64, len: u32) -> LogEvent {
        LogEvent::Dma {
            cpu: 0,
            at: Position::default(),
            gpa,
            len,
            dma_offset: 0,
        }
    }

    /// Replays an MMIO write that meets `event`; the divergence, if any.
    fn replay_dma(event: LogEvent) -> (Option<(u64, String, String)>, GuestMemoryMmap) {
        let dir = tempfile::tempdir().unwrap();
        let (mut src, mem, dma) = replay_of(dir.path(), &[event]);
        let mut bus = ReplayBus {
            src: &mut src,
            mem: mem.clone(),
            dma: Some(dma),
            cpuid: CpuidConfig {
                apic: false,
                vcpus: 1,
            },
            ring_phys: None,
            cpu: 0,
            at: Position::default(),
            divergence: None,
            log_end: false,
            dma_ranges: Vec::new(),
            console: ConsoleBuffer::new(),
            serial_lcr: 0,
            echo: false,
            stepping: false,
        };
        bus.mmio_write(0, 0xd000_0050, &[0; 4]);
        (bus.divergence.take(), mem)
    }

    /// A recording's DMA outside guest RAM (past its end, or wrapping
    /// past the top of the address space) ends the replay with a report
    /// that says so, and writes nothing; DMA inside RAM is written.
    #[test]
    fn dma_outside_guest_ram_is_refused() {
        let (none, mem) = replay_dma(dma(0x1000, 64));
        assert_eq!(none, None);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0x5a5a_5a5a_5a5a_5a5a
        );
        for gpa in [(1 << 20) - 32, 1 << 40, u64::MAX - 16] {
            let (divergence, mem) = replay_dma(dma(gpa, 64));
            let (index, expected, found) = divergence.expect("a divergence");
            assert_eq!(index, 0);
            assert!(
                expected.contains(&format!("to guest-physical {gpa:#x}")),
                "{expected}"
            );
            assert!(found.contains("guest RAM ends at 0x100000"), "{found}");
            let tail = mem.read_obj::<u64>(GuestAddress((1 << 20) - 8)).unwrap();
            assert_eq!(tail, 0, "nothing written");
        }
    }
}
