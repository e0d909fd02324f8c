// SPDX-License-Identifier: GPL-2.0-or-later
//! The guest-agent ABI seen from both sides: the C header generated from
//! `krr_engine::record::abi` must lay out every struct exactly as Rust does
//! (checked by compiling it with gcc), and the copy of the header inside the
//! Linux patch must be the generated one.
//!
//! To regenerate the header for the patch:
//! `KRR_WRITE_AGENT_HEADER=/path/krr_agent_abi.h cargo test --release -p krr-engine --test agent_abi`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use krr_engine::record::abi::{c_header, constants, layouts};

const PATCH: &str = "images/kernel/krr-agent/0001-krr-agent.patch";
const HEADER_IN_PATCH: &str = "include/linux/krr_agent_abi.h";

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("engine/ has a parent")
        .to_path_buf()
}

/// A C program that prints one `key value` line per size, offset and constant.
fn layout_probe_source() -> String {
    let mut src = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"krr_agent_abi.h\"\nint main(void)\n{\n",
    );
    for layout in layouts() {
        let s = layout.c_name;
        src.push_str(&format!(
            "\tprintf(\"sizeof {s} %zu\\n\", sizeof(struct {s}));\n"
        ));
        src.push_str(&format!(
            "\tprintf(\"alignof {s} %zu\\n\", _Alignof(struct {s}));\n"
        ));
        for f in &layout.fields {
            let n = f.name;
            src.push_str(&format!(
                "\tprintf(\"offsetof {s}.{n} %zu\\n\", offsetof(struct {s}, {n}));\n"
            ));
            src.push_str(&format!(
                "\tprintf(\"sizeof {s}.{n} %zu\\n\", sizeof(((struct {s} *)0)->{n}));\n"
            ));
        }
    }
    for (name, _, _) in constants() {
        src.push_str(&format!(
            "\tprintf(\"const {name} %llu\\n\", (unsigned long long)({name}));\n"
        ));
    }
    src.push_str("\treturn 0;\n}\n");
    src
}

fn rust_layout_table() -> BTreeMap<String, u64> {
    let mut table = BTreeMap::new();
    for layout in layouts() {
        let s = layout.c_name;
        table.insert(format!("sizeof {s}"), layout.size as u64);
        table.insert(format!("alignof {s}"), layout.align as u64);
        for f in &layout.fields {
            table.insert(format!("offsetof {s}.{}", f.name), f.offset as u64);
            table.insert(format!("sizeof {s}.{}", f.name), f.size as u64);
        }
    }
    for (name, value, _) in constants() {
        table.insert(format!("const {name}"), value);
    }
    table
}

#[test]
fn c_header_compiles_with_the_same_layout_as_rust() {
    let dir = tempfile::tempdir().expect("temporary directory");
    std::fs::write(dir.path().join("krr_agent_abi.h"), c_header()).unwrap();
    std::fs::write(dir.path().join("probe.c"), layout_probe_source()).unwrap();
    let exe = dir.path().join("probe");
    let gcc = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Werror", "-Wpadded", "-o"])
        .arg(&exe)
        .arg(dir.path().join("probe.c"))
        .current_dir(dir.path())
        .output()
        .expect("running gcc (needed to check the agent's C header; apt-get install gcc)");
    assert!(
        gcc.status.success(),
        "gcc rejected the generated header (-Wpadded means implicit padding):\n{}",
        String::from_utf8_lossy(&gcc.stderr)
    );
    let run = Command::new(&exe)
        .output()
        .expect("running the layout probe");
    assert!(
        run.status.success(),
        "layout probe failed: {:?}",
        run.status
    );
    let c_table: BTreeMap<String, u64> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let (key, value) = line.rsplit_once(' ').expect("probe line is `key value`");
            (
                key.to_string(),
                value.parse().expect("probe value is a number"),
            )
        })
        .collect();
    let rust_table = rust_layout_table();
    assert!(
        rust_table.len() > 150,
        "only {} layout facts; generator lost fields?",
        rust_table.len()
    );
    let mut mismatches = Vec::new();
    for (key, rust) in &rust_table {
        match c_table.get(key) {
            Some(c) if c == rust => {}
            Some(c) => mismatches.push(format!("{key}: Rust {rust}, C {c}")),
            None => mismatches.push(format!("{key}: missing from the C probe output")),
        }
    }
    assert!(
        mismatches.is_empty(),
        "C and Rust disagree:\n{}",
        mismatches.join("\n")
    );
}

