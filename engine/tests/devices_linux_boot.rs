// SPDX-License-Identifier: GPL-2.0-or-later
//! Boots the real Linux 6.1 guest on the software CPU with this project's
//! local APIC, IO-APIC, MP table and virtio-mmio block device (no `noapic`,
//! no `nolapic`, no `no_timer_check`), then checks from the console and from
//! the device that the kernel used them: MP table parsed, PIT timer through
//! IO-APIC pin 2, virtio-blk probed, a sector read, a sector written (into
//! the overlay, not the image file) and read back; and, on 2 vCPUs, the AP
//! started through INIT/SIPI and IPIs between the CPUs. The 1-vCPU boot runs
//! twice and must be identical.
//!
//! The run loop here is a minimal stand-in for the machine's, just enough
//! to drive the devices the way the engine will (interrupts injected by the
//! loop, EOI broadcast to the IO-APIC, DMA at QueueNotify).
//!
//! Needs a kernel and initramfs built by `cargo xtask images build`:
//!   KRR_TEST_KERNEL=/path/bzImage KRR_TEST_INITRD=/path/initramfs.cpio.gz \
//!   cargo test --release -p krr-engine --test devices_linux_boot -- --ignored --nocapture
//! (KRR_TEST_TRACE=1 prints the run loop's progress.)

use std::io::Write;
use std::path::{Path, PathBuf};

use krr_engine::devices::cmos::{Cmos, DEFAULT_EPOCH};
use krr_engine::devices::ioapic::{IoApic, IOAPIC_BASE, IOAPIC_SIZE};
use krr_engine::devices::lapic::{
    deliver, ApEvent, ApicOutput, InterruptMessage, LocalApic, LAPIC_BASE, LAPIC_SIZE,
};
use krr_engine::devices::pic::Pic;
use krr_engine::devices::pit::Pit;
use krr_engine::devices::serial::{ConsoleSink, SerialConsole, COM1_BASE, COM1_IRQ};
use krr_engine::devices::virtio_blk::VirtioBlk;
use krr_engine::devices::virtio_mmio::{
    GuestRange, VirtioMmio, WriteEffect, VIRTIO_MMIO_WINDOW_SIZE,
};
use krr_engine::hypervisor::unicorn::UnicornVm;
use krr_engine::hypervisor::{kvm, Injection, IoBus, Vcpu, Vm, VmExit};
use krr_engine::machine::cpuid::{cpuid, CpuidConfig};
use krr_engine::machine::{boot, create_memory, mptable};
use vm_memory::GuestMemoryMmap;

const VIRTIO_BASE: u64 = 0xd000_0000;
const VIRTIO_IRQ: usize = 5;
const PIT_IOAPIC_PIN: usize = 2;
const MEM_BYTES: u64 = 256 << 20;
const MAX_INSTRUCTIONS: u64 = 20_000_000_000;

/// The I/O side of the test machine: legacy PIO devices plus the devices
/// under test on MMIO.
struct TestBus {
    mem: GuestMemoryMmap,
    pic: Pic,
    pit: Pit,
    cmos: Cmos,
    serial: SerialConsole,
    cpuid: CpuidConfig,
    apics: Vec<LocalApic>,
    ioapic: IoApic,
    blk: VirtioMmio<VirtioBlk>,
    /// Per vCPU: instructions retired, and virtual time spent halted.
    retired: Vec<u64>,
    idle_ns: Vec<u64>,
    /// Stop the vCPU after the current access (an interrupt became pending
    /// or the guest asked for a reset).
    stop: bool,
    reset: bool,
    dma: Vec<GuestRange>,
    serial_level: bool,
    virtio_interrupts: u64,
    /// Interrupt messages the IO-APIC sent for each pin pulse.
    ioapic_messages: [u64; 24],
    ipis: u64,
    device_errors: Vec<String>,
}

impl TestBus {
    fn now(&self, vcpu: usize) -> u64 {
        self.retired[vcpu] + self.idle_ns[vcpu]
    }

    fn route(&mut self, message: Option<InterruptMessage>) {
        if let Some(message) = message {
            deliver(&mut self.apics, None, &message);
            self.stop = true;
        }
    }

