// SPDX-License-Identifier: GPL-2.0-or-later
//! The machine runs the project's Linux 6.1 guest on the software CPU:
//! boot to the initramfs's end marker with 1 and 2 vCPUs, identically twice;
//! read from the virtio block device; report a panic with its line; stop a
//! guest that spins forever with the instruction budget; report the guest's
//! exit status apart from the engine's own codes.
//!
//! Images: see `common/guest_images.rs`.

#[path = "common/guest_images.rs"]
mod guest_images;

use krr_engine::machine::{Backend, Machine, MachineConfig, RunEnd, RunReport};
use std::io::Write;
use std::path::PathBuf;

const BASE_CMDLINE: &str = "console=ttyS0 acpi=off tsc=reliable mitigations=off panic=-1";

fn images() -> Option<(PathBuf, PathBuf)> {
    guest_images::guest_images("KRR_TEST_KERNEL")
}

fn boot(cmdline: &str, vcpus: usize, disk: Option<PathBuf>, max: u64) -> Option<RunReport> {
    boot_with(cmdline, vcpus, disk, max, None)
}

fn boot_with(
    cmdline: &str,
    vcpus: usize,
    disk: Option<PathBuf>,
    max: u64,
    chaos_seed: Option<u64>,
) -> Option<RunReport> {
    let (kernel, initrd) = images()?;
    let mut cfg = MachineConfig::new(kernel, Some(initrd), format!("{BASE_CMDLINE} {cmdline}"));
    cfg.vcpus = vcpus;
    cfg.chaos_seed = chaos_seed;
    cfg.disk = disk;
    cfg.max_instructions = max;
    let mut m = Machine::new(cfg, Backend::Tcg).expect("machine");
    let r = m.run();
    println!(
        "{vcpus} vCPU(s): {:?}, {} instructions {:?}, {:.2} s wall, console {}",
        r.end, r.instructions, r.instructions_per_vcpu, r.wall_seconds, r.console_sha256
    );
    Some(r)
}

fn console(r: &RunReport) -> String {
    String::from_utf8_lossy(&r.console).into_owned()
}

fn boots_twice_identically(vcpus: usize) {
    let cmd = r#"krr.run="echo cpus=$(nproc)""#;
    let Some(first) = boot(cmd, vcpus, None, 5_000_000_000) else {
        return;
    };
    assert_eq!(
        first.end,
        RunEnd::EndMarker { status: 0 },
        "{}",
        console(&first)
    );
    assert!(console(&first).contains(&format!("cpus={vcpus}")));
    assert!(first.instructions_to_init.is_some());
    assert!(first.device_errors.is_empty(), "{:?}", first.device_errors);
    let second = boot(cmd, vcpus, None, 5_000_000_000).unwrap();
    assert_eq!(second.instructions, first.instructions);
    assert_eq!(second.instructions_per_vcpu, first.instructions_per_vcpu);
    assert_eq!(second.console_sha256, first.console_sha256);
    assert_eq!(second.console, first.console);
}

#[test]
fn boots_to_end_marker_twice_identically_1_vcpu() {
    boots_twice_identically(1);
}

#[test]
fn boots_to_end_marker_twice_identically_2_vcpus() {
    boots_twice_identically(2);
}

/// Chaos mode: one seed gives one run (the same instructions on each vCPU
/// and the same console); another seed schedules the vCPUs differently.
#[test]
fn a_chaos_seed_gives_one_schedule_and_another_seed_another() {
    let cmd = r#"krr.run="echo cpus=$(nproc)""#;
    let run = |seed| boot_with(cmd, 2, None, 20_000_000_000, Some(seed));
    let Some(first) = run(1) else {
        return;
    };
    assert_eq!(
        first.end,
        RunEnd::EndMarker { status: 0 },
        "{}",
        console(&first)
    );
    assert!(console(&first).contains("cpus=2"));
    assert_eq!(first.chaos_seed, Some(1));
    let again = run(1).unwrap();
    assert_eq!(again.instructions_per_vcpu, first.instructions_per_vcpu);
    assert_eq!(again.console, first.console);
    let other = run(2).unwrap();
    assert_eq!(
        other.end,
        RunEnd::EndMarker { status: 0 },
        "{}",
        console(&other)
    );
    assert_ne!(
        other.instructions_per_vcpu, first.instructions_per_vcpu,
        "seeds 1 and 2 scheduled the vCPUs alike"
    );
}

#[test]
fn reads_a_file_from_the_virtio_block_device() {
    let mut disk = tempfile::NamedTempFile::new().unwrap();
    let mut image = vec![0u8; 1 << 20];
    image[..20].copy_from_slice(b"krr-virtio-blk-data\n");
    disk.write_all(&image).unwrap();
    disk.flush().unwrap();
    let cmd = r#"krr.run="head -c 20 /dev/vda; echo x > /dev/vda; sync""#;
    let Some(r) = boot(cmd, 1, Some(disk.path().to_path_buf()), 5_000_000_000) else {
        return;
    };
    assert_eq!(r.end, RunEnd::EndMarker { status: 0 }, "{}", console(&r));
    assert!(
        console(&r).contains("krr-virtio-blk-data"),
        "{}",
        console(&r)
    );
    // The guest's write went to the overlay; the image is untouched.
    assert_eq!(std::fs::read(disk.path()).unwrap(), image);
}

#[test]
fn a_panicking_guest_is_reported_with_the_panic_line() {
    let Some(r) = boot(
        "rdinit=/does-not-exist root=/dev/nothing",
        1,
        None,
        5_000_000_000,
    ) else {
        return;
    };
    match &r.end {
        RunEnd::Panic { line } => {
            assert!(line.starts_with("Kernel panic - not syncing"), "{line}");
            assert!(console(&r).contains(line.as_str()));
        }
        other => panic!("expected a panic, got {other:?}\n{}", console(&r)),
    }
    assert_eq!(r.exit_status, 4);
}

#[test]
fn a_guest_that_spins_forever_is_stopped_by_the_budget() {
    let max = 600_000_000;
    let Some(r) = boot(r#"krr.run="while :; do :; done""#, 1, None, max) else {
        return;
    };
    match r.end {
        RunEnd::BudgetExhausted { instructions } => assert!(instructions >= max),
        ref other => panic!("expected the budget to stop the run, got {other:?}"),
    }
    assert!(
        r.instructions >= max && r.instructions < max + 1_000,
        "{}",
        r.instructions
    );
    assert!(console(&r).contains("Run /init"));
}

#[test]
fn the_guest_status_is_reported_apart_from_the_engine_codes() {
    // Status 4 is also the engine's code for a kernel panic.
    let Some(r) = boot(r#"krr.run="exit 4""#, 1, None, 5_000_000_000) else {
        return;
    };
    assert_eq!(r.end, RunEnd::EndMarker { status: 4 }, "{}", console(&r));
    assert_eq!(r.guest_status, Some(4));
    assert_eq!(r.exit_status, krr_engine::machine::EXIT_GUEST_FAILED);
}
