// SPDX-License-Identifier: GPL-2.0-or-later
//! Kernel crash reports found on a console, reduced to stable titles in the
//! manner of syzkaller's `pkg/report`: "KASAN: use-after-free Read in
//! foo", "WARNING in foo", "general protection fault in foo", "kernel
//! panic: msg". A title names the kind of failure and the function it
//! happened in, without addresses, offsets or PIDs, so the same bug gives
//! the same title on every run, and a replay can be checked against its
//! recording by title, faulting function and call trace.

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;

/// The first crash report of a console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashReport {
    pub title: String,
    /// Where the kernel faulted, `func+0x12/0x40` (the report's kernel
    /// `RIP:` line), when it printed one.
    pub rip: Option<String>,
    /// Function names of the report's call trace, innermost first, without
    /// the frames the unwinder was unsure of (`? func`).
    pub call_trace: Vec<String>,
    /// The report's console lines, from its first line on, without the
    /// kernel's timestamps.
    pub report: Vec<String>,
}

/// Lines kept after a report's first line.
const REPORT_LINES: usize = 120;

/// The kernel's `[    1.234567] ` prefix (and a `[T123]` caller id).
static TIMESTAMP: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\[\s*\d+\.\d+\]\s?(\[\s*[CT]\d+\]\s?)?").expect("valid"));

/// A report's first line, by kind; the first match in the console wins.
static STARTS: LazyLock<Vec<(Kind, Regex)>> = LazyLock::new(|| {
    [
        (Kind::Kasan, r"BUG: KASAN: (.+?) in (\S+)"),
        (
            Kind::Deadlock,
            r"WARNING: possible (recursive locking|circular locking dependency) detected",
        ),
        (Kind::Warning, r"WARNING: CPU: \d+ PID: \d+ at (\S+) (\S+)"),
        (Kind::GeneralProtection, r"general protection fault"),
        (Kind::NullDeref, r"BUG: kernel NULL pointer dereference"),
        (
            Kind::PagingRequest,
            r"BUG: unable to handle page fault for address",
        ),
        (Kind::KernelBug, r"kernel BUG at (\S+?)!?$"),
        (
            Kind::SoftLockup,
            r"watchdog: BUG: soft lockup - CPU#\d+ stuck",
        ),
        (
            Kind::TaskHung,
            r"INFO: task \S+ blocked for more than \d+ seconds",
        ),
        (Kind::Panic, r"Kernel panic - not syncing: (.*)$"),
    ]
    .into_iter()
    .map(|(kind, re)| (kind, Regex::new(re).expect("valid")))
    .collect()
});

static RIP: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"RIP: 0010:(\S+)").expect("valid"));
static ACCESS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(Read|Write) of size \d+").expect("valid"));
/// Lockdep's "... at: func+0x../0x.." line of the lock being acquired.
static LOCK_AT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r", at: (\S+)").expect("valid"));
/// A call-trace frame: `func+0x1a/0x30 [file:line]`, or an inlined one,
/// `func file.h:12 [inline]`; `? func` is a frame the unwinder was unsure
/// of.
static FRAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(\? )?([A-Za-z0-9_.]+)(\+0x[0-9a-f]+/0x[0-9a-f]+| \S+:\d+ \[inline\])")
        .expect("valid")
});

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kasan,
    Deadlock,
    Warning,
    GeneralProtection,
    NullDeref,
    PagingRequest,
    KernelBug,
    SoftLockup,
    TaskHung,
    Panic,
}

/// `func+0x12/0x40` or `func.cold+0x3` -> `func`.
fn function(symbol: &str) -> String {
    let name = symbol.split('+').next().unwrap_or(symbol);
    name.split('.').next().unwrap_or(name).to_string()
}

/// The function as a title names it: a syscall's entry points name the
/// syscall (`__se_sys_memfd_secret`, `ksys_write`: `memfd_secret`,
/// `write`).
fn title_function(func: &str) -> String {
    const SYSCALL_PREFIXES: &[&str] = &[
        "__x64_sys_",
        "__ia32_sys_",
        "__se_sys_",
        "__do_sys_",
        "__sys_",
        "ksys_",
        "sys_",
    ];
    SYSCALL_PREFIXES
        .iter()
        .find_map(|p| func.strip_prefix(p))
        .unwrap_or(func)
        .to_string()
}