    fn pulse_ioapic(&mut self, pin: usize) {
        let msg = self.ioapic.set_irq(pin, true).unwrap();
        if msg.is_some() {
            self.ioapic_messages[pin] += 1;
        }
        self.route(msg);
        let msg = self.ioapic.set_irq(pin, false).unwrap();
        self.route(msg);
    }

    /// The UART's INTR is a level on both the PIC and the IO-APIC.
    fn update_serial_irq(&mut self) {
        self.serial.take_irq();
        let level = self.serial.irq_level();
        self.pic.set_irq(COM1_IRQ, level);
        if level != self.serial_level {
            self.serial_level = level;
            let msg = self.ioapic.set_irq(usize::from(COM1_IRQ), level).unwrap();
            self.route(msg);
        }
    }

    /// Brings the timers to `now` (all vCPUs' clocks agree at round
    /// boundaries). PIT IRQ 0 goes to PIC input 0 and IO-APIC pin 2, like
    /// on a PC.
    fn advance_timers(&mut self, now: u64) {
        for _ in 0..self.pit.tick(now) {
            self.pic.pulse_irq(0);
            self.pulse_ioapic(PIT_IOAPIC_PIN);
        }
        for apic in &mut self.apics {
            apic.tick(now);
        }
    }

    fn next_deadline(&self) -> Option<u64> {
        self.apics
            .iter()
            .map(LocalApic::next_deadline)
            .chain([self.pit.next_deadline()])
            .flatten()
            .min()
    }

    /// The 8259's INTR reaches the CPU through LINT0 when the LVT routes it
    /// as ExtINT (virtual wire mode).
    fn pic_routed_to_cpu(&self) -> bool {
        let mut lvt0 = [0u8; 4];
        self.apics[0].read(0x350, &mut lvt0, 0).unwrap();
        let lvt0 = u32::from_le_bytes(lvt0);
        lvt0 & (1 << 16) == 0 && (lvt0 >> 8) & 7 == 7
    }

    fn note<E: std::fmt::Display>(&mut self, result: Result<(), E>) {
        if let Err(e) = result {
            self.device_errors.push(e.to_string());
        }
    }
}

impl IoBus for TestBus {
    fn instructions_retired(&mut self, vcpu: usize, count: u64) {
        self.retired[vcpu] = count;
    }

    fn pio_read(&mut self, vcpu: usize, port: u16, data: &mut [u8]) {
        let now = self.now(vcpu);
        let value = match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => self.pic.pio_read(port),
            0x40..=0x43 | 0x61 => self.pit.pio_read(port, now),
            0x70 | 0x71 => self.cmos.pio_read(port, now),
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                let v = self.serial.pio_read(p);
                self.update_serial_irq();
                v
            }
            _ => 0xff,
        };
        data.fill(0xff);
        data[0] = value;
    }

    fn pio_write(&mut self, vcpu: usize, port: u16, data: &[u8]) {
        let now = self.now(vcpu);
        let value = data[0];
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => self.pic.pio_write(port, value),
            0x40..=0x43 | 0x61 => self.pit.pio_write(port, value, now),
            0x70 | 0x71 => self.cmos.pio_write(port, value),
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                self.serial.pio_write(p, value);
                self.update_serial_irq();
            }
            0x64 if value == 0xfe => {
                self.reset = true;
                self.stop = true;
            }
            _ => {}
        }
    }

    fn mmio_read(&mut self, vcpu: usize, addr: u64, data: &mut [u8]) {
        let now = self.now(vcpu);
        let result = if (LAPIC_BASE..LAPIC_BASE + LAPIC_SIZE).contains(&addr) {
            self.apics[vcpu]
                .read(addr - LAPIC_BASE, data, now)
                .map_err(|e| e.to_string())
        } else if (IOAPIC_BASE..IOAPIC_BASE + IOAPIC_SIZE).contains(&addr) {
            self.ioapic
                .read(addr - IOAPIC_BASE, data)
                .map_err(|e| e.to_string())
        } else if (VIRTIO_BASE..VIRTIO_BASE + VIRTIO_MMIO_WINDOW_SIZE).contains(&addr) {
            self.blk
                .read(addr - VIRTIO_BASE, data)
                .map_err(|e| e.to_string())
        } else {
            data.fill(0xff);
            Err(format!("MMIO read of unmapped {addr:#x}"))
        };
        self.note(result);
    }

    fn mmio_write(&mut self, vcpu: usize, addr: u64, data: &[u8]) {
        self.mmio_write_inner(vcpu, addr, data);
        // No stop request from an MMIO access: the software CPU, stopped
        // inside an MMIO hook, re-executes the whole translation block, so
        // the write would happen twice (seen as INIT IPIs sent in a loop).
        // Interrupts raised here are injected at the next run instead.
        self.stop = false;
    }

    fn stop_requested(&self) -> bool {
        self.stop
    }

    fn cpuid(&mut self, vcpu: usize, leaf: u32, subleaf: u32) -> [u32; 4] {
        cpuid(&self.cpuid, vcpu, leaf, subleaf)
    }

    fn rdtsc(&mut self, vcpu: usize) -> u64 {
        self.now(vcpu)
    }
}