/// The header as it appears in the patch: the `+` lines of its new-file hunk.
fn header_from_patch(patch: &str) -> Option<String> {
    let marker = format!("+++ b/{HEADER_IN_PATCH}\n");
    let start = patch.find(&marker)? + marker.len();
    let mut lines = patch[start..].lines();
    let hunk = lines.next()?;
    if !hunk.starts_with("@@ -0,0 +1,") {
        return None;
    }
    let mut out = String::new();
    for line in lines {
        match line.strip_prefix('+') {
            Some(text) => {
                out.push_str(text);
                out.push('\n');
            }
            None => break,
        }
    }
    Some(out)
}

#[test]
fn header_in_the_linux_patch_is_the_generated_one() {
    let generated = c_header();
    if let Some(path) = std::env::var_os("KRR_WRITE_AGENT_HEADER") {
        std::fs::write(&path, &generated).expect("writing KRR_WRITE_AGENT_HEADER");
    }
    let path = workspace_root().join(PATCH);
    let patch = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let embedded = header_from_patch(&patch).unwrap_or_else(|| {
        panic!(
            "{} has no new-file hunk for {HEADER_IN_PATCH}",
            path.display()
        )
    });
    if embedded != generated {
        let first = embedded
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(embedded.lines().count().min(generated.lines().count()));
        panic!(
            "{HEADER_IN_PATCH} in {} differs from abi::c_header() at line {}; regenerate it \
             (KRR_WRITE_AGENT_HEADER=...) and rebuild the patch",
            path.display(),
            first + 1
        );
    }
}

// ---------------------------------------------------------------------------
// The agent in a real guest: the `-krr` kernel under QEMU TCG writes events
// into a ring QEMU preloads with a formatted header (`-device loader`), and
// the ring is dumped from guest memory (`pmemsave`) and parsed.
//
// KRR_AGENT_KERNEL=/path/to/krr/bzImage KRR_TEST_INITRD=/path/initramfs.cpio.gz \
//   cargo test --release -p krr-engine --test agent_abi -- --ignored --nocapture

mod qemu_guest {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use krr_engine::record::abi::*;

    /// Guest-physical ring placement inside the guest's 512 MiB of RAM; the
    /// kernel is told to keep off it with memmap=SIZE$PHYS.
    const RING_PHYS: u64 = 0x1c00_0000;
    const RING_SIZE: u64 = 32 * 1024 * 1024 + 4096;
    const DUMP_MARKER: &str = "KRR-AGENT-DUMP";

    fn env_path(name: &str) -> PathBuf {
        let value =
            std::env::var_os(name).unwrap_or_else(|| panic!("set {name} (see the comment above)"));
        let path = PathBuf::from(value);
        assert!(path.is_file(), "{name}={} is not a file", path.display());
        path
    }

    struct Boot {
        console: String,
        ring: Option<Vec<u8>>,
    }

