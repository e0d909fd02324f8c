// SPDX-License-Identifier: GPL-2.0-or-later
//! Debugging a replay in Debian's gdb (batch mode) through `krr replay
//! --gdb`: a breakpoint at a syscall handler, its argument and the user
//! string it points to; stepi then reverse-stepi back to identical
//! registers; reverse-continue from a later breakpoint hit to the earlier
//! one; malformed packets and a disconnect leave the stub working and the
//! recording unchanged; the kernel's own helpers (`lx-dmesg`) work.
//!
//! Needs `KRR_AGENT_KERNEL` (the `-krr` bzImage, with its vmlinux beside
//! it) and `KRR_TEST_INITRD` (set by `cargo xtask test`), and gdb.

#[path = "common/guest_images.rs"]
mod guest_images;
#[path = "common/krr_command.rs"]
mod krr_command;

use krr_command::{krr, krr_command};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const APPEND: &str = "console=ttyS0 nokaslr noapic nolapic acpi=off tsc=reliable no_timer_check mitigations=off pci=off panic=-1 rdinit=/init";

/// Records `command` from a marker just before it, as `name`; returns the
/// vmlinux, and whether `krr record` succeeded.
fn record(dir: &Path, name: &str, command: &str) -> Option<(PathBuf, bool)> {
    let (kernel, initrd) = guest_images::guest_images("KRR_AGENT_KERNEL")?;
    let vmlinux = kernel.with_file_name("vmlinux");
    assert!(vmlinux.is_file(), "{} missing", vmlinux.display());
    let append = format!("{APPEND} krr.run=\"echo KRR-GDB''-BEGIN; {command}\"");
    let out = krr(
        dir,
        &[
            "record",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--vmlinux",
            vmlinux.to_str().unwrap(),
            "--backend",
            "tcg",
            "--quiet",
            "--name",
            name,
            "--start",
            "marker:KRR-GDB-BEGIN",
            "--append",
            &append,
        ],
    );
    Some((vmlinux, out.status.success()))
}

/// Records `cat /proc/version` as `cat`; returns the vmlinux.
fn record_cat(dir: &Path) -> Option<PathBuf> {
    let (vmlinux, ok) = record(dir, "cat", "cat /proc/version")?;
    assert!(ok, "krr record failed");
    Some(vmlinux)
}

/// `krr replay cat --gdb SOCKET`, once its socket exists.
struct Stub {
    child: Child,
    socket: PathBuf,
}

impl Stub {
    fn start(dir: &Path) -> Stub {
        Stub::start_with(dir, &["cat"])
    }

