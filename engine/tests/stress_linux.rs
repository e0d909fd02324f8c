// SPDX-License-Identifier: GPL-2.0-or-later
//! stress-ng stressors that only compute (`cpu`, `memcpy`, `hsearch`) and,
//! on 2 vCPUs, `pipe`, stop at their `--timeout 1s` while recorded (within
//! 2 virtual seconds of the command's start) and replay with zero
//! divergence. Before timer interrupts reached user code, none of them
//! stopped: they ran until the instruction budget.
//!
//! Needs `KRR_AGENT_KERNEL` (the `-krr` bzImage) and `KRR_TEST_ROOTFS` (the
//! `rootfs-workloads` image), both set by `cargo xtask test`.

#[path = "common/guest_images.rs"]
mod guest_images;

#[path = "common/krr_command.rs"]
mod krr_command;

use krr_command::{count, krr, stats_json};
use krr_engine::harness::{validate_stressor, StressorRun};
use std::path::PathBuf;

/// The `-krr` kernel and the workloads rootfs.
fn images() -> Option<(PathBuf, PathBuf)> {
    let [kernel, rootfs] = guest_images::image_files(["KRR_AGENT_KERNEL", "KRR_TEST_ROOTFS"])?;
    Some((kernel, rootfs))
}

fn stops_in_time_and_replays(stressor: &str, vcpus: usize) {
    let Some((kernel, rootfs)) = images() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = StressorRun {
        seconds: 1,
        vcpus,
        checkpoint_every: 0,
        max_record_seconds: 0,
        keep: false,
    };
    let r = validate_stressor(&kernel, &rootfs, dir.path(), stressor, run);
    println!("{r:?}");
    assert_eq!(r.outcome, "passed", "{stressor} on {vcpus} vCPU(s): {r:?}");
    let seconds = r.virtual_seconds.expect("the command's virtual time");
    assert!(
        (1.0..=2.0).contains(&seconds),
        "{stressor} on {vcpus} vCPU(s) took {seconds} virtual s with --timeout 1s"
    );
}

#[test]
fn stress_ng_cpu_stops_at_its_timeout() {
    stops_in_time_and_replays("cpu", 1);
}

#[test]
fn stress_ng_memcpy_stops_at_its_timeout() {
    stops_in_time_and_replays("memcpy", 1);
}

#[test]
fn stress_ng_hsearch_stops_at_its_timeout() {
    stops_in_time_and_replays("hsearch", 1);
}

#[test]
fn stress_ng_pipe_on_two_vcpus_stops_at_its_timeout() {
    stops_in_time_and_replays("pipe", 2);
}

/// Stressors whose replays diverged until their causes were fixed: clone
/// (a PTE read logged with the loaded, borrowed address space), madvise
/// (smaps reads accessed/dirty bits), memfd (a name too long for
/// memfd_create, measured by strnlen_user and never copied), rmap (replay
/// set a dirty bit from a read made after the kernel rewrote the entry,
/// and rmap's writeback cleaned two PTEs more than recorded).
#[test]
fn stress_ng_clone_madvise_memfd_and_rmap_replay() {
    for stressor in ["clone", "madvise", "memfd", "rmap"] {
        stops_in_time_and_replays(stressor, 1);
    }
}

/// A stressor still running at the recording's wall-time limit: the
/// recording stops there and what it holds replays (outcome `cut`), so a
/// stressor too slow for the validation table cannot stall it.
#[test]
fn a_stressor_past_the_wall_time_limit_is_cut_and_its_recording_replays() {
    let Some((kernel, rootfs)) = images() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // 60 guest seconds of cpu take far more than 15 host seconds here; the
    // recording starts at /init, a few seconds in even on a loaded host.
    let run = StressorRun {
        seconds: 60,
        vcpus: 1,
        checkpoint_every: 0,
        max_record_seconds: 15,
        keep: false,
    };
    let r = validate_stressor(&kernel, &rootfs, dir.path(), "cpu", run);
    println!("{r:?}");
    assert_eq!(r.outcome, "cut", "{r:?}");
    assert!(r.detail.contains("15-s wall-time limit"), "{r:?}");
    assert!(r.events > 0 && r.kernel_entries > 0, "{r:?}");
}