    /// Boots the kernel; if `ring_header` is given it is loaded at RING_PHYS
    /// and the whole ring region is dumped once the guest prints DUMP_MARKER.
    fn boot(
        run: &str,
        ring_header: Option<&RingHeader>,
        announce_ring: bool,
        vcpus: u32,
        flips: &[(&str, u32)],
    ) -> Boot {
        let kernel = env_path("KRR_AGENT_KERNEL");
        let initrd = env_path("KRR_TEST_INITRD");
        let dir = tempfile::tempdir().unwrap();
        let monitor = dir.path().join("monitor.sock");
        let gdb = dir.path().join("gdb.sock");
        let dump = dir.path().join("ring.bin");
        let mut append = String::from("console=ttyS0 panic=-1 reboot=t");
        if announce_ring {
            append.push_str(&format!(
                " memmap={RING_SIZE:#x}${RING_PHYS:#x} krr.ring={RING_SIZE:#x}@{RING_PHYS:#x}"
            ));
        }
        append.push_str(&format!(
            " krr.run=\"{run}; cat /proc/krr_agent; echo {DUMP_MARKER}; sleep 600\""
        ));
        let accel = if vcpus > 1 { "tcg,thread=multi" } else { "tcg" };
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            accel,
            "-M",
            "microvm,acpi=off",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args(["-serial", "stdio", "-m", "512"])
        .arg("-smp")
        .arg(vcpus.to_string())
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(&append)
        .arg("-chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=gdb0",
            gdb.display()
        ))
        .args(["-gdb", "chardev:gdb0"])
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()));
        if let Some(header) = ring_header {
            let file = dir.path().join("ring-header.bin");
            std::fs::write(&file, header.to_bytes()).unwrap();
            cmd.arg("-device").arg(format!(
                "loader,file={},addr={RING_PHYS:#x},force-raw=on",
                file.display()
            ));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting qemu-system-x86_64 (apt-get install qemu-system-x86)");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(400);
        let mut console = String::new();
        let mut dumped = false;
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    console.push_str(&line);
                    console.push('\n');
                    if let Some((_, control)) =
                        flips.iter().find(|(marker, _)| line.trim_end() == *marker)
                    {
                        set_control(&gdb, *control);
                    }
                    if line.trim_end() == DUMP_MARKER {
                        monitor_commands(
                            &monitor,
                            &[
                                "stop".to_string(),
                                format!(
                                    "pmemsave {RING_PHYS:#x} {RING_SIZE:#x} \"{}\"",
                                    dump.display()
                                ),
                            ],
                        );
                        dumped = true;
                        break;
                    }
                    if line.contains("Kernel panic") {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        assert!(
            dumped,
            "guest never printed {DUMP_MARKER}; qemu stderr:\n{stderr}\nconsole:\n{console}"
        );
        let ring = ring_header.map(|_| std::fs::read(&dump).expect("pmemsave wrote the ring dump"));
        Boot { console, ring }
    }

    /// `events_written` counts published records; QEMU may stop the guest
    /// for the dump inside the agent, after the count and before `head` moves.
    fn check_events_written(h: &RingHeader, contents: &RingContents) {
        let parsed = contents.events.len() as u64;
        assert!(
            h.events_written == parsed || h.events_written == parsed + 1,
            "events_written {} but {parsed} records between tail and head",
            h.events_written
        );
    }

    /// Writes the ring's `control` word the way the engine will: with the
    /// guest stopped (QEMU's gdbstub, physical-memory mode), then resumes it.
    fn set_control(gdb_socket: &Path, control: u32) {
        let address = RING_PHYS + CONTROL_OFFSET as u64;
        let out = Command::new("gdb")
            .args(["-q", "-batch", "-nx"])
            .arg("-ex")
            .arg(format!("target remote {}", gdb_socket.display()))
            .args(["-ex", "maint packet Qqemu.PhyMemMode:1"])
            .arg("-ex")
            .arg(format!("set {{unsigned int}}{address:#x} = {control}"))
            .arg("-ex")
            .arg(format!("x/1wx {address:#x}"))
            .args(["-ex", "detach"])
            .output()
            .expect("running gdb (apt-get install gdb)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("{address:#x}:\t{control:#010x}")),
            "gdb did not set control to {control}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Sends HMP commands one by one, each after the previous prompt.
    fn monitor_commands(socket: &Path, commands: &[String]) {
        let mut stream = UnixStream::connect(socket).expect("connecting to the QEMU monitor");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let wait_prompt = |stream: &mut UnixStream| {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&seen).contains("(qemu)") {
                let n = stream.read(&mut buf).expect("reading the QEMU monitor");
                assert!(n > 0, "QEMU monitor closed");
                seen.extend_from_slice(&buf[..n]);
            }
        };
        wait_prompt(&mut stream);
        for command in commands {
            stream.write_all(format!("{command}\n").as_bytes()).unwrap();
            wait_prompt(&mut stream);
        }
    }

    #[test]
    #[ignore = "boots the -krr kernel under QEMU; needs KRR_AGENT_KERNEL and KRR_TEST_INITRD"]
    fn agent_records_a_syscall_loop_into_the_ring() {
        let iterations = 2000u64;
        let header = RingHeader::new(RING_SIZE, CONTROL_RECORD).unwrap();
        let boot = boot(
            &format!("syscall-loop {iterations}"),
            Some(&header),
            true,
            1,
            &[],
        );
        assert!(
            boot.console.contains("krr_agent: ring of"),
            "agent did not accept the ring:\n{}",
            boot.console
        );
        assert!(
            boot.console.contains("iterations: 2000"),
            "syscall-loop did not finish:\n{}",
            boot.console
        );
        let region = boot.ring.unwrap();
        let contents =
            parse_ring(&region).unwrap_or_else(|e| panic!("ring dump does not parse: {e}"));
        let h = &contents.header;
        assert_eq!(h.agent_state, AGENT_STATE_READY);
        assert_eq!(h.agent_abi_version, ABI_VERSION);
        let counts = contents.counts();
        println!(
            "ring: {} events, {} bytes ({:.1} bytes/event), dropped {}, doorbells {}",
            contents.events.len(),
            contents.bytes,
            contents.bytes as f64 / contents.events.len().max(1) as f64,
            h.dropped_events,
            h.doorbells
        );
        for (event_type, count) in &counts {
            println!("  {:<18} {count}", event_type_name(*event_type));
        }
        for event_type in counts.keys() {
            if let Some(example) = contents
                .events
                .iter()
                .rev()
                .find(|e| e.body.event_type() == *event_type)
            {
                println!("  e.g. {example}");
            }
        }
        assert_eq!(h.dropped_events, 0, "ring overflowed; enlarge RING_SIZE");
        check_events_written(h, &contents);
        for (i, event) in contents.events.iter().enumerate() {
            assert_eq!(
                event.seq, i as u64,
                "sequence numbers are not consecutive at event {i}"
            );
        }
        let count = |t| counts.get(&t).copied().unwrap_or(0);
        // 12 syscalls per iteration, plus boot, /init and busybox.
        assert!(
            count(EVENT_SYSCALL) >= 12 * iterations,
            "syscalls: {}",
            count(EVENT_SYSCALL)
        );
        for t in [
            EVENT_COPY_FROM_USER,
            EVENT_STRNCPY_FROM_USER,
            EVENT_STRNLEN_USER,
            EVENT_GET_USER,
            EVENT_RDTSC,
            EVENT_RANDOM,
        ] {
            assert!(count(t) > 0, "no {} events", event_type_name(t));
        }
        // getpid (39) from the static syscall-loop binary: its TLS gives a
        // non-zero FS base, and it runs in user space (CPL 3).
        let getpids: Vec<&SyscallEvent> = contents
            .events
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::Syscall(s) if s.regs.orig_ax == 39 => Some(s),
                _ => None,
            })
            .collect();
        assert!(
            getpids.len() as u64 >= iterations,
            "getpid syscalls: {}",
            getpids.len()
        );
        for s in &getpids {
            assert_eq!(s.regs.cs & 3, 3, "syscall from CPL {}", s.regs.cs & 3);
            assert_ne!(
                s.fs_base, 0,
                "getpid from a static glibc binary without FS base"
            );
            assert_ne!(s.cr3, 0);
            assert_eq!(s.regs.cx, s.regs.ip, "SYSCALL saves RIP in RCX");
            assert!(
                s.kernel_gs_base >= 0xffff_8000_0000_0000,
                "kernel GS base {:#x}",
                s.kernel_gs_base
            );
        }
        // write(fd, &byte, 1) of the loop: a 1-byte copy_from_user per iteration.
        let one_byte = contents
            .events
            .iter()
            .filter(|e| matches!(&e.body, EventBody::CopyFromUser { info, data } if info.requested == 1 && data.len() == 1))
            .count();
        assert!(
            one_byte as u64 >= iterations,
            "1-byte copy_from_user events: {one_byte}"
        );
        // open("/proc/self/stat") copies its path with strncpy_from_user.
        assert!(contents.events.iter().any(|e| matches!(&e.body,
            EventBody::StrncpyFromUser { data, .. } if data.starts_with(b"/proc/self/stat\0"))));
        assert!(
            boot.console.contains("events_written:"),
            "/proc/krr_agent missing:\n{}",
            boot.console
        );
    }

    #[test]
    #[ignore = "boots the -krr kernel under QEMU; needs KRR_AGENT_KERNEL and KRR_TEST_INITRD"]
    fn agent_orders_events_of_two_vcpus_in_one_ring() {
        // Two loops in parallel on two vCPUs (multi-threaded TCG, so the
        // writers really race for the ring lock).
        let header = RingHeader::new(RING_SIZE, CONTROL_RECORD).unwrap();
        let boot = boot(
            "syscall-loop 1000 & syscall-loop 1000; wait",
            Some(&header),
            true,
            2,
            &[],
        );
        assert_eq!(
            boot.console.matches("iterations: 1000").count(),
            2,
            "{}",
            boot.console
        );
        let contents = parse_ring(&boot.ring.unwrap())
            .unwrap_or_else(|e| panic!("ring dump does not parse: {e}"));
        assert_eq!(contents.header.dropped_events, 0);
        assert_eq!(contents.header.agent_nr_cpus, 2);
        for (i, event) in contents.events.iter().enumerate() {
            assert_eq!(
                event.seq, i as u64,
                "sequence numbers are not consecutive at event {i}"
            );
        }
        let syscalls_on = |cpu| {
            contents
                .events
                .iter()
                .filter(|e| e.cpu == cpu && matches!(e.body, EventBody::Syscall(_)))
                .count()
        };
        println!(
            "syscalls on cpu0: {}, cpu1: {}",
            syscalls_on(0),
            syscalls_on(1)
        );
        assert!(
            syscalls_on(0) > 0 && syscalls_on(1) > 0,
            "both vCPUs enter the kernel"
        );
        assert!(syscalls_on(0) + syscalls_on(1) >= 2 * 12 * 1000);
    }

    #[test]
    #[ignore = "boots the -krr kernel under QEMU; needs KRR_AGENT_KERNEL and KRR_TEST_INITRD"]
    fn agent_starts_and_stops_at_runtime() {
        // Four loops; recording is switched on for the 2nd and 4th only, with
        // the guest stopped, as the engine does it.
        let run = "syscall-loop 100; echo KRR-FLIP-1; sleep 2; syscall-loop 300; \
                   echo KRR-FLIP-2; sleep 2; syscall-loop 500; echo KRR-FLIP-3; sleep 2; \
                   syscall-loop 700";
        let header = RingHeader::new(RING_SIZE, 0).unwrap();
        let flips = [
            ("KRR-FLIP-1", CONTROL_RECORD),
            ("KRR-FLIP-2", 0),
            ("KRR-FLIP-3", CONTROL_RECORD),
        ];
        let boot = boot(run, Some(&header), true, 1, &flips);
        assert!(boot.console.contains("iterations: 700"), "{}", boot.console);
        let contents = parse_ring(&boot.ring.unwrap())
            .unwrap_or_else(|e| panic!("ring dump does not parse: {e}"));
        assert_eq!(contents.header.dropped_events, 0);
        let getpid = contents
            .events
            .iter()
            .filter(|e| matches!(&e.body, EventBody::Syscall(s) if s.regs.orig_ax == 39))
            .count();
        let one_byte_writes = contents
            .events
            .iter()
            .filter(
                |e| matches!(&e.body, EventBody::CopyFromUser { info, .. } if info.requested == 1),
            )
            .count();
        println!("recorded windows: getpid {getpid}, 1-byte copy_from_user {one_byte_writes}");
        // 300 + 700 iterations recorded; the 100 and 500 ones not.
        for (what, n) in [
            ("getpid", getpid),
            ("1-byte copy_from_user", one_byte_writes),
        ] {
            assert!(
                (1000..1100).contains(&n),
                "{what}: {n}, expected the 300 + 700 recorded iterations"
            );
        }
    }

    #[test]
    #[ignore = "boots the -krr kernel under QEMU; needs KRR_AGENT_KERNEL and KRR_TEST_INITRD"]
    fn agent_drops_and_counts_when_nobody_drains() {
        // A 64 KiB data area inside the reserved region; QEMU never answers
        // the doorbell, so the ring fills, stays consistent and counts drops.
        let mut header = RingHeader::new(RING_SIZE, CONTROL_RECORD).unwrap();
        header.data_size = MIN_DATA_SIZE;
        header.high_water = MIN_DATA_SIZE / 2;
        let boot = boot("syscall-loop 100", Some(&header), true, 1, &[]);
        let contents = parse_ring(&boot.ring.unwrap())
            .unwrap_or_else(|e| panic!("full ring does not parse: {e}"));
        let h = &contents.header;
        println!(
            "full ring: {} events in {} bytes, dropped {} events ({} bytes), doorbells {}",
            contents.events.len(),
            contents.bytes,
            h.dropped_events,
            h.dropped_bytes,
            h.doorbells
        );
        assert!(h.head - h.tail <= MIN_DATA_SIZE);
        assert!(
            h.dropped_events > 0,
            "a 64 KiB ring cannot hold a whole boot"
        );
        check_events_written(h, &contents);
        // READY, one HIGH_WATER crossing, then a FULL doorbell per dropped
        // event. The guest keeps dropping while QEMU stops it for the dump, so
        // it may stop between an event's doorbell and its drop count.
        let extra = h.doorbells - h.dropped_events;
        assert!(
            extra == 2 || extra == 3,
            "{} doorbells for {} drops",
            h.doorbells,
            h.dropped_events
        );
        assert!(boot.console.contains("iterations: 100"));
    }

    #[test]
    #[ignore = "boots the -krr kernel under QEMU; needs KRR_AGENT_KERNEL and KRR_TEST_INITRD"]
    fn agent_waits_for_the_engine_when_control_is_off() {
        let header = RingHeader::new(RING_SIZE, 0).unwrap();
        let boot = boot("syscall-loop 100", Some(&header), true, 1, &[]);
        assert!(
            boot.console
                .contains("recording off until the engine starts it"),
            "{}",
            boot.console
        );
        let contents = parse_ring(&boot.ring.unwrap()).unwrap();
        assert_eq!(contents.header.agent_state, AGENT_STATE_READY);
        assert_eq!(
            contents.header.head, 0,
            "agent wrote events while control was off"
        );
        assert!(contents.events.is_empty());
    }

    #[test]
    #[ignore = "boots the -krr kernel under QEMU; needs KRR_AGENT_KERNEL and KRR_TEST_INITRD"]
    fn agent_stays_off_without_a_ring_or_with_an_unformatted_one() {
        let boot_plain = boot("syscall-loop 100", None, false, 1, &[]);
        assert!(
            boot_plain
                .console
                .contains("krr_agent: no krr.ring= on the command line; agent off"),
            "{}",
            boot_plain.console
        );
        assert!(boot_plain.console.contains("iterations: 100"));
        // Announced but never formatted by an engine (all zero): refused.
        let boot_blank = boot("syscall-loop 100", None, true, 1, &[]);
        assert!(
            boot_blank.console.contains("is not KRR_RING_MAGIC"),
            "{}",
            boot_blank.console
        );
        assert!(boot_blank.console.contains("iterations: 100"));
    }
}
