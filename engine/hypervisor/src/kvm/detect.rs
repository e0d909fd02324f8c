// SPDX-License-Identifier: GPL-2.0-or-later
//! Is `/dev/kvm` here, and is it hardware-backed?
//!
//! `/dev/kvm` can be served by a software hypervisor: PVM (the
//! "Pagetable-based Virtual Machine" KVM module, `kvm_pvm`) runs guest ring 3
//! natively but emulates guest ring 0, about a thousand times slower than
//! VT-x/AMD-V, and has no PMU. Its KVM API answers like a hardware one (same
//! capabilities), so the API alone cannot tell. The signals used, most
//! reliable first:
//! 1. Which KVM vendor module is loaded (`/sys/module/kvm_intel`,
//!    `/sys/module/kvm_amd`: hardware; `/sys/module/kvm_pvm`: PVM). Modules
//!    built into the kernel appear there too, since both have parameters.
//! 2. The host CPU flags in `/proc/cpuinfo`: without `vmx` or `svm` there is
//!    no hardware virtualization to back KVM.
//!
//! A PVM module next to a hardware one is treated as not hardware-backed:
//! `auto` must never pick KVM when it may be the slow path; the software CPU
//! always works.

use crate::Backend;
use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;

use super::pmu::{pmu_available, CountedEvent};

/// What `/dev/kvm` is on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmAvailability {
    /// VT-x or AMD-V behind KVM.
    HardwareBacked {
        vendor: &'static str,
        module: &'static str,
    },
    /// `/dev/kvm` works but is a software hypervisor (PVM).
    SoftwareHypervisor { reason: String },
    /// No usable `/dev/kvm`.
    Absent { reason: String },
}

impl KvmAvailability {
    /// One line for logs and `krr run --backend auto`.
    pub fn reason(&self) -> String {
        match self {
            Self::HardwareBacked { vendor, module } => {
                format!("/dev/kvm is hardware-backed ({vendor}, module {module})")
            }
            Self::SoftwareHypervisor { reason } | Self::Absent { reason } => reason.clone(),
        }
    }

    pub fn usable(&self) -> bool {
        !matches!(self, Self::Absent { .. })
    }

    /// The verdict's stable name, for tools that read `krr backend --json`.
    pub fn verdict(&self) -> &'static str {
        match self {
            Self::HardwareBacked { .. } => "hardware",
            Self::SoftwareHypervisor { .. } => "software-hypervisor",
            Self::Absent { .. } => "absent",
        }
    }
}

impl fmt::Display for KvmAvailability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason())
    }
}

/// What the host shows, gathered separately so the decision is testable.
#[derive(Debug, Clone)]
pub(crate) struct HostFacts {
    pub dev_kvm: Result<(), String>,
    pub kvm_intel: bool,
    pub kvm_amd: bool,
    pub kvm_pvm: bool,
    pub cpu_vmx: bool,
    pub cpu_svm: bool,
}

impl Default for HostFacts {
    fn default() -> Self {
        Self {
            dev_kvm: Err("/dev/kvm not probed".into()),
            kvm_intel: false,
            kvm_amd: false,
            kvm_pvm: false,
            cpu_vmx: false,
            cpu_svm: false,
        }
    }
}

impl HostFacts {
    fn gather() -> Self {
        let dev_kvm = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(|_| ())
            .map_err(|e| format!("/dev/kvm cannot be opened: {e}"));
        let cpu_flags = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("flags"))
                    .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            })
            .unwrap_or_default();
        let module = |m: &str| Path::new("/sys/module").join(m).exists();
        Self {
            dev_kvm,
            kvm_intel: module("kvm_intel"),
            kvm_amd: module("kvm_amd"),
            kvm_pvm: module("kvm_pvm"),
            cpu_vmx: cpu_flags.iter().any(|f| f == "vmx"),
            cpu_svm: cpu_flags.iter().any(|f| f == "svm"),
        }
    }

    pub(crate) fn classify(&self) -> KvmAvailability {
        if let Err(reason) = &self.dev_kvm {
            return KvmAvailability::Absent {
                reason: reason.clone(),
            };
        }
        if self.kvm_pvm {
            return KvmAvailability::SoftwareHypervisor {
                reason: "/dev/kvm is PVM (module kvm_pvm loaded): guest ring 0 is emulated in software and there is no PMU"
                    .into(),
            };
        }
        match (self.kvm_intel && self.cpu_vmx, self.kvm_amd && self.cpu_svm) {
            (true, _) => KvmAvailability::HardwareBacked {
                vendor: "Intel VT-x",
                module: "kvm_intel",
            },
            (_, true) => KvmAvailability::HardwareBacked {
                vendor: "AMD-V",
                module: "kvm_amd",
            },
            _ => KvmAvailability::SoftwareHypervisor {
                reason: format!(
                    "/dev/kvm has no hardware vendor module behind it (kvm_intel: {}, kvm_amd: {}, cpu vmx: {}, svm: {})",
                    self.kvm_intel, self.kvm_amd, self.cpu_vmx, self.cpu_svm
                ),
            },
        }
    }
}

/// Classifies this host's `/dev/kvm`.
pub fn detect() -> KvmAvailability {
    HostFacts::gather().classify()
}

/// How the KVM backend positions asynchronous events (interrupts, the
/// recorder's stops) in the guest's execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncEventMode {
    /// A guest-only PMU counter gives each event a (count, RIP) position; any
    /// point of execution can take an interrupt, replay stops there exactly.
    PmuCounted(CountedEvent),
    /// No PMU: interrupts are delivered only at points that replay finds
    /// without counting: right after a port/MMIO access or HLT, at the first
    /// interrupt window after one of those, or while the guest runs in user
    /// mode (which the kernel recording does not replay).
    DeterministicPoints,
}