    /// `krr replay ARGS --quiet --gdb SOCKET`.
    fn start_with(dir: &Path, args: &[&str]) -> Stub {
        let socket = dir.join("gdb.sock");
        // A socket left by an earlier stub would be taken for this one's.
        let _ = std::fs::remove_file(&socket);
        let child = krr_command(dir)
            .arg("replay")
            .args(args)
            .args(["--quiet", "--gdb", socket.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting krr replay --gdb");
        let began = Instant::now();
        while !socket.exists() {
            assert!(began.elapsed() < Duration::from_secs(60), "no gdb socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        Stub { child, socket }
    }

    /// Waits for the stub to end; its exit status and stderr.
    fn finish(mut self) -> (bool, String) {
        let began = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                self.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                eprintln!("krr replay --gdb: {status}\n{err}");
                return (status.success(), err);
            }
            if began.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                panic!("krr replay --gdb did not end after gdb detached");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs gdb in batch mode against the stub with `commands`; its output.
fn gdb(vmlinux: &Path, stub: &Stub, commands: &[&str]) -> String {
    let target = format!("target remote {}", stub.socket.display());
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx", "-ex", "set pagination off", "-ex", &target]);
    for c in commands {
        cmd.args(["-ex", c]);
    }
    let out = cmd.arg(vmlinux).output().expect("running gdb");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("gdb {commands:?}:\n{text}");
    text
}

/// The values of `info registers` lines (name -> hex value).
fn registers(text: &str, after: &str) -> Vec<(String, String)> {
    let start = text.find(after).expect("marker in gdb output") + after.len();
    text[start..]
        .lines()
        .map(str::split_whitespace)
        .filter_map(|mut w| Some((w.next()?.to_string(), w.next()?.to_string())))
        .take_while(|(name, value)| {
            ["rip", "rsp", "rdi", "rax", "rbx", "rcx", "eflags"].contains(&name.as_str())
                && value.starts_with("0x")
        })
        .collect()
}

fn gdb_available() -> bool {
    let found = Command::new("gdb").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("KRR_TEST_REQUIRE_IMAGES").is_none(),
            "gdb is not installed (cargo xtask setup installs it)"
        );
        eprintln!("SKIPPED: gdb is not installed");
    }
    found
}

/// gdb, and a `cat` recording (see [`record_cat`]) in a directory of its
/// own; `None` (the test skipped) without them.
fn gdb_and_cat_recording() -> Option<(tempfile::TempDir, PathBuf)> {
    if !gdb_available() {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let vmlinux = record_cat(tmp.path())?;
    Some((tmp, vmlinux))
}

/// The `cat` recording's event log as it was, to check that debugging
/// never modifies it.
struct Untouched {
    events: PathBuf,
    bytes: Vec<u8>,
}

impl Untouched {
    fn of(dir: &Path) -> Untouched {
        let events = dir.join("cat/events.krrlog");
        let bytes = std::fs::read(&events).unwrap();
        Untouched { events, bytes }
    }

    fn check(&self) {
        assert!(
            std::fs::read(&self.events).unwrap() == self.bytes,
            "the recording is never modified"
        );
    }
}

#[test]
fn gdb_breaks_reads_steps_and_goes_backwards_in_a_replay() {
    let Some((tmp, vmlinux)) = gdb_and_cat_recording() else {
        return;
    };
    let untouched = Untouched::of(tmp.path());

    let regs = "info registers rip rsp rdi rax rbx rcx eflags";
    let commands = [
        "break __x64_sys_openat",
        "continue",
        "x/s ((struct pt_regs *)$rdi)->si",
        "echo ==AT-BREAK==\\n",
        regs,
        "stepi 12",
        "echo ==STEPPED==\\n",
        regs,
        "reverse-stepi 12",
        "echo ==BACK==\\n",
        regs,
        "break do_sys_openat2",
        "continue",
        "continue",
        "echo ==SECOND-OPEN==\\n",
        "monitor where",
        "reverse-continue",
        "echo ==REVERSE-1==\\n",
        regs,
        "reverse-continue",
        "echo ==REVERSE-2==\\n",
        regs,
        "monitor where",
        "monitor goto-event 50",
    ];
    // Without snapshots (every reverse operation replays from the start),
    // then with one every 100,000 kernel instructions: the same session.
    let session = |snapshot_every: &str| {
        let stub = Stub::start_with(tmp.path(), &["cat", "--snapshot-every", snapshot_every]);
        let out = gdb(&vmlinux, &stub, &commands);
        let (ok, err) = stub.finish();
        assert!(ok, "the stub failed: {err}");
        (out, err)
    };
    let (out, _) = session("0");
    let (with_snapshots, err) = session("100000");
    assert_eq!(with_snapshots, out, "the same session with snapshots");
    assert!(
        !err.contains("(0 snapshot(s)"),
        "snapshots were taken: {err}"
    );

    assert!(
        out.contains("Breakpoint 1, __x64_sys_openat"),
        "breakpoint at the handler"
    );
    assert!(
        out.contains("\"/proc/version\""),
        "the user string the syscall's argument points to"
    );
    let at_break = registers(&out, "==AT-BREAK==");
    let stepped = registers(&out, "==STEPPED==");
    let back = registers(&out, "==BACK==");
    assert_eq!(at_break.len(), 7, "{at_break:?}");
    assert_ne!(stepped, at_break, "stepi moved");
    assert_eq!(back, at_break, "reverse-stepi came back to the same state");
    // Forward: openat (1), do_sys_openat2 (2), then the next openat (1).
    let second = &out[out.find("==SECOND-OPEN==").unwrap()..];
    assert!(second.contains("__x64_sys_openat"), "{second}");
    // Backwards: do_sys_openat2 of the first open, then its openat.
    let rev1 = &out[out.find("==REVERSE-1==").unwrap()..];
    assert!(rev1.contains("do_sys_openat2"), "{rev1}");
    assert_eq!(registers(&out, "==REVERSE-2=="), at_break);
    // gdb prints what `monitor` answers on stderr, after stdout here.
    assert!(
        out.contains(": 50 events of the log consumed"),
        "monitor goto-event: {out}"
    );

    untouched.check();
}

/// Writes are refused until `monitor allow-writes`; then a register and a
/// kernel variable take gdb's values, and going back (reverse-stepi)
/// restores the recorded past without them. The recording is untouched.
#[test]
fn writes_are_refused_until_allowed_and_going_back_undoes_them() {
    let Some((tmp, vmlinux)) = gdb_and_cat_recording() else {
        return;
    };
    let untouched = Untouched::of(tmp.path());
    let stub = Stub::start(tmp.path());
    let out = gdb(
        &vmlinux,
        &stub,
        &[
            "break __x64_sys_openat",
            "continue",
            "stepi",
            "print panic_timeout",
            "set var panic_timeout = 4242",
            "set var $rbx = 0x1234",
            "echo ==REFUSED==\n",
            "print panic_timeout",
            "print/x $rbx",
            "monitor allow-writes",
            "set var panic_timeout = 4242",
            "set var $rbx = 0x1234",
            "echo ==WRITTEN==\n",
            "print panic_timeout",
            "print/x $rbx",
            "monitor where",
            "reverse-stepi",
            "stepi",
            "echo ==BACK==\n",
            "print panic_timeout",
            "print/x $rbx",
        ],
    );
    let (ok, err) = stub.finish();
    assert!(ok, "the stub failed: {err}");
    assert!(
        err.contains("refused (a replay must stay as recorded; 'monitor allow-writes'"),
        "{err}"
    );
    let value = |section: &str, n: usize| -> String {
        let after = &out[out.find(section).expect(section)..];
        after
            .lines()
            .filter(|l| l.starts_with('$'))
            .nth(n)
            .and_then(|l| l.split(" = ").nth(1))
            .unwrap_or_default()
            .to_string()
    };
    let original = out
        .lines()
        .find(|l| l.starts_with("$1 = "))
        .and_then(|l| l.split(" = ").nth(1))
        .expect("panic_timeout printed")
        .to_string();
    assert_ne!(original, "4242");
    assert_eq!(
        value("==REFUSED==", 0),
        original,
        "a refused write changed nothing: {out}"
    );
    assert_ne!(value("==REFUSED==", 1), "0x1234", "{out}");
    assert_eq!(value("==WRITTEN==", 0), "4242", "{out}");
    assert_eq!(value("==WRITTEN==", 1), "0x1234", "{out}");
    assert!(
        out.contains("gdb wrote to this replay"),
        "monitor where says so: {out}"
    );
    assert_eq!(
        value("==BACK==", 0),
        original,
        "going back undid the write: {out}"
    );
    assert_ne!(value("==BACK==", 1), "0x1234", "{out}");
    untouched.check();
}

/// Ctrl-C in gdb (SIGINT to gdb while `continue` runs) stops a long replay
/// where it is; the session goes on from there: `monitor where`, a step,
/// and a `continue` to the recording's end.
#[test]
fn ctrl_c_stops_a_running_replay_and_the_session_goes_on() {
    use std::io::BufRead;
    if !gdb_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Several seconds of replay, so that Ctrl-C finds it running.
    let Some((vmlinux, ok)) = record(tmp.path(), "cat", "syscall-loop 30000") else {
        return;
    };
    assert!(ok, "krr record failed");
    let stub = Stub::start(tmp.path());
    let target = format!("target remote {}", stub.socket.display());
    let mut child = Command::new("gdb")
        .args(["-batch", "-nx", "-ex", "set pagination off", "-ex", &target])
        .args([
            "-ex",
            "echo ==CONTINUING==\n",
            "-ex",
            "continue",
            "-ex",
            "echo ==STOPPED==\n",
            "-ex",
            "monitor where",
        ])
        .args([
            "-ex",
            "stepi",
            "-ex",
            "echo ==STEPPED==\n",
            "-ex",
            "continue",
        ])
        .arg(&vmlinux)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running gdb");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if line.starts_with("==CONTINUING==") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("gdb continued");
    // gdb flushes its output after each command: `continue` is under way.
    std::thread::sleep(Duration::from_millis(1000));
    // SAFETY: kill(2) on the gdb child this test started and still holds.
    let sent = unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(sent, 0, "SIGINT sent to gdb");
    let status = child.wait().unwrap();
    let out = reader.join().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    eprintln!("gdb ({status}):\n{out}{err}");
    let (stub_ok, stub_err) = stub.finish();
    assert!(stub_ok, "the stub failed: {stub_err}");
    let stopped = &out[..out
        .find("==STOPPED==")
        .expect("the first continue returned")];
    assert!(stopped.contains("received signal SIGINT"), "{out}");
    // Stopped mid-way: some of the log consumed, the rest replayed by the
    // last `continue`.
    let consumed: u64 = err
        .lines()
        .find_map(|l| {
            l.split(": ")
                .nth(1)?
                .strip_suffix(" events of the log consumed")
        })
        .and_then(|n| n.parse().ok())
        .expect("monitor where names the events consumed");
    assert!(consumed > 0, "{err}");
    assert!(
        out.contains("==STEPPED=="),
        "a step after the interrupt: {out}"
    );
    assert!(
        stub_err.contains("replay MATCHED to the recording's end"),
        "the last continue got to the end: {stub_err}"
    );
}

/// The kernel's own gdb helpers, auto-loaded as the stub's printed command
/// line says: `lx-dmesg` prints the boot log the recorded kernel holds, and
/// `lx-ps` its tasks (the recording's `cat` among them).
#[test]
fn the_kernels_gdb_helpers_read_the_recorded_kernel() {
    let Some((tmp, vmlinux)) = gdb_and_cat_recording() else {
        return;
    };
    let scripts = vmlinux.with_file_name("vmlinux-gdb.py");
    assert!(
        scripts.is_file(),
        "{} missing: the kernel images keep the kernel's gdb scripts",
        scripts.display()
    );
    let stub = Stub::start(tmp.path());
    let safe_path = format!(
        "add-auto-load-safe-path {}",
        vmlinux.parent().unwrap().display()
    );
    let target = format!("target remote {}", stub.socket.display());
    let out = Command::new("gdb")
        .args(["-batch", "-nx", "-iex", &safe_path])
        .args(["-ex", "set pagination off", "-ex", &target])
        .args(["-ex", "lx-dmesg", "-ex", "echo ==PS==\n", "-ex", "lx-ps"])
        .arg(&vmlinux)
        .output()
        .expect("running gdb");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, err) = stub.finish();
    assert!(ok, "the stub failed: {err}");
    assert!(
        err.contains(&format!("-iex '{safe_path}'")),
        "the printed command line lets gdb load the helpers: {err}"
    );
    let (dmesg, ps) = text.split_once("==PS==").expect("both commands ran");
    assert!(
        dmesg.contains("Linux version 6.1") && dmesg.contains("Command line:"),
        "lx-dmesg prints the boot log: {text}"
    );
    assert!(
        ps.contains("swapper/0") && ps.contains("init"),
        "lx-ps lists the kernel's tasks: {text}"
    );
}

/// 1,000 `stepi` then 1,000 `reverse-stepi` end on exactly the registers
/// of the start (each reverse step a replay from the nearest snapshot).
#[test]
fn a_thousand_steps_forwards_and_back_end_where_they_started() {
    let Some((tmp, vmlinux)) = gdb_and_cat_recording() else {
        return;
    };
    let regs = "info registers rip rsp rdi rax rbx rcx eflags";
    let commands = [
        "break __x64_sys_openat",
        "continue",
        "delete 1",
        "echo ==START==\\n",
        regs,
        "stepi 1000",
        "echo ==STEPPED==\\n",
        regs,
        "reverse-stepi 1000",
        "echo ==BACK==\\n",
        regs,
    ];
    let stub = Stub::start_with(tmp.path(), &["cat", "--snapshot-every", "100000"]);
    let out = gdb(&vmlinux, &stub, &commands);
    let (ok, err) = stub.finish();
    assert!(ok, "the stub failed: {err}");
    let start = registers(&out, "==START==");
    assert_eq!(start.len(), 7, "{out}");
    assert_ne!(registers(&out, "==STEPPED=="), start, "stepi moved");
    assert_eq!(registers(&out, "==BACK=="), start, "{out}");
}

/// A watchpoint on kernel data (the syscall's return slot in its pt_regs):
/// going forwards it stops after the write with the new value; going
/// backwards, reverse-continue stops right at the instruction that wrote
/// it, then at the one that wrote it before.
#[test]
fn a_watchpoint_finds_the_writes_forwards_and_backwards() {
    let Some((tmp, vmlinux)) = gdb_and_cat_recording() else {
        return;
    };
    let stub = Stub::start(tmp.path());
    let out = gdb(
        &vmlinux,
        &stub,
        &[
            "break __x64_sys_openat",
            "continue",
            "delete 1",
            "watch -l ((struct pt_regs *)$rdi)->ax",
            "continue",
            "echo ==FORWARD==\\n",
            "reverse-continue",
            "echo ==WRITER==\\n",
            "x/i $pc",
            "reverse-continue",
            "echo ==EARLIER==\\n",
            "x/i $pc",
        ],
    );
    let (ok, err) = stub.finish();
    assert!(ok, "{err}");
    let forward = &out[..out.find("==FORWARD==").unwrap()];
    // openat returned file descriptor 3 in place of -ENOSYS.
    assert!(
        forward.contains("Old value = 18446744073709551578") && forward.contains("New value = 3"),
        "{forward}"
    );
    let writer = &out[out.find("==WRITER==").unwrap()..out.find("==EARLIER==").unwrap()];
    assert!(
        writer.contains("do_syscall_64") && writer.contains("mov    %rax,0x50(%rbx)"),
        "the store of the return value: {writer}"
    );
    let earlier = &out[out.find("==EARLIER==").unwrap()..];
    assert!(
        earlier.contains("entry_SYSCALL_64") && earlier.contains("push   $0xffffffffffffffda"),
        "the entry code's push of -ENOSYS: {earlier}"
    );
}

/// A recording that ends in a kernel panic, opened at its end: the stop is
/// in the panic's last instructions, and reverse-continue goes back to the
/// function that forced the crash, with or without snapshots of the replay.
#[test]
fn a_crash_is_debugged_backwards_from_where_the_recording_ends() {
    if !gdb_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some((vmlinux, _)) = record(tmp.path(), "crash", "echo c > /proc/sysrq-trigger") else {
        return;
    };
    assert!(
        tmp.path().join("crash/end.json").is_file(),
        "the recording of the crash is complete"
    );
    let commands = [
        "echo ==AT-END==\\n",
        "bt",
        "break sysrq_handle_crash",
        "reverse-continue",
        "echo ==BACK==\\n",
        "bt 3",
        "monitor where",
        "reverse-stepi",
        "monitor where",
    ];
    // No snapshots, then one wherever the replay can be restored exactly
    // (every turn that ran an instruction): the same session.
    let session = |snapshot_every: &str| {
        let args = ["crash", "--at-end", "--snapshot-every", snapshot_every];
        let stub = Stub::start_with(tmp.path(), &args);
        let out = gdb(&vmlinux, &stub, &commands);
        let (ok, err) = stub.finish();
        assert!(ok, "{err}");
        assert!(err.contains("replay MATCHED"), "{err}");
        out
    };
    let out = session("0");
    assert_eq!(session("1"), out, "the same session with snapshots");
    let at_end = &out[out.find("==AT-END==").unwrap()..out.find("==BACK==").unwrap()];
    assert!(at_end.contains("panic"), "stopped in the panic: {at_end}");
    assert!(out.contains("Breakpoint 1, sysrq_handle_crash"), "{out}");
    let back = &out[out.find("==BACK==").unwrap()..];
    assert!(
        back.contains("#0  sysrq_handle_crash") && back.contains("__handle_sysrq"),
        "{back}"
    );
}

/// Raw packets: garbage, a bad checksum, an unknown command and a sudden
/// disconnect. The stub answers what it can, and ends cleanly when the
/// connection goes.
#[test]
fn the_stub_survives_malformed_packets_and_a_disconnect() {
    let tmp = tempfile::tempdir().unwrap();
    if record_cat(tmp.path()).is_none() {
        return;
    }
    let stub = Stub::start(tmp.path());
    let mut s = UnixStream::connect(&stub.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut ask = |packet: &[u8]| -> String {
        s.write_all(packet).unwrap();
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        // An answer is `-` (refused), or `+` then `$...#xx`.
        while !(got == b"-" || got.len() >= 3 && got[got.len() - 3] == b'#') {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the stub closed the connection");
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    assert_eq!(
        ask(b"garbage$?#00"),
        "-",
        "noise dropped, bad checksum refused"
    );
    assert_eq!(
        ask(b"$vKrrNoSuchThing#ef"),
        "+$#00",
        "unknown packet: empty reply"
    );
    let status = ask(b"$?#3f");
    assert!(status.starts_with("+$T05thread:01;"), "{status}");
    drop(s);
    let (ok, err) = stub.finish();
    assert!(ok, "{err}");
    assert!(err.contains("krr: gdb disconnected"), "{err}");
}

/// A snapshot holds registers, memory and the log position, not an event
/// queued for the vCPU's next run: right after replay injects a recorded
/// interrupt, none is taken (restoring it would lose the interrupt), while
/// elsewhere snapshots are taken.
#[test]
fn no_snapshot_is_taken_while_an_interrupt_waits_for_delivery() {
    use krr_engine::replay::{ReplayOptions, Replayer, StartImage, Turn};
    let tmp = tempfile::tempdir().unwrap();
    if record_cat(tmp.path()).is_none() {
        return;
    }
    let dir = tmp.path().join("cat");
    let start = StartImage::load(&dir).unwrap();
    let mut replayer = Replayer::open_from(&dir, &start).unwrap();
    let opts = ReplayOptions::default();
    let mut session = replayer.start(&opts).unwrap();
    let (mut refused_after_interrupt, mut taken) = (0, 0);
    loop {
        let consumed = session.events_consumed();
        if let Turn::Ended(end) = replayer.turn(&mut session, &opts).unwrap() {
            assert!(
                matches!(end, krr_engine::replay::ReplayEnd::Matched),
                "{end:?}"
            );
            break;
        }
        let snapshot = replayer.snapshot(&session, &start).unwrap();
        let interrupt_consumed = session.events_consumed() == consumed + 1
            && session
                .recent_events()
                .last()
                .is_some_and(|e| e.contains(" interrupt "));
        if interrupt_consumed {
            assert!(snapshot.is_none(), "a snapshot with an interrupt queued");
            refused_after_interrupt += 1;
        } else if snapshot.is_some() {
            taken += 1;
        }
    }
    assert!(refused_after_interrupt > 0, "no interrupt was injected");
    assert!(taken > 0, "no snapshot was taken anywhere");
}