/// io_uring: the kernel reads the SQEs, the SQ index array and the rings'
/// heads and tails with plain loads from pages user space maps and writes;
/// replay runs no user code, so it has those bytes only from the agent's
/// shared-read records. Without them the stressor's replay diverged.
///
/// On 2 vCPUs user code on one vCPU refills the buffers the kernel copies
/// on the other between its slices: a later read of the same bytes, read
/// ahead for a slice that ended inside the agent's hook, replaced what
/// the slice had read (replay diverged in krr_agent_get_user).
#[test]
fn stress_ng_io_uring_replays_its_shared_ring_reads() {
    stops_in_time_and_replays("io-uring", 1);
    stops_in_time_and_replays("io-uring", 2);
    let Some((kernel, rootfs)) = images() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (k, d) = (kernel.display().to_string(), rootfs.display().to_string());
    let out = krr(
        dir.path(),
        &[
            "record",
            "--quiet",
            "--backend",
            "tcg",
            "--kernel",
            &k,
            "--disk",
            &d,
            "--name",
            "uring",
            "--start=marker:KRR-WINDOW-BEGIN",
            "--run",
            "echo KRR-WINDOW''-BEGIN; stress-ng --io-uring 1 --io-uring-ops 200",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let stats = stats_json(dir.path(), "uring");
    // An SQE and the SQ tail at least per operation.
    assert!(count(&stats, "shared_read") > 400, "{stats:#}");
    let out = krr(dir.path(), &["replay", "--json", "--quiet", "uring"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("replay JSON");
    assert_eq!(report["end"]["kind"], "matched", "{report:#}");
}

/// Recording two vCPUs that fork and pipe costs about what running them
/// does: a vCPU that spins on a lock (the guest agent's ring lock, taken
/// on every recorded kernel entry) held by a vCPU whose turn has ended
/// yields its own turn. Before that, the spinner spun out its quantum:
/// 3.4 times the instructions, and the eval's 2-vCPU cells timed out.
/// Instruction counts of the software CPU are exact, so the ratio is the
/// same on every host.
#[test]
fn recording_two_vcpus_that_fork_costs_about_what_running_does() {
    let Some((kernel, rootfs)) = images() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (k, d) = (kernel.display().to_string(), rootfs.display().to_string());
    let command = "echo KRR-WINDOW''-BEGIN; stress-ng --fork 2 --fork-ops 300 --pipe 2 \
                   --pipe-ops 20000; echo KRR-WINDOW''-END";
    let machine = [
        "--json",
        "--quiet",
        "--backend",
        "tcg",
        "--kernel",
        &k,
        "--disk",
        &d,
        "--vcpus",
        "2",
        "--max-seconds",
        "300",
        "--run",
        command,
    ];
    let window = |out: &std::process::Output| -> u64 {
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("a JSON report on stdout");
        assert_eq!(out.status.code(), Some(0), "{report}");
        report["run"]["window"]["instructions"]
            .as_u64()
            .or_else(|| report["window"]["instructions"].as_u64())
            .unwrap_or_else(|| panic!("no window in {report}"))
    };
    let run = window(&krr(dir.path(), &[&["run"][..], &machine].concat()));
    let recorded = window(&krr(
        dir.path(),
        &[
            &[
                "record",
                "--name",
                "fork",
                "--start=marker:KRR-WINDOW-BEGIN",
            ][..],
            &["--stop=marker:KRR-WINDOW-END"],
            &machine,
        ]
        .concat(),
    ));
    let ratio = recorded as f64 / run as f64;
    println!("window instructions: run {run}, recorded {recorded} ({ratio:.2}x)");
    assert!(ratio < 1.5, "recording took {ratio:.2}x the instructions");
    let out = krr(dir.path(), &["replay", "--json", "--quiet", "fork"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("replay JSON");
    assert_eq!(report["end"]["kind"], "matched", "{report}");
}

/// A recording with a disk: the root filesystem is read by DMA
/// (virtio-blk) from boot on, the bytes go to the recording's DMA stream,
/// and the replay, which has no disk, writes them where the device did and
/// matches to the end.
#[test]
fn a_recording_with_a_disk_replays_its_dma() {
    let Some((kernel, rootfs)) = images() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (k, d) = (kernel.display().to_string(), rootfs.display().to_string());
    let out = krr(
        dir.path(),
        &[
            "record",
            "--quiet",
            "--backend",
            "tcg",
            "--kernel",
            &k,
            "--disk",
            &d,
            "--name",
            "disk",
            "--run",
            "md5sum /usr/bin/stress-ng",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let stats = stats_json(dir.path(), "disk");
    let dma_events = count(&stats, "dma");
    assert!(dma_events > 100, "{stats:#}");
    // stress-ng alone is several MiB.
    assert!(
        stats["dma_bytes"].as_u64().unwrap() > 1 << 20,
        "the binary was read from the disk: {stats:#}"
    );
    let out = krr(dir.path(), &["replay", "--json", "--quiet", "disk"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("replay JSON");
    assert_eq!(report["end"]["kind"], "matched", "{report:#}");
    assert_eq!(report["console_matches"], true, "{report:#}");
}