/// Frames that name the reporting machinery, allocators' free paths,
/// string helpers or the scheduler rather than the code at fault;
/// syzkaller skips the same kind of frames when it picks a title's
/// function.
fn is_infrastructure(func: &str) -> bool {
    // Compared without leading underscores: `__kmem_cache_free` is
    // `kmem_cache_free`'s helper, `____kasan_slab_free` KASAN's.
    const PREFIXES: &[&str] = &[
        "dump_stack",
        "print_report",
        "print_address_description",
        "kasan_",
        "asan_",
        "check_memory_region",
        "check_region",
        "panic",
        "warn",
        "report_bug",
        "handle_bug",
        "exc_",
        "asm_exc_",
        "assertfail",
        "kfree",
        "vfree",
        "vunmap",
        "kmem_cache_",
        "kmalloc",
        "slab_",
        "lock_acquire",
        "raw_spin_",
        "do_raw_spin_",
        "spin_lock",
        "mutex_",
        "refcount_",
        "kref_",
        "ref_tracker",
        "wake_up",
        "klist_",
        "list_add",
        "list_del",
        "kobject_",
        "memcpy",
        "memmove",
        "memset",
        "memcmp",
        "memchr",
        "strcpy",
        "strncpy",
        "strscpy",
        "strlen",
        "strnlen",
        "strcmp",
        "strncmp",
        "strchr",
        "copy_from_user",
        "copy_to_user",
        "read_once",
    ];
    let func = func.trim_start_matches('_');
    PREFIXES.iter().any(|p| func.starts_with(p))
}

/// Frames a hung task waits in rather than the code that made it wait.
fn is_waiting(func: &str) -> bool {
    const WORDS: &[&str] = &[
        "sched",
        "context_switch",
        "_lock",
        "down",
        "rwsem",
        "completion",
        "wait",
        "kthread",
        "synchronize",
        "rcu_barrier",
        "sleep",
    ];
    is_infrastructure(func) || WORDS.iter().any(|w| func.contains(w))
}

/// Frames where a stalled CPU's work was entered from: a soft lockup's
/// culprit is the frame just before the first of these.
fn is_stall_anchor(func: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "__fput",
        "task_work_run",
        "do_syscall_",
        "syscall_exit",
        "exit_to_user_mode",
        "process_one_work",
        "worker_thread",
        "kthread",
        "vfs_write",
        "vfs_read",
        "vfs_ioctl",
        "do_vfs_ioctl",
        "ioctl",
        "sock_ioctl",
        "__do_softirq",
        "run_timer_softirq",
        "call_timer_fn",
    ];
    PREFIXES.iter().any(|p| func.starts_with(p))
}

/// The first function of `trace` that is not infrastructure.
fn first_culprit(trace: &[String]) -> Option<&str> {
    trace
        .iter()
        .map(String::as_str)
        .find(|f| !is_infrastructure(f))
}

/// The first call trace in `lines`: its frames up to `</TASK>` or the first
/// line that is not a frame.
fn call_trace(lines: &[String]) -> Vec<String> {
    let Some(start) = lines.iter().position(|l| l.trim() == "Call Trace:") else {
        return Vec::new();
    };
    let mut frames = Vec::new();
    for line in &lines[start + 1..] {
        let line = line.trim();
        match line {
            "<TASK>" | "<IRQ>" | "</IRQ>" | "<NMI>" | "</NMI>" | "<SOFTIRQ>" | "</SOFTIRQ>" => {
                continue
            }
            "</TASK>" => break,
            _ => {}
        }
        match FRAME.captures(line) {
            Some(c) if c.get(1).is_some() => {}
            Some(c) => frames.push(function(&c[2])),
            None => break,
        }
    }
    frames
}

