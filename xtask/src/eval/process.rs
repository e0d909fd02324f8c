// SPDX-License-Identifier: GPL-2.0-or-later
//! One guest process of a cell (`krr run`, `krr record`, `krr replay`,
//! QEMU): started, its output lines stamped with the host time they
//! arrived at, stopped at its timeout or forwarded a Ctrl-C.

use anyhow::{Context, Result};
use nix::sys::signal::{killpg, signal, SigHandler, Signal};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A line of the process's output and when it arrived (seconds after the
/// process was started).
#[derive(Debug, Clone)]
pub struct Line {
    pub at: f64,
    pub text: String,
}

#[derive(Debug)]
pub struct Finished {
    /// `None` when the process was killed at its timeout.
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    /// Whether Ctrl-C arrived while it ran.
    pub interrupted: bool,
    pub wall_seconds: f64,
    pub stdout: Vec<Line>,
    pub stderr: Vec<Line>,
}

impl Finished {
    /// Both streams' lines in arrival order.
    pub fn lines(&self) -> Vec<&Line> {
        let mut all: Vec<&Line> = self.stdout.iter().chain(&self.stderr).collect();
        all.sort_by(|a, b| a.at.total_cmp(&b.at));
        all
    }

    /// When the first line that is exactly `marker` (console lines may
    /// carry a `\r`) arrived on either stream.
    pub fn marker_at(&self, marker: &str) -> Option<f64> {
        self.lines()
            .into_iter()
            .find(|l| l.text.trim() == marker)
            .map(|l| l.at)
    }

    /// The last `n` non-empty lines of both streams, for a failure report.
    pub fn last_lines(&self, n: usize) -> Vec<String> {
        let lines: Vec<String> = self
            .lines()
            .into_iter()
            .map(|l| l.text.trim_end().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        lines[lines.len().saturating_sub(n)..].to_vec()
    }

    /// The JSON object on the last non-empty line of stdout (what `krr
    /// ... --json` prints).
    pub fn json(&self) -> Option<serde_json::Value> {
        let last = self
            .stdout
            .iter()
            .rev()
            .find(|l| !l.text.trim().is_empty())?;
        serde_json::from_str::<serde_json::Value>(&last.text)
            .ok()
            .filter(serde_json::Value::is_object)
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        for l in self.lines() {
            s.push_str(&l.text);
            s.push('\n');
        }
        s
    }

    /// `exit status 3`, `killed by signal 9`, or `timed out`.
    pub fn describe(&self) -> String {
        match (self.timed_out, self.status) {
            (true, _) => "timed out".into(),
            (false, Some(s)) => s.to_string(),
            (false, None) => "no exit status".into(),
        }
    }
}

/// Reads `stream` line by line into `into`, stamping each line.
fn collect(
    stream: impl Read + Send + 'static,
    start: Instant,
    into: Arc<Mutex<Vec<Line>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    let at = start.elapsed().as_secs_f64();
                    if let Ok(mut v) = into.lock() {
                        v.push(Line { at, text });
                    }
                }
            }
        }
    })
}

/// How long a process gets after a forwarded Ctrl-C to finish its files
/// (a recording is closed at the next point every vCPU stops).
const GRACE_AFTER_INTERRUPT: Duration = Duration::from_secs(60);

/// Runs `cmd` to its end or `timeout`, in a process group of its own so
/// that a timeout stops whatever it started too; `interrupt` (set by
/// Ctrl-C) is forwarded to the group as SIGINT.
pub fn run(mut cmd: Command, timeout: Duration, interrupt: &AtomicBool) -> Result<Finished> {
    let shown = format!("{cmd:?}");
    let start = Instant::now();
    // SAFETY: the closure runs in the forked child before exec and only
    // calls signal(2), which is async-signal-safe. A process started with
    // SIGINT ignored (`nohup ... &`) would pass that on and ignore the
    // Ctrl-C forwarded below.
    unsafe {
        cmd.pre_exec(|| {
            signal(Signal::SIGINT, SigHandler::SigDfl)
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child: Child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        collect(
            child.stdout.take().expect("piped stdout"),
            start,
            stdout.clone(),
        ),
        collect(
            child.stderr.take().expect("piped stderr"),
            start,
            stderr.clone(),
        ),
    ];
    // The child leads its group: the group id is its pid.
    let pid = Pid::from_raw(child.id() as i32);
    let mut interrupted_at: Option<Instant> = None;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for a guest process")? {
            break Some(status);
        }
        if interrupt.load(Ordering::SeqCst) && interrupted_at.is_none() {
            let _ = killpg(pid, Signal::SIGINT);
            interrupted_at = Some(Instant::now());
        }
        let overdue = start.elapsed() > timeout
            || interrupted_at.is_some_and(|t| t.elapsed() > GRACE_AFTER_INTERRUPT);
        if overdue {
            timed_out = interrupted_at.is_none();
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let wall_seconds = start.elapsed().as_secs_f64();
    for r in readers {
        let _ = r.join();
    }
    let take = |v: Arc<Mutex<Vec<Line>>>| std::mem::take(&mut *v.lock().expect("reader done"));
    Ok(Finished {
        status,
        timed_out,
        interrupted: interrupted_at.is_some(),
        wall_seconds,
        stdout: take(stdout),
        stderr: take(stderr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn lines_are_stamped_in_arrival_order() {
        let quiet = AtomicBool::new(false);
        let f = run(
            sh("echo a >&2; echo KRR-WINDOW-BEGIN; sleep 0.3; printf 'KRR-WINDOW-END\\r\\n'; exit 3"),
            Duration::from_secs(10),
            &quiet,
        )
        .unwrap();
        assert_eq!(f.status.and_then(|s| s.code()), Some(3));
        let (b, e) = (
            f.marker_at("KRR-WINDOW-BEGIN").unwrap(),
            f.marker_at("KRR-WINDOW-END").unwrap(),
        );
        // Lines of one stream keep their order; across the two streams the
        // stamps are only as exact as the readers' wakeups.
        assert!(e - b >= 0.2, "{b} {e}");
        assert_eq!(f.last_lines(1), ["KRR-WINDOW-END"], "{:?}", f.lines());
        assert_eq!(f.stderr[0].text, "a");
    }

    #[test]
    fn a_process_past_its_timeout_is_killed() {
        let quiet = AtomicBool::new(false);
        let f = run(sh("echo up; sleep 30"), Duration::from_millis(300), &quiet).unwrap();
        assert!(f.timed_out && f.status.is_none());
        assert!(f.wall_seconds < 10.0);
        assert_eq!(f.describe(), "timed out");
    }

    #[test]
    fn ctrl_c_is_forwarded() {
        let interrupt = AtomicBool::new(false);
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("trap-set");
        let script = format!(
            "trap 'echo got-int; exit 130' INT; touch {}; sleep 20 >/dev/null 2>&1 & wait",
            ready.display()
        );
        let f = thread::scope(|s| {
            s.spawn(|| {
                // Once the shell has set its trap (however loaded the host).
                while !ready.exists() {
                    thread::sleep(Duration::from_millis(20));
                }
                interrupt.store(true, Ordering::SeqCst);
            });
            run(sh(&script), Duration::from_secs(60), &interrupt).unwrap()
        });
        assert!(f.interrupted && !f.timed_out);
        assert_eq!(
            f.status.and_then(|s| s.code()),
            Some(130),
            "{:?}",
            f.lines()
        );
    }
}