impl TestBus {
    fn mmio_write_inner(&mut self, vcpu: usize, addr: u64, data: &[u8]) {
        let now = self.now(vcpu);
        if (LAPIC_BASE..LAPIC_BASE + LAPIC_SIZE).contains(&addr) {
            match self.apics[vcpu].write(addr - LAPIC_BASE, data, now) {
                Ok(Some(ApicOutput::Ipi(msg))) => {
                    self.ipis += 1;
                    deliver(&mut self.apics, Some(vcpu), &msg);
                }
                Ok(Some(ApicOutput::EoiBroadcast { vector })) => {
                    for msg in self.ioapic.end_of_interrupt(vector) {
                        self.route(Some(msg));
                    }
                }
                Ok(None) => {}
                Err(e) => self.device_errors.push(e.to_string()),
            }
        } else if (IOAPIC_BASE..IOAPIC_BASE + IOAPIC_SIZE).contains(&addr) {
            match self.ioapic.write(addr - IOAPIC_BASE, data) {
                Ok(messages) => {
                    for msg in messages {
                        self.route(Some(msg));
                    }
                }
                Err(e) => self.device_errors.push(e.to_string()),
            }
        } else if (VIRTIO_BASE..VIRTIO_BASE + VIRTIO_MMIO_WINDOW_SIZE).contains(&addr) {
            match self.blk.write(addr - VIRTIO_BASE, data) {
                Ok(WriteEffect::QueueNotify { queue }) => {
                    match self.blk.process_queue(queue, &self.mem) {
                        Ok(completion) => {
                            self.dma.extend(completion.dma_writes);
                            if completion.raise_interrupt {
                                self.virtio_interrupts += 1;
                                self.pulse_ioapic(VIRTIO_IRQ);
                            }
                        }
                        Err(e) => self.device_errors.push(e.to_string()),
                    }
                }
                Ok(WriteEffect::None) => {}
                Err(e) => self.device_errors.push(e.to_string()),
            }
        } else {
            self.device_errors
                .push(format!("MMIO write of unmapped {addr:#x}"));
        }
    }
}

fn env_path(name: &str) -> PathBuf {
    let value = std::env::var_os(name).unwrap_or_else(|| {
        panic!("{name} is not set: point it at the guest image (see this file's header)")
    });
    let path = PathBuf::from(value);
    assert!(path.is_file(), "{name}={} is not a file", path.display());
    path
}

/// What one boot produced.
struct Outcome {
    console: String,
    end: String,
    instructions: u64,
    injected: u64,
    bus: TestBus,
}

/// Virtual time one round of the lockstep loop covers at most: the
/// latency of an interrupt sent to another vCPU.
const ROUND_NS: u64 = 100_000;

/// Injects what vCPU `id` can take now. Returns whether something is
/// deliverable to it (injected or waiting for its interrupt window).
fn inject_pending(bus: &mut TestBus, vcpu: &mut dyn Vcpu, id: usize, injected: &mut u64) -> bool {
    let window = vcpu.interrupt_window_open().unwrap();
    if bus.apics[id].take_nmi() {
        vcpu.inject(Injection::Nmi).unwrap();
        return true;
    }
    if bus.apics[id].pending_vector().is_some() {
        if window {
            let vector = bus.apics[id].acknowledge();
            vcpu.inject(Injection::Interrupt(vector)).unwrap();
            *injected += 1;
        }
        return true;
    }
    if id == 0 && bus.pic.has_interrupt() && bus.pic_routed_to_cpu() {
        if window {
            if let Some(vector) = bus.pic.acknowledge() {
                vcpu.inject(Injection::Interrupt(vector)).unwrap();
                *injected += 1;
            }
        }
        return true;
    }
    false
}

