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

use krr_engine::harness::validate_stressor;
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
    let r = validate_stressor(&kernel, &rootfs, dir.path(), stressor, 1, vcpus);
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