impl AsyncEventMode {
    pub fn detect() -> Self {
        if pmu_available() {
            Self::PmuCounted(CountedEvent::for_host())
        } else {
            Self::DeterministicPoints
        }
    }

    /// The mode's stable name, for tools that read `krr backend --json`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::PmuCounted(_) => "pmu-counted",
            Self::DeterministicPoints => "deterministic-points",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::PmuCounted(e) => format!("async events positioned by guest PMU counter ({e:?}), stopped by overflow then single-step"),
            Self::DeterministicPoints => {
                "no PMU: async events delivered only after port/MMIO/HLT exits or while the guest is in user mode".into()
            }
        }
    }
}

/// The outcome of `--backend`: which backend, and the one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChoice {
    pub backend: Backend,
    pub reason: String,
}

/// Resolves `--backend kvm|tcg|auto`. `auto` picks KVM only when it is
/// hardware-backed; `kvm` is honoured on PVM too (with the reason saying it
/// will be slow), and refused where `/dev/kvm` is absent.
pub fn select_backend(requested: &str) -> Result<BackendChoice, String> {
    select_with(requested, &detect())
}

pub(crate) fn select_with(requested: &str, kvm: &KvmAvailability) -> Result<BackendChoice, String> {
    match requested {
        "tcg" | "software" => Ok(BackendChoice {
            backend: Backend::Tcg,
            reason: "software CPU requested".into(),
        }),
        "kvm" => match kvm {
            KvmAvailability::Absent { reason } => Err(format!("--backend kvm: {reason}")),
            KvmAvailability::SoftwareHypervisor { reason } => Ok(BackendChoice {
                backend: Backend::Kvm,
                reason: format!("KVM requested; note: {reason}, so guest kernel code runs slowly"),
            }),
            hw => Ok(BackendChoice {
                backend: Backend::Kvm,
                reason: format!("KVM requested; {}", hw.reason()),
            }),
        },
        "auto" => Ok(match kvm {
            KvmAvailability::HardwareBacked { .. } => BackendChoice {
                backend: Backend::Kvm,
                reason: format!("auto: KVM, {}", kvm.reason()),
            },
            other => BackendChoice {
                backend: Backend::Tcg,
                reason: format!("auto: software CPU, {}", other.reason()),
            },
        }),
        other => Err(format!(
            "--backend {other:?}: expected one of kvm, tcg, auto"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            dev_kvm: Ok(()),
            ..HostFacts::default()
        }
    }

    #[test]
    fn pvm_is_not_hardware_backed_even_next_to_kvm_intel() {
        let f = HostFacts {
            kvm_pvm: true,
            kvm_intel: true,
            cpu_vmx: true,
            ..facts()
        };
        assert!(matches!(
            f.classify(),
            KvmAvailability::SoftwareHypervisor { .. }
        ));
    }

    #[test]
    fn vendor_module_with_cpu_flag_is_hardware() {
        let f = HostFacts {
            kvm_intel: true,
            cpu_vmx: true,
            ..facts()
        };
        assert_eq!(
            f.classify(),
            KvmAvailability::HardwareBacked {
                vendor: "Intel VT-x",
                module: "kvm_intel"
            }
        );
        let f = HostFacts {
            kvm_amd: true,
            cpu_svm: true,
            ..facts()
        };
        assert!(matches!(
            f.classify(),
            KvmAvailability::HardwareBacked {
                module: "kvm_amd",
                ..
            }
        ));
        // A vendor module without the CPU flag (nested, flag hidden) is not
        // trusted to be fast.
        let f = HostFacts {
            kvm_intel: true,
            ..facts()
        };
        assert!(matches!(
            f.classify(),
            KvmAvailability::SoftwareHypervisor { .. }
        ));
    }

    #[test]
    fn absent_dev_kvm_says_why() {
        let f = HostFacts {
            dev_kvm: Err("/dev/kvm cannot be opened: No such file or directory".into()),
            ..HostFacts::default()
        };
        let a = f.classify();
        assert!(!a.usable());
        assert!(a.reason().contains("No such file"));
    }

    #[test]
    fn auto_picks_software_on_pvm_and_kvm_on_hardware() {
        let pvm = KvmAvailability::SoftwareHypervisor {
            reason: "PVM".into(),
        };
        let c = select_with("auto", &pvm).unwrap();
        assert_eq!(c.backend, Backend::Tcg);
        assert_eq!(c.reason, "auto: software CPU, PVM");
        let hw = KvmAvailability::HardwareBacked {
            vendor: "AMD-V",
            module: "kvm_amd",
        };
        assert_eq!(select_with("auto", &hw).unwrap().backend, Backend::Kvm);
        assert_eq!(select_with("kvm", &pvm).unwrap().backend, Backend::Kvm);
        let absent = KvmAvailability::Absent {
            reason: "gone".into(),
        };
        assert_eq!(
            select_with("kvm", &absent).unwrap_err(),
            "--backend kvm: gone"
        );
        assert_eq!(select_with("auto", &absent).unwrap().backend, Backend::Tcg);
        assert!(select_with("qemu", &hw)
            .unwrap_err()
            .contains("expected one of kvm, tcg, auto"));
    }

    #[test]
    fn this_host_is_classified() {
        // Whatever the host, detect() answers with a reason; on this
        // project's PVM machine it must not claim hardware.
        let a = detect();
        eprintln!("detect(): {a}");
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert!(matches!(
                a,
                KvmAvailability::SoftwareHypervisor { .. } | KvmAvailability::Absent { .. }
            ));
        }
        assert!(!a.reason().is_empty());
    }
}