/// Boots the guest once on `vcpus` CPUs with `disk` behind the virtio-blk
/// device and runs the test command.
///
/// Scheduling: all vCPUs advance in lockstep rounds that end at the same
/// virtual time (at most [`ROUND_NS`] later, and never past a timer
/// deadline); a vCPU that halts idles to the end of the round. Timers fire
/// at round ends; interrupts are injected whenever a vCPU is about to run.
fn boot_once(kernel: &Path, initrd: &Path, disk: &Path, vcpus: usize) -> Outcome {
    let command = "head -c 12 /dev/vda; \
        printf krr-write-ok | dd of=/dev/vda bs=512 seek=2 conv=sync,fsync 2>/dev/null; \
        sync; echo 3 > /proc/sys/vm/drop_caches; \
        echo read-back: $(dd if=/dev/vda bs=512 skip=2 count=1 2>/dev/null | head -c 12); \
        echo serial: $(cat /sys/block/vda/serial); echo online: $(cat /sys/devices/system/cpu/online)";
    let cmdline = format!(
        "console=ttyS0 nokaslr acpi=off tsc=reliable mitigations=off panic=-1 reboot=k \
         rdinit=/init apic=verbose virtio_mmio.device=4K@{VIRTIO_BASE:#x}:{VIRTIO_IRQ} \
         krr.run=\"{command}\""
    );

    let mem = create_memory(MEM_BYTES).unwrap();
    let info = boot::load_linux(&mem, MEM_BYTES, kernel, Some(initrd), &cmdline).unwrap();
    let region = mptable::write_mptable(&mem, vcpus as u8).unwrap();

    let mut vm = UnicornVm::new(&mem).unwrap();
    for (base, size) in [
        (LAPIC_BASE, LAPIC_SIZE),
        (IOAPIC_BASE, IOAPIC_SIZE),
        (VIRTIO_BASE, VIRTIO_MMIO_WINDOW_SIZE),
    ] {
        vm.add_mmio_region(base, size).unwrap();
    }
    let mut cpus: Vec<Box<dyn Vcpu>> = (0..vcpus).map(|id| vm.create_vcpu(id).unwrap()).collect();
    let mut sregs = info.sregs;
    // IA32_APIC_BASE: default base, global enable (bit 11), BSP (bit 8).
    sregs.apic_base = LAPIC_BASE | (1 << 11) | (1 << 8);
    cpus[0].set_sregs(&sregs).unwrap();
    cpus[0].set_regs(&info.regs).unwrap();

    let mut apics = vec![LocalApic::new(0)];
    apics.extend((1..vcpus).map(|id| LocalApic::new_ap(id as u8)));
    let mut bus = TestBus {
        mem: mem.clone(),
        pic: Pic::new(),
        pit: Pit::new(),
        cmos: Cmos::new(DEFAULT_EPOCH, MEM_BYTES),
        serial: SerialConsole::new(ConsoleSink::None),
        cpuid: CpuidConfig {
            apic: true,
            vcpus: vcpus as u32,
        },
        apics,
        ioapic: IoApic::new(region.ioapic_id),
        blk: VirtioMmio::new(VirtioBlk::open(disk, false, "krr-test-serial").unwrap()),
        retired: vec![0; vcpus],
        idle_ns: vec![0; vcpus],
        stop: false,
        reset: false,
        dma: Vec::new(),
        serial_level: false,
        virtio_interrupts: 0,
        ioapic_messages: [0; 24],
        ipis: 0,
        device_errors: Vec::new(),
    };

    let started = std::time::Instant::now();
    let mut injected = 0u64;
    let mut running = vec![false; vcpus];
    running[0] = true;
    let mut halted = vec![false; vcpus];
    let mut round_start = 0u64;
    let trace = std::env::var_os("KRR_TEST_TRACE").is_some();
    let mut rounds_until_trace = 200u32;
    let end = 'machine: loop {
        bus.advance_timers(round_start);
        if round_start >= MAX_INSTRUCTIONS {
            break "instruction budget exhausted".to_string();
        }
        let round_end = bus
            .next_deadline()
            .filter(|&d| d > round_start)
            .map_or(round_start + ROUND_NS, |d| d.min(round_start + ROUND_NS));
        let mut id = 0;
        while id < vcpus {
            // INIT/Startup IPIs sent so far start or stop vCPUs.
            for target in 0..vcpus {
                while let Some(event) = bus.apics[target].take_ap_event() {
                    match event {
                        ApEvent::Init => running[target] = false,
                        ApEvent::Startup { vector } => {
                            let current = cpus[target].sregs().unwrap();
                            let (regs, sregs) = kvm::sipi_state(vector, &current);
                            cpus[target].set_sregs(&sregs).unwrap();
                            cpus[target].set_regs(&regs).unwrap();
                            running[target] = true;
                            halted[target] = false;
                            // It joins at the current time of the round.
                            let behind = round_start.saturating_sub(bus.now(target));
                            bus.idle_ns[target] += behind;
                        }
                    }
                }
            }
            if !running[id] {
                bus.idle_ns[id] += round_end.saturating_sub(bus.now(id));
                id += 1;
                continue;
            }
            let now = bus.now(id);
            if now >= round_end {
                id += 1;
                continue;
            }
            let deliverable = inject_pending(&mut bus, cpus[id].as_mut(), id, &mut injected);
            if halted[id] && !deliverable {
                bus.idle_ns[id] += round_end - now;
                id += 1;
                continue;
            }
            halted[id] = false;
            let window = cpus[id].interrupt_window_open().unwrap();
            let mut budget = round_end - now;
            if deliverable && !window {
                budget = budget.min(1_000);
            }
            bus.stop = false;
            let exit = match cpus[id].run(&mut bus, Some(budget)) {
                Ok(exit) => exit,
                Err(e) => break 'machine format!("vCPU {id}: backend error: {e}"),
            };
            // The backend reports the count to the bus only at I/O accesses.
            bus.retired[id] = cpus[id].instructions_retired().unwrap();
            // Translated code of pages the device wrote is stale.
            for range in std::mem::take(&mut bus.dma) {
                vm.invalidate_code(range.addr, range.len).unwrap();
            }
            if bus.reset {
                break 'machine "guest reset".to_string();
            }
            match exit {
                VmExit::Hlt => {
                    if id == 0 && !cpus[0].interrupt_window_open().unwrap() {
                        break 'machine "BSP halted with interrupts disabled".to_string();
                    }
                    halted[id] = true;
                }
                VmExit::Shutdown => break 'machine format!("vCPU {id}: triple fault"),
                _ => {}
            }
        }
        round_start = round_end;
        if trace {
            rounds_until_trace -= 1;
            if rounds_until_trace == 0 {
                rounds_until_trace = 200;
                let out = bus.serial.output();
                eprintln!(
                    "[t={round_start} retired={:?} running={running:?} halted={halted:?} \
                     ipis={} console tail: {:?}]",
                    bus.retired,
                    bus.ipis,
                    String::from_utf8_lossy(&out[out.len().saturating_sub(300)..])
                );
            }
        }
        let out = bus.serial.output();
        if out.windows(8).any(|w| w == b"KRR-END ")
            && String::from_utf8_lossy(out).contains("reboot:")
        {
            break "end marker".to_string();
        }
    };

    let console = String::from_utf8_lossy(bus.serial.output()).into_owned();
    println!(
        "--- {vcpus} vCPU(s), end: {end}; {:?} instructions, {:.1} s wall, {injected} \
         interrupts injected, {} IPIs, {} virtio interrupts; device errors: {:?}",
        bus.retired,
        started.elapsed().as_secs_f64(),
        bus.ipis,
        bus.virtio_interrupts,
        bus.device_errors
    );
    Outcome {
        console,
        end,
        instructions: bus.retired.iter().sum(),
        injected,
        bus,
    }
}

