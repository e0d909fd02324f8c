// SPDX-License-Identifier: GPL-2.0-or-later
//! `krr record` of the project's `-krr` kernel on the software CPU, checked
//! with `krr log`: plausible event counts for a syscall-heavy program, a
//! verifiable and replayable prefix after kill -9 (at 20 moments), a flipped byte reported with its offset,
//! two recordings in one VM run, SIGINT finishing the recording, and an
//! unpatched kernel refused with "agent not found".
//!
//! Needs `KRR_AGENT_KERNEL` (the `-krr` bzImage), `KRR_TEST_KERNEL` (the
//! plain one) and `KRR_TEST_INITRD` (set by `cargo xtask test`).

#[path = "common/guest_images.rs"]
mod guest_images;
#[path = "common/krr_command.rs"]
mod krr_command;

use krr_command::{count, krr, krr_command, stats_json};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

const APPEND: &str = "console=ttyS0 nokaslr noapic nolapic acpi=off tsc=reliable no_timer_check mitigations=off pci=off panic=-1 rdinit=/init";

/// `krr record` arguments for `kernel` running `run` in the guest.
fn record_args(kernel: &Path, initrd: &Path, name: &str, run: &str) -> Vec<String> {
    vec![
        "record".into(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--backend".into(),
        "tcg".into(),
        "--quiet".into(),
        "--name".into(),
        name.into(),
        "--append".into(),
        format!("{APPEND} krr.run=\"{run}\""),
    ]
}

fn run_krr(recordings: &Path, args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    krr(recordings, &args)
}

fn log_cmd(recordings: &Path, args: &[&str]) -> Output {
    let args: Vec<String> = std::iter::once("log".to_string())
        .chain(args.iter().map(|s| s.to_string()))
        .collect();
    run_krr(recordings, &args)
}

fn images() -> Option<(PathBuf, PathBuf)> {
    guest_images::guest_images("KRR_AGENT_KERNEL")
}

#[test]
fn records_a_syscall_heavy_program_with_every_event_class() {
    let Some((kernel, initrd)) = images() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = run_krr(
        dir.path(),
        &record_args(&kernel, &initrd, "loop", "syscall-loop 2000"),
    );
    assert!(out.status.success(), "krr record failed");
    let verify = log_cmd(dir.path(), &["verify", "loop"]);
    assert!(verify.status.success(), "krr log verify failed");
    assert!(String::from_utf8_lossy(&verify.stdout).contains("OK"));

    let stats = stats_json(dir.path(), "loop");
    // 2000 iterations x 12 syscalls, plus the shell's and init's.
    let syscalls = count(&stats, "syscall");
    assert!(
        (24_000..60_000).contains(&syscalls),
        "syscalls {syscalls} not plausible for syscall-loop 2000"
    );
    for class in [
        "copy_from_user",
        "strncpy_from_user",
        "get_user",
        "rdtsc_engine",
        "pte_read",
        "interrupt",
        "exception",
        "pio_read",
        "console",
    ] {
        assert!(count(&stats, class) > 0, "no {class} events: {stats:#}");
    }
    // The software CPU's engine logs every RDTSC (with its position) and
    // tells the agent so: the agent logs none of its own.
    assert_eq!(
        count(&stats, "rdtsc"),
        0,
        "the agent logged RDTSC twice: {stats:#}"
    );
    // Each iteration writes 64 bytes into a pipe: one copy_from_user at least.
    assert!(count(&stats, "copy_from_user") >= 2000);
    string_reads_carry_the_word_with_the_nul(&dir.path().join("loop"));

    let dump = log_cmd(
        dir.path(),
        &["dump", "loop", "--from", "10", "--count", "5"],
    );
    assert!(dump.status.success());
    let text = String::from_utf8_lossy(&dump.stdout);
    assert_eq!(
        text.lines().filter(|l| l.starts_with('#')).count(),
        5,
        "{text}"
    );
    assert!(text.contains("#10 "), "{text}");
}

/// strncpy_from_user and strnlen_user read a word at a time: the agent logs
/// the word the NUL was found in from the NUL to the word's end (replay must
/// put the bytes after the NUL back, they reach the kernel's registers).
fn string_reads_carry_the_word_with_the_nul(recording: &Path) {
    use krr_engine::record::abi::{EventBody, MAX_DATA_PER_EVENT};
    let mut reader = krr_engine::record::log::EventLogReader::open(
        &recording.join(krr_engine::record::recording::EVENTS_FILE),
    )
    .unwrap();
    let (mut strncpy_words, mut strnlen_words) = (0, 0);
    while let Some(read) = reader.next_event().unwrap() {
        let Some(Ok(e)) = read.event.agent_event() else {
            continue;
        };
        let (info, data, words) = match &e.body {
            EventBody::StrncpyFromUser { info, data } => (info, data, &mut strncpy_words),
            EventBody::StrnlenUser { info, data } => (info, data, &mut strnlen_words),
            _ => continue,
        };
        // strncpy: the NUL is at `result`, words count from the string's
        // start; strnlen: at `result - 1`, words are aligned.
        let (nul, word_base) = match e.body {
            EventBody::StrncpyFromUser { .. } => (info.result, 0),
            _ => (info.result - 1, info.user_addr),
        };
        // The chunk that holds the NUL (strncpy: the string's last chunk
        // with the word appended; strnlen: the word alone).
        let (from, to) = (info.offset, info.offset + data.len() as u64);
        if !(from..to).contains(&(nul as u64)) {
            continue;
        }
        *words += 1;
        assert_eq!(
            data[(nul as u64 - from) as usize],
            0,
            "no NUL at the result: {e}"
        );
        assert!(
            (1..=8).contains(&(to - nul as u64)) && word_base.wrapping_add(to) % 8 == 0,
            "the logged bytes end with the NUL's word: {e}"
        );
        // One record per string (up to the longest a record holds): the
        // string's bytes and the NUL's word together.
        if matches!(e.body, EventBody::StrncpyFromUser { .. }) {
            assert!(
                from == 0 || info.result as u64 + 8 > u64::from(MAX_DATA_PER_EVENT),
                "a short string's NUL word is in a record of its own: {e}"
            );
        }
    }
    assert!(
        strncpy_words > 0 && strnlen_words > 0,
        "words with a NUL: strncpy {strncpy_words}, strnlen {strnlen_words}"
    );
}

/// (offset, compressed payload length) of the valid chunks of a `.krrlog`.
fn chunks(path: &Path) -> Vec<(u64, u64)> {
    krr_engine::record::log::scan(path)
        .expect("scanning the event log")
        .chunks
        .iter()
        .map(|c| (c.offset, u64::from(c.compressed_len)))
        .collect()
}

#[test]
fn flipped_byte_and_kill_9_are_reported() {
    let Some((kernel, initrd)) = images() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // kill -9 in the middle of a long recording.
    let mut child = krr_command(dir.path())
        .args(record_args(
            &kernel,
            &initrd,
            "killed",
            "syscall-loop 100000",
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let events = dir.path().join("killed/events.krrlog");
    let t0 = Instant::now();
    while std::fs::metadata(&events).map(|m| m.len()).unwrap_or(0) < 2 << 20 {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the recording did not grow to 2 MiB in 5 minutes"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "krr record ended early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!dir.path().join("killed/end.json").exists());
    let verify = log_cmd(dir.path(), &["verify", "killed"]);
    assert_eq!(verify.status.code(), Some(1), "an unfinished log exits 1");
    let text = String::from_utf8_lossy(&verify.stdout).to_string();
    assert!(text.contains("PREFIX VALID"), "{text}");
    let stats = stats_json(dir.path(), "killed");
    assert!(count(&stats, "syscall") > 1000, "{stats:#}");

    // A flipped byte in the middle of the payload of a chunk past the first
    // few (which are small: flushed before much was recorded).
    let all = chunks(&events);
    let &(chunk_offset, payload) = all
        .iter()
        .skip(2)
        .find(|c| c.1 > 1000)
        .expect("a chunk of more than 1000 bytes");
    let target = chunk_offset + krr_engine::record::log::CHUNK_HEADER_LEN as u64 + payload / 2;
    let mut bytes = std::fs::read(&events).unwrap();
    bytes[target as usize] ^= 0x40;
    std::fs::write(&events, &bytes).unwrap();
    let verify = log_cmd(dir.path(), &["verify", "killed"]);
    assert_eq!(verify.status.code(), Some(2), "a damaged log exits 2");
    let text = String::from_utf8_lossy(&verify.stdout).to_string();
    assert!(text.contains("DAMAGED"), "{text}");
    assert!(
        text.contains(&format!("byte offset {chunk_offset} ")),
        "the damaged chunk's offset {chunk_offset} is not named: {text}"
    );
}

/// kill -9 of `krr record` at 20 moments drawn from a seed (printed; set
/// `KRR_KILL_SEED` to draw the same moments again): every prefix left
/// behind verifies as a cut log and replays with no divergence, up to the
/// kernel stint it ends in, with the recorded console.
#[test]
fn kill_9_at_twenty_moments_leaves_replayable_prefixes() {
    let Some((kernel, initrd)) = images() else {
        return;
    };
    let seed: u64 = std::env::var("KRR_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("kill moments from KRR_KILL_SEED={seed}");
    // xorshift64*: enough to spread the moments, and std only.
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let dir = tempfile::tempdir().unwrap();
    for moment in 0..20 {
        // A moment: the event log's size when the kill comes, up to 1 MiB
        // (about half a second of syscall-loop), plus up to 50 ms more.
        let at_bytes = 1 + next() % (1 << 20);
        let extra = Duration::from_millis(next() % 50);
        let name = format!("killed-{moment}");
        let mut args = record_args(&kernel, &initrd, &name, "syscall-loop 100000");
        args.push("--start=marker:Run /init as init process".into());
        let mut child = krr_command(dir.path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let events = dir.path().join(&name).join("events.krrlog");
        let t0 = Instant::now();
        while std::fs::metadata(&events).map(|m| m.len()).unwrap_or(0) < at_bytes {
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "moment {moment}: the log did not reach {at_bytes} bytes in 5 minutes"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "moment {moment}: krr record ended early"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(extra);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let what = format!("moment {moment} (log at {at_bytes} bytes + {extra:?}, seed {seed})");
        assert!(!dir.path().join(&name).join("end.json").exists(), "{what}");
        let verify = log_cmd(dir.path(), &["verify", &name]);
        let text = String::from_utf8_lossy(&verify.stdout).to_string();
        assert_eq!(verify.status.code(), Some(1), "{what}: {text}");
        assert!(text.contains("PREFIX VALID"), "{what}: {text}");
        let replay = run_krr(
            dir.path(),
            &["replay".into(), name.clone(), "--json".into()],
        );
        let report: serde_json::Value = serde_json::from_slice(&replay.stdout)
            .unwrap_or_else(|e| panic!("{what}: replay printed no JSON: {e}"));
        // Up to the kernel stint the log ends in (its agent records may not
        // have been drained), with no divergence.
        assert_eq!(report["end"]["kind"], "log_ended", "{what}: {report:#}");
        assert!(
            report["end"]["why"]
                .as_str()
                .is_some_and(|w| w.contains("did not finish")),
            "{what}: {report:#}"
        );
        assert_eq!(report["console_matches"], true, "{what}: {report:#}");
        std::fs::remove_dir_all(dir.path().join(&name)).unwrap();
    }
}

#[test]
fn two_recordings_in_one_run_started_and_stopped_by_the_guest() {
    let Some((kernel, initrd)) = images() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = "echo start > /proc/krr_agent; syscall-loop 300; echo stop > /proc/krr_agent; \
               echo start > /proc/krr_agent; syscall-loop 500; echo stop > /proc/krr_agent";
    let mut args = record_args(&kernel, &initrd, "pair", run);
    args.extend(["--start", "guest", "--stop", "guest"].map(String::from));
    let out = run_krr(dir.path(), &args);
    assert!(out.status.success());
    let mut syscalls = Vec::new();
    for name in ["pair", "pair-2"] {
        let verify = log_cmd(dir.path(), &["verify", name]);
        assert!(verify.status.success(), "verify {name}");
        syscalls.push(count(&stats_json(dir.path(), name), "syscall"));
    }
    assert!(!dir.path().join("pair-3").exists());
    // 12 syscalls per iteration; the shell's echo adds a few.
    assert!((3_600..5_000).contains(&syscalls[0]), "{syscalls:?}");
    assert!((6_000..8_000).contains(&syscalls[1]), "{syscalls:?}");
}

#[test]
fn sigint_finishes_the_recording() {
    let Some((kernel, initrd)) = images() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut child = krr_command(dir.path())
        .args(record_args(&kernel, &initrd, "int", "syscall-loop 100000"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let events = dir.path().join("int/events.krrlog");
    let t0 = Instant::now();
    while std::fs::metadata(&events).map(|m| m.len()).unwrap_or(0) < 1 << 20 {
        assert!(t0.elapsed() < Duration::from_secs(300));
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: plain kill(2) of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "SIGINT ends krr record with 130");
    let end: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("int/end.json")).unwrap()).unwrap();
    assert!(
        end["reason"].as_str().unwrap().contains("SIGINT"),
        "{end:#}"
    );
    let verify = log_cmd(dir.path(), &["verify", "int"]);
    assert!(verify.status.success());
}

#[test]
fn unpatched_kernel_is_refused_with_agent_not_found() {
    let Some((plain, initrd)) = guest_images::guest_images("KRR_TEST_KERNEL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let out = run_krr(
        dir.path(),
        &record_args(&plain, &initrd, "plain", "syscall-loop 100000"),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("agent not found"), "{stderr}");
    // Refused at /init, long before the 100000-iteration loop would end.
    assert!(t0.elapsed() < Duration::from_secs(120));
}

/// The disk fills during a recording (a file size limit stands in for a
/// full disk: writes past it fail with EFBIG, as on a full one with
/// ENOSPC): the run ends with an error naming the file and the cause, and
/// what was written verifies as a cut log and replays up to its end.
#[test]
fn a_full_disk_ends_the_recording_naming_the_file_and_leaves_a_replayable_prefix() {
    let Some((kernel, initrd)) = images() else {
        return;
    };
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    // Above the start snapshot's memory image (about 8 MB for 512 MiB), well
    // below the log of 100,000 loops (about 19 MB).
    const LIMIT: u64 = 12_000_000;
    let mut cmd = krr_command(dir.path());
    cmd.args(record_args(&kernel, &initrd, "full", "syscall-loop 100000"));
    // SAFETY: between fork and exec only async-signal-safe calls
    // (setrlimit, signal) on the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Writes past the limit fail with EFBIG instead of killing.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{stderr}");
    // The chunk writer or the periodic flush, whichever reaches the limit
    // first (it depends on the host's speed).
    assert!(
        (stderr.contains("recording failed: writing")
            || stderr.contains("recording failed: flushing"))
            && stderr.contains("full/events.krrlog: File too large"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("ERROR").count(),
        1,
        "the failure is reported once: {stderr}"
    );
    let verify = log_cmd(dir.path(), &["verify", "full"]);
    let text = String::from_utf8_lossy(&verify.stdout).to_string();
    assert!(text.contains("PREFIX VALID"), "{text}");
    let replay = run_krr(
        dir.path(),
        &["replay".into(), "full".into(), "--json".into()],
    );
    let report: serde_json::Value = serde_json::from_slice(&replay.stdout).unwrap_or_else(|e| {
        panic!(
            "replay printed no JSON ({e}): {}",
            String::from_utf8_lossy(&replay.stderr)
        )
    });
    assert_eq!(report["end"]["kind"], "log_ended", "{report:#}");
    assert!(report["events"].as_u64().unwrap() > 100_000, "{report:#}");
    assert_eq!(report["console_matches"], true, "{report:#}");
}
