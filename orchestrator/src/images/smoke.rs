// SPDX-License-Identifier: GPL-2.0-or-later
//! Smoke boot under stock QEMU (TCG): boots a built kernel with its
//! initramfs or root filesystem and waits for `/init`'s end marker
//! `KRR-END status=<code>`.
//!
//! Machine: QEMU's `microvm` with ACPI off, which is what the engine's
//! machine model looks like: MP table (from qboot) for SMP, 8250 at 0x3f8,
//! i8259 + i8254 + IO-APIC, no PCI, and virtio-mmio devices that QEMU declares
//! on the kernel command line. (The `pc` machine's SeaBIOS lists only one CPU
//! in its MP table under TCG, and the base kernel has no PCI for its disks.)
//!
//! Ending the run: `/init` calls `reboot -f`. microvm ignores `-no-reboot`
//! for the i8042 reset, so the command line adds `reboot=t` (triple fault),
//! which `-no-reboot` turns into QEMU exiting.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::{ImageError, Result};

/// The line `/init` prints when the command finished.
pub const END_MARKER_PREFIX: &str = "KRR-END status=";

/// What to boot.
#[derive(Debug, Clone)]
pub struct SmokeBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// An ext4 image booted as the root device (`/dev/vda`), with `/init`.
    pub rootfs: Option<PathBuf>,
    /// Passed as `krr.run="..."`; `None` runs the image's baked-in command.
    /// Must not contain double quotes (the kernel command line cannot carry them).
    pub command: Option<String>,
    pub cpus: u32,
    pub memory_mib: u32,
    pub timeout: Duration,
}

impl SmokeBoot {
    /// A 2-vCPU, 512 MiB boot with a 10-minute limit.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        SmokeBoot {
            kernel: kernel.into(),
            initrd: None,
            rootfs: None,
            command: None,
            cpus: 2,
            memory_mib: 512,
            timeout: Duration::from_secs(600),
        }
    }
}

/// How the boot ended.
#[derive(Debug, Clone)]
pub struct SmokeResult {
    /// The command's exit status from the end marker.
    pub exit_status: i32,
    /// Everything QEMU printed on the serial console.
    pub console: String,
    pub seconds: f64,
}

/// Finds the exit status in the first `KRR-END status=N` line.
pub fn parse_end_marker(console: &str) -> Option<i32> {
    console.lines().find_map(|line| {
        let at = line.find(END_MARKER_PREFIX)?;
        let digits: String = line[at + END_MARKER_PREFIX.len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '-')
            .collect();
        digits.parse().ok()
    })
}

fn tail(console: &str, lines: usize) -> String {
    let all: Vec<&str> = console.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Boots under `qemu-system-x86_64 -accel tcg` and returns the end marker's
/// status. Fails, with the console's last lines, if QEMU exits without the
/// marker, does not exit after it (the reboot path did not end the VM), or
/// runs past the timeout.
pub fn smoke_boot_qemu(boot: &SmokeBoot) -> Result<SmokeResult> {
    for path in [
        Some(&boot.kernel),
        boot.initrd.as_ref(),
        boot.rootfs.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        if !path.is_file() {
            return Err(ImageError::SmokeBoot {
                detail: format!("{} does not exist", path.display()),
                console_tail: String::new(),
            });
        }
    }
    let mut append = vec![
        "console=ttyS0".to_string(),
        "panic=-1".to_string(),
        "reboot=t".to_string(),
    ];
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-display", "none", "-serial", "stdio"])
        .args(["-monitor", "none", "-no-reboot", "-nodefaults"])
        .args(["-M", "microvm,acpi=off,rtc=on,isa-serial=on"])
        .args(["-smp", &boot.cpus.to_string()])
        .args(["-m", &boot.memory_mib.to_string()])
        .arg("-kernel")
        .arg(&boot.kernel);
    if let Some(rootfs) = &boot.rootfs {
        cmd.arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=root,snapshot=on",
                rootfs.display()
            ))
            .args(["-device", "virtio-blk-device,drive=root"]);
        append.extend(["root=/dev/vda".into(), "rw".into(), "init=/init".into()]);
    }
    if let Some(initrd) = &boot.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    if let Some(command) = &boot.command {
        if command.contains('"') {
            return Err(ImageError::SmokeBoot {
                detail: format!(
                    "command {command:?} contains a double quote, which krr.run= cannot carry"
                ),
                console_tail: String::new(),
            });
        }
        append.push(format!("krr.run=\"{command}\""));
    }
    cmd.arg("-append").arg(append.join(" "));
    tracing::info!(?cmd, "smoke boot");

    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::MissingTool {
            program: "qemu-system-x86_64".into(),
            source,
        })?;
    let console = Arc::new(Mutex::new(String::new()));
    let mut readers = Vec::new();
    for mut stream in [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ] {
        let console = Arc::clone(&console);
        readers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                console
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }));
    }

    // Once the marker appears, the guest has this long to reset the machine.
    const EXIT_GRACE: Duration = Duration::from_secs(30);
    let mut marker_seen_at: Option<Instant> = None;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| ImageError::SmokeBoot {
            detail: format!("waiting for qemu: {e}"),
            console_tail: String::new(),
        })? {
            break Some(status);
        }
        if marker_seen_at.is_none() && parse_end_marker(&console.lock().unwrap()).is_some() {
            marker_seen_at = Some(Instant::now());
        }
        let overdue = started.elapsed() > boot.timeout
            || marker_seen_at.is_some_and(|t| t.elapsed() > EXIT_GRACE);
        if overdue {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for reader in readers {
        let _ = reader.join();
    }
    let console = std::mem::take(&mut *console.lock().unwrap());
    let seconds = started.elapsed().as_secs_f64();
    let marker = parse_end_marker(&console);
    match (status, marker) {
        (Some(_), Some(exit_status)) => Ok(SmokeResult {
            exit_status,
            console,
            seconds,
        }),
        (Some(status), None) => Err(ImageError::SmokeBoot {
            detail: format!("qemu exited ({status}) without printing the end marker"),
            console_tail: tail(&console, 40),
        }),
        (None, Some(_)) => Err(ImageError::SmokeBoot {
            detail: format!(
                "end marker printed, but the guest did not end the VM within {}s \
                 (reboot -f did not reset the machine)",
                EXIT_GRACE.as_secs()
            ),
            console_tail: tail(&console, 40),
        }),
        (None, None) => Err(ImageError::SmokeBoot {
            detail: format!(
                "no end marker within {}s; qemu killed",
                boot.timeout.as_secs()
            ),
            console_tail: tail(&console, 40),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_marker_is_found_among_kernel_noise() {
        let console = "[    1.0] random: crng init done\nops/s: 12.5\n\nKRR-END status=3\n[    2.0] reboot: Restarting system\n";
        assert_eq!(parse_end_marker(console), Some(3));
        assert_eq!(parse_end_marker("KRR-START\nno end\n"), None);
        assert_eq!(parse_end_marker("KRR-END status=\n"), None);
    }
}