/// A 1 MiB disk whose sector 0 says who it is; the rest is zero.
fn test_disk() -> tempfile::NamedTempFile {
    let mut disk = tempfile::NamedTempFile::new().unwrap();
    let mut sector0 = [0u8; 512];
    sector0[..12].copy_from_slice(b"krr-disk-ok\n");
    disk.write_all(&sector0).unwrap();
    disk.write_all(&vec![0u8; (1 << 20) - 512]).unwrap();
    disk.flush().unwrap();
    disk
}

/// What every boot must show, whatever the vCPU count.
fn check_boot(outcome: &Outcome, disk: &Path, original: &[u8], vcpus: usize) {
    let (console, end, bus) = (&outcome.console, &outcome.end, &outcome.bus);
    let online = if vcpus == 1 {
        "online: 0".to_string()
    } else {
        format!("online: 0-{}", vcpus - 1)
    };
    let brought_up = format!(
        "smp: Brought up 1 node, {vcpus} CPU{}",
        if vcpus == 1 { "" } else { "s" }
    );
    for expected in [
        "MPTABLE: OEM ID: KRR",
        "Processor #0 (Bootup-CPU)",
        &format!("IOAPIC[0]: apic_id {vcpus}, version 17, address 0xfec00000, GSI 0-23"),
        "..TIMER: vector=0x",
        "apic1=0 pin1=2",
        &brought_up,
        "virtio_blk virtio0: [vda] 2048 512-byte logical blocks",
        "krr-disk-ok",
        "read-back: krr-write-ok",
        "serial: krr-test-serial",
        &online,
        "KRR-END status=0",
    ] {
        assert!(
            console.contains(expected),
            "console lacks {expected:?} (run ended: {end})"
        );
    }
    assert!(
        !console.contains("Kernel panic"),
        "kernel panicked (run ended: {end})"
    );
    assert!(bus.virtio_interrupts > 0);
    // The guest's write is in the overlay, the image file is untouched.
    let sector2 = bus
        .blk
        .device()
        .overlay_sectors()
        .find(|&(s, _)| s == 2)
        .map(|(_, d)| d.to_vec())
        .expect("sector 2 written by the guest");
    assert_eq!(&sector2[..12], b"krr-write-ok");
    assert_eq!(std::fs::read(disk).unwrap(), original);
    // Every completion interrupt went out of IO-APIC pin 5 (the guest had
    // programmed it), and the PIT reached the CPU through pin 2.
    assert_eq!(bus.ioapic_messages[VIRTIO_IRQ], bus.virtio_interrupts);
    assert!(bus.ioapic_messages[PIT_IOAPIC_PIN] > 0);
    assert!(bus.device_errors.is_empty(), "{:?}", bus.device_errors);
}

