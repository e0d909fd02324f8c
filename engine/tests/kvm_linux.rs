// SPDX-License-Identifier: GPL-2.0-or-later
//! The machine model drives the KVM backend (`Backend::Kvm`).
//!
//! Fast tests run tiny guests written here as minimal bzImages (a boot
//! protocol 2.12 setup header and a few bytes of 64-bit code at the 64-bit
//! entry): they go through the machine's boot state, KVM_SET_CPUID2 from the
//! engine's CPUID, port exits to the platform, the serial console, HLT and
//! power-off. The Linux boot test is ignored by default: on PVM (guest ring
//! 0 emulated at about 1 M instructions/s) it takes many minutes.
//!
//! Without a usable `/dev/kvm` each test prints `SKIPPED: /dev/kvm absent`
//! and returns (fails under `KRR_TEST_REQUIRE_KVM`).

#[path = "common/guest_images.rs"]
mod guest_images;
#[path = "common/kvm_required.rs"]
mod kvm_required;

use kvm_required::kvm_usable;

use krr_engine::machine::{Backend, Machine, MachineConfig, RunEnd, RunReport};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A bzImage whose protected-mode part is `code`, placed so that the 64-bit
/// entry (0x200 past the load address) is its first byte.
fn tiny_bzimage(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    const SETUP_SECTS: u8 = 1;
    let mut img = vec![0u8; (usize::from(SETUP_SECTS) + 1) * 512];
    img[0x1f1] = SETUP_SECTS;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
    img[0x211] = 0x01; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    let mut kernel = vec![0x90u8; 0x200]; // 32-bit entry: unused
    kernel.extend_from_slice(code);
    img.extend_from_slice(&kernel);
    let path = dir.join(name);
    std::fs::write(&path, img).unwrap();
    path
}

/// 64-bit code that writes `text` to COM1.
fn print(text: &str) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text.bytes() {
        code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    code
}

fn run_tiny(name: &str, code: &[u8]) -> RunReport {
    let dir = std::env::temp_dir().join(format!("krr-kvm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = tiny_bzimage(&dir, name, code);
    let mut cfg = MachineConfig::new(kernel, None, String::new());
    cfg.mem_bytes = 64 << 20;
    cfg.max_wall = Some(Duration::from_secs(60));
    let mut m = Machine::new(cfg, Backend::Kvm).expect("KVM machine");
    let r = m.run();
    println!(
        "{name}: {:?} after {:.3} s wall; pio {} cpuid {}; console {:?}",
        r.end,
        r.wall_seconds,
        r.exits.pio,
        r.exits.cpuid,
        String::from_utf8_lossy(&r.console)
    );
    let _ = std::fs::remove_dir_all(&dir);
    r
}

#[test]
fn a_tiny_guest_prints_its_end_marker_and_powers_off() {
    if !kvm_usable() {
        return;
    }
    let text = "hello from KVM\nKRR-END status=3\n";
    let mut code = print(text);
    // mov dx, 0x501; out dx, al: the platform's power-off port.
    code.extend_from_slice(&[0x66, 0xba, 0x01, 0x05, 0xee]);
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp back
    let r = run_tiny("print", &code);
    assert_eq!(r.end, RunEnd::EndMarker { status: 3 });
    assert_eq!(r.guest_status, Some(3));
    assert_eq!(r.exit_status, krr_engine::machine::EXIT_GUEST_FAILED);
    assert_eq!(String::from_utf8_lossy(&r.console), text);
    // One port exit per byte, and the power-off write.
    assert_eq!(r.exits.pio, text.len() as u64 + 1);
    // KVM_SET_CPUID2 was loaded from the engine's CPUID.
    assert!(r.exits.cpuid > 0);
}

#[test]
fn a_tiny_guest_halting_with_interrupts_off_stops_the_machine() {
    if !kvm_usable() {
        return;
    }
    let mut code = print("halting\n");
    code.extend_from_slice(&[0xfa, 0xf4]); // cli; hlt
    let r = run_tiny("halt", &code);
    assert_eq!(r.end, RunEnd::PowerOff);
    assert_eq!(r.exits.hlt, 1);
    assert_eq!(String::from_utf8_lossy(&r.console), "halting\n");
}

#[test]
fn a_spinning_tiny_guest_is_stopped_by_the_wall_time_limit() {
    if !kvm_usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("krr-kvm-spin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // In user-visible terms: a kernel stuck in a loop without exits; the
    // slice timer must still get the engine control back.
    let kernel = tiny_bzimage(&dir, "spin", &[0xeb, 0xfe]); // jmp $
    let mut cfg = MachineConfig::new(kernel, None, String::new());
    cfg.mem_bytes = 64 << 20;
    cfg.max_wall = Some(Duration::from_millis(500));
    let r = Machine::new(cfg, Backend::Kvm).expect("KVM machine").run();
    let _ = std::fs::remove_dir_all(&dir);
    println!("spin: {:?} after {:.3} s wall", r.end, r.wall_seconds);
    assert_eq!(r.end, RunEnd::WallTimeExhausted { millis: 500 });
    assert!(r.wall_seconds >= 0.5);
}

#[test]
#[ignore = "boots Linux on /dev/kvm: minutes on PVM"]
fn linux_boots_to_its_end_marker_on_kvm() {
    if !kvm_usable() {
        return;
    }
    let Some((kernel, initrd)) = guest_images::guest_images("KRR_TEST_KERNEL") else {
        return;
    };
    let mut cfg = MachineConfig::new(
        kernel,
        Some(initrd),
        r#"console=ttyS0 earlyprintk=serial,ttyS0 acpi=off panic=-1 reboot=t krr.run="echo kvm-boot-ok""#
            .into(),
    );
    cfg.max_wall = Some(Duration::from_secs(1800));
    let r = Machine::new(cfg, Backend::Kvm).expect("KVM machine").run();
    let console = String::from_utf8_lossy(&r.console).into_owned();
    println!(
        "{:?} after {:.1} s wall; /init at {:?} s\n{}",
        r.end, r.wall_seconds, r.wall_seconds_to_init, console
    );
    assert_eq!(r.end, RunEnd::EndMarker { status: 0 }, "{console}");
    assert!(console.contains("kvm-boot-ok"), "{console}");
}
