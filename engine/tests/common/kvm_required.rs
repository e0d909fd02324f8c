// SPDX-License-Identifier: GPL-2.0-or-later
//! Skipping the KVM half of a test, unless KVM is required.
//!
//! Without a usable `/dev/kvm`, or where this host's KVM cannot do what a
//! test needs (PVM's ring-0 emulation, no PMU), a test prints `SKIPPED:
//! <reason>` and checks what it can without KVM. With `KRR_TEST_REQUIRE_KVM`
//! set (`cargo xtask hw-acceptance` sets it on a VT-x/AMD-V host), every
//! such skip fails the test instead, so an acceptance run can never pass by
//! skipping.

/// Skips (prints why) or, under `KRR_TEST_REQUIRE_KVM`, fails the test.
pub fn skip_kvm(reason: &str) {
    if std::env::var_os("KRR_TEST_REQUIRE_KVM").is_some() {
        panic!("KVM required (KRR_TEST_REQUIRE_KVM is set): {reason}");
    }
    println!("SKIPPED: {reason}");
}

/// Whether `/dev/kvm` is usable; where it is not, the test's KVM half is
/// skipped through [`skip_kvm`].
#[allow(dead_code)] // not every test binary uses it
pub fn kvm_usable() -> bool {
    let a = krr_engine::hypervisor::kvm::detect();
    if !a.usable() {
        skip_kvm(&format!("/dev/kvm absent ({})", a.reason()));
    }
    a.usable()
}