#[test]
#[ignore = "boots a real kernel; needs KRR_TEST_KERNEL and KRR_TEST_INITRD"]
fn linux_boots_with_apics_mptable_and_virtio_blk() {
    let kernel = env_path("KRR_TEST_KERNEL");
    let initrd = env_path("KRR_TEST_INITRD");
    let disk = test_disk();
    let original = std::fs::read(disk.path()).unwrap();

    let first = boot_once(&kernel, &initrd, disk.path(), 1);
    println!("{}", first.console);
    check_boot(&first, disk.path(), &original, 1);

    // Same inputs, same run: the devices add no nondeterminism.
    let second = boot_once(&kernel, &initrd, disk.path(), 1);
    assert_eq!(
        second.console, first.console,
        "console differs between runs"
    );
    assert_eq!(second.instructions, first.instructions);
    assert_eq!(second.injected, first.injected);
}

#[test]
#[ignore = "boots a real kernel on 2 vCPUs; needs KRR_TEST_KERNEL and KRR_TEST_INITRD"]
fn linux_smp_starts_the_ap_through_init_sipi() {
    let kernel = env_path("KRR_TEST_KERNEL");
    let initrd = env_path("KRR_TEST_INITRD");
    let disk = test_disk();
    let original = std::fs::read(disk.path()).unwrap();

    let outcome = boot_once(&kernel, &initrd, disk.path(), 2);
    println!("{}", outcome.console);
    check_boot(&outcome, disk.path(), &original, 2);
    assert!(outcome.console.contains("Processor #1"));
    assert!(outcome.bus.ipis > 0, "no IPI sent");
    assert!(outcome.bus.retired[1] > 0, "the AP never ran");
}
