// SPDX-License-Identifier: GPL-2.0-or-later
//! Boot benchmark: the software CPU against `qemu-system-x86_64 -accel tcg`,
//! booting the same kernel and initramfs with the same command line, side by
//! side in one run. The end point for both is the first console line that
//! `/init` prints (the first complete line after the kernel's
//! "Run /init as init process").

use crate::machine::{first_line_after, Backend, Machine, MachineConfig, RunEnd, INIT_MARKER};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct BootBenchConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub vcpus: usize,
    pub mem_bytes: u64,
    /// QEMU binary to compare against.
    pub qemu: PathBuf,
    /// QEMU machine type: `microvm,acpi=off` for the project's kernel (no
    /// PCI, no ACPI), `pc` for a distribution kernel.
    pub qemu_machine: String,
    /// Give up on either side after this long.
    pub timeout: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BootBench {
    pub vcpus: usize,
    /// Software CPU: wall seconds to the first line of /init.
    pub krr_wall_seconds: f64,
    /// Guest instructions retired by then (all vCPUs).
    pub krr_instructions_to_init: Option<u64>,
    pub krr_mips: f64,
    /// How the krr run ended (it runs the guest to its end).
    pub krr_end: RunEnd,
    /// QEMU TCG: wall seconds to the first line of /init.
    pub qemu_wall_seconds: f64,
    /// krr / QEMU (target: at most 2).
    pub ratio: f64,
    pub qemu_command: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Machine(#[from] crate::machine::MachineError),
    #[error("krr never printed a line from /init (run ended: {0:?})")]
    KrrNoInitLine(RunEnd),
    #[error("cannot start {qemu}: {source}")]
    QemuSpawn {
        qemu: PathBuf,
        source: std::io::Error,
    },
    #[error("QEMU printed no line from /init within {0:?}; last output: {1}")]
    QemuNoInitLine(Duration, String),
}

/// Boots with krr (software CPU), then with QEMU TCG, and compares.
pub fn boot_vs_qemu(cfg: &BootBenchConfig) -> Result<BootBench, BenchError> {
    let mut mc = MachineConfig::new(
        cfg.kernel.clone(),
        Some(cfg.initrd.clone()),
        cfg.cmdline.clone(),
    );
    mc.vcpus = cfg.vcpus;
    mc.mem_bytes = cfg.mem_bytes;
    let mut m = Machine::new(mc, Backend::Tcg)?;
    let r = m.run();
    let krr_wall = r
        .wall_seconds_to_first_init_line
        .ok_or_else(|| BenchError::KrrNoInitLine(r.end.clone()))?;
    let krr_instr = r.instructions_to_init;
    let krr_mips = r.mips;
    drop(m);

    let args: Vec<String> = vec![
        "-accel".into(),
        "tcg".into(),
        "-M".into(),
        cfg.qemu_machine.clone(),
        "-nodefaults".into(),
        "-no-reboot".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-smp".into(),
        cfg.vcpus.to_string(),
        "-m".into(),
        format!("{}M", cfg.mem_bytes >> 20),
        "-kernel".into(),
        cfg.kernel.display().to_string(),
        "-initrd".into(),
        cfg.initrd.display().to_string(),
        "-append".into(),
        cfg.cmdline.clone(),
    ];
    let qemu_command = format!("{} {}", cfg.qemu.display(), args.join(" "));
    let start = Instant::now();
    let mut child = Command::new(&cfg.qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| BenchError::QemuSpawn {
            qemu: cfg.qemu.clone(),
            source,
        })?;
    // A reader thread forwards QEMU's console output, so that a guest that
    // prints nothing cannot block the timeout; the clock stops at the first
    // /init line and QEMU is killed either way.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let mut qemu_wall = None;
    while let Some(left) = cfg.timeout.checked_sub(start.elapsed()) {
        match rx.recv_timeout(left) {
            Ok(chunk) => {
                out.extend_from_slice(&chunk);
                if first_line_after(&out, INIT_MARKER) {
                    qemu_wall = Some(start.elapsed().as_secs_f64());
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(rx);
    let _ = reader.join();
    let qemu_wall = qemu_wall.ok_or_else(|| {
        let text = String::from_utf8_lossy(&out);
        let tail: String = text.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        BenchError::QemuNoInitLine(cfg.timeout, tail)
    })?;
    Ok(BootBench {
        vcpus: cfg.vcpus,
        krr_wall_seconds: krr_wall,
        krr_instructions_to_init: krr_instr,
        krr_mips,
        krr_end: r.end,
        qemu_wall_seconds: qemu_wall,
        ratio: krr_wall / qemu_wall,
        qemu_command,
    })
}