/// The first crash report in `console`, if there is one.
pub fn parse(console: &str) -> Option<CrashReport> {
    let lines: Vec<String> = console
        .lines()
        .map(|l| TIMESTAMP.replace(l.trim_end_matches('\r'), "").to_string())
        .collect();
    let (start, kind, caps) = lines.iter().enumerate().find_map(|(i, line)| {
        STARTS.iter().find_map(|(kind, re)| {
            re.captures(line).map(|c| {
                let caps: Vec<String> = c
                    .iter()
                    .map(|m| m.map(|m| m.as_str().to_string()).unwrap_or_default())
                    .collect();
                (i, *kind, caps)
            })
        })
    })?;
    let report: Vec<String> = lines[start..].iter().take(REPORT_LINES).cloned().collect();
    let rip = report
        .iter()
        .find_map(|l| RIP.captures(l).map(|c| c[1].to_string()));
    let trace = call_trace(&report);
    let rip_func = rip.as_deref().map(function);
    let culprit = first_culprit(&trace).map(str::to_string);
    // The function a title names: where the kernel faulted, else the
    // first frame of the trace that is not reporting machinery.
    let at = |preferred: Option<String>| {
        let func = preferred
            .filter(|f| !is_infrastructure(f))
            .or_else(|| culprit.clone())
            .or(rip_func.clone())
            .unwrap_or_else(|| "unknown".into());
        title_function(&func)
    };
    let title = match kind {
        Kind::Kasan if caps[1].contains("double-free") || caps[1].contains("invalid-free") => {
            format!("KASAN: invalid-free in {}", at(Some(function(&caps[2]))))
        }
        Kind::Kasan => {
            let access = report
                .iter()
                .find_map(|l| ACCESS.captures(l).map(|c| c[1].to_string()));
            let func = at(Some(function(&caps[2])));
            match access {
                Some(a) => format!("KASAN: {} {a} in {func}", caps[1]),
                None => format!("KASAN: {} in {func}", caps[1]),
            }
        }
        Kind::Deadlock => {
            let lock_at = report
                .iter()
                .find_map(|l| LOCK_AT.captures(l).map(|c| function(&c[1])));
            format!("possible deadlock in {}", at(lock_at))
        }
        Kind::Warning
            if caps[1].starts_with("lib/refcount.c")
                || function(&caps[2]).starts_with("refcount_warn_saturate") =>
        {
            format!("WARNING: refcount bug in {}", at(None))
        }
        Kind::Warning => format!("WARNING in {}", at(Some(function(&caps[2])))),
        Kind::GeneralProtection => format!("general protection fault in {}", at(rip_func.clone())),
        Kind::NullDeref => format!(
            "BUG: unable to handle kernel NULL pointer dereference in {}",
            at(rip_func.clone())
        ),
        Kind::PagingRequest => format!(
            "BUG: unable to handle kernel paging request in {}",
            at(rip_func.clone())
        ),
        Kind::KernelBug if rip_func.is_some() || !trace.is_empty() => {
            format!("kernel BUG in {}", at(rip_func.clone()))
        }
        Kind::KernelBug => format!("kernel BUG at {}", caps[1]),
        Kind::SoftLockup => {
            // The work that stalled: the last frame before the CPU's entry
            // into it (a syscall's file release, a work item, ...).
            let entered = trace
                .iter()
                .position(|f| is_stall_anchor(f))
                .unwrap_or(trace.len());
            let culprit = trace[..entered]
                .iter()
                .rev()
                .find(|f| !is_infrastructure(f))
                .cloned();
            format!(
                "BUG: soft lockup in {}",
                culprit.map_or_else(|| at(rip_func.clone()), |f| title_function(&f))
            )
        }
        Kind::TaskHung => {
            let culprit = trace
                .iter()
                .find(|f| f.starts_with("rtnl_lock"))
                .or_else(|| trace.iter().find(|f| !is_waiting(f)))
                .cloned();
            format!(
                "INFO: task hung in {}",
                culprit.map_or_else(|| at(None), |f| title_function(&f))
            )
        }
        Kind::Panic => format!("kernel panic: {}", caps[1].trim()),
    };
    Some(CrashReport {
        title,
        rip,
        call_trace: trace,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine's own console (software CPU, Linux 6.1.192 with the
    /// guest agent, `echo c > /proc/sysrq-trigger` from the initramfs).
    const SYSRQ: &str = "\
[    0.059736] Run /init as init process
KRR-START
[    0.153344] sysrq: Trigger a crash
[    0.153349] Kernel panic - not syncing: sysrq triggered crash
[    0.153355] CPU: 0 PID: 49 Comm: sh Not tainted 6.1.192 #1 
[    0.153365] Call Trace:
[    0.153370]  <TASK>
[    0.153374]  dump_stack_lvl+0x33/0x42
[    0.153387]  panic+0xf9/0x25d
[    0.153398]  sysrq_handle_crash+0xc/0x10
[    0.153407]  __handle_sysrq.cold+0x3f/0x10b
[    0.153417]  write_sysrq_trigger+0x36/0x70
[    0.153428]  proc_reg_write+0x4a/0x90
[    0.153438]  vfs_write+0xa0/0x330
[    0.153450]  ksys_write+0x56/0xd0
[    0.153461]  do_syscall_64+0x4c/0xc0
[    0.153474]  entry_SYSCALL_64_after_hwframe+0x4b/0xb5
[    0.153485] RIP: 0033:0x47b7a0
";

    #[test]
    fn a_forced_panic_is_titled_by_its_message() {
        let r = parse(SYSRQ).expect("a report");
        assert_eq!(r.title, "kernel panic: sysrq triggered crash");
        assert_eq!(r.rip, None, "a user-mode RIP is not the fault");
        assert_eq!(
            r.call_trace[..4],
            [
                "dump_stack_lvl",
                "panic",
                "sysrq_handle_crash",
                "__handle_sysrq"
            ]
        );
        assert_eq!(r.call_trace[7], "ksys_write", "traces keep the real names");
        assert_eq!(
            r.report[0],
            "Kernel panic - not syncing: sysrq triggered crash"
        );
    }

    /// Real console logs (syzkaller's test data, syzbot reports; sources in
    /// testdata/README.md), each with the title syzkaller gives it.
    #[test]
    fn real_reports_get_syzkaller_titles() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        names.sort();
        assert!(names.len() >= 13, "{} fixtures", names.len());
        let mut wrong = Vec::new();
        for txt in &names {
            let console = String::from_utf8_lossy(&std::fs::read(txt).unwrap()).to_string();
            let want = std::fs::read_to_string(txt.with_extension("title")).unwrap();
            let got = parse(&console).map(|r| r.title);
            if got.as_deref() != Some(want.trim()) {
                wrong.push(format!(
                    "{}: got {got:?}, want {:?}",
                    txt.file_name().unwrap().to_string_lossy(),
                    want.trim()
                ));
            }
        }
        assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    }

    #[test]
    fn no_report_in_a_clean_console() {
        assert_eq!(
            parse("[ 0.1] Run /init as init process\nKRR-END status=0\n"),
            None
        );
    }
}
