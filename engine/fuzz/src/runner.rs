// SPDX-License-Identifier: GPL-2.0-or-later
//! The fuzz loop of one target: mutants of the corpus (and of mutants that
//! met a refusal not seen before) for a time budget, each checked for
//! panics, time and allocation; crashes saved with how to reproduce them.

use crate::{alloc_measure, alloc_reset, load_corpus, mutate, Input, Target, ALLOC_LIMIT};
use anyhow::{Context, Result};
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64Mcg;
use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One run of one target.
#[derive(Debug, Clone)]
pub struct Config {
    pub target: Target,
    pub seconds: f64,
    pub seed: u64,
    pub corpus: PathBuf,
    /// Crashes go to `out/crash-<target>-<n>/`; the input being run lives
    /// in `out/work-<target>/`.
    pub out: PathBuf,
    /// An input running longer than this is a hang (the run stops).
    pub input_timeout: Duration,
}

/// How a run went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub target: String,
    pub seed: u64,
    pub seconds: f64,
    pub inputs: u64,
    pub accepted: u64,
    pub refused: u64,
    /// Refusals that differ once numbers are blanked out.
    pub distinct_errors: usize,
    pub crashes: u64,
    pub saved: Vec<PathBuf>,
}

/// What one input did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Refused(String),
    /// A panic, or an allocation over [`ALLOC_LIMIT`].
    Crash(String),
}

static PANIC: Mutex<Option<String>> = Mutex::new(None);

thread_local! {
    /// Set while this thread runs a target under [`check`].
    static IN_CHECK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Panics of a target are outcomes: note the message and where, print
/// nothing. Other panics (a test's assertion) go to the hook before.
pub fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_CHECK.with(|c| c.get()) {
                return previous(info);
            }
            let at = info
                .location()
                .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            *PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("panic{at}: {msg}"));
        }));
    });
}

/// Runs `target` once on `input` in the empty folder `work`.
pub fn check(target: Target, input: &Input, work: &Path) -> Outcome {
    quiet_panics();
    let base = alloc_reset();
    IN_CHECK.with(|c| c.set(true));
    let result = catch_unwind(AssertUnwindSafe(|| target.run(input, work)));
    IN_CHECK.with(|c| c.set(false));
    let (largest, peak) = alloc_measure(base);
    match result {
        Err(payload) => {
            let noted = PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
            Outcome::Crash(noted.unwrap_or_else(|| {
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "panic".into())
            }))
        }
        Ok(_) if largest > ALLOC_LIMIT || peak > 2 * ALLOC_LIMIT => Outcome::Crash(format!(
            "allocation: largest request {largest} bytes, peak {peak} bytes live (limit {ALLOC_LIMIT} per request) for a {}-byte input",
            input.bytes()
        )),
        Ok(Ok(())) => Outcome::Accepted,
        Ok(Err(e)) => Outcome::Refused(e),
    }
}

/// `e` with the work folder's path, quoted strings, byte lists and every
/// number blanked, to count kinds of refusal rather than values.
fn shape(e: &str, work: &Path) -> String {
    let e = e.replace(&*work.to_string_lossy(), "<input>");
    let mut out = String::new();
    // `closing`: the character that ends the quoted string or list we are in.
    let (mut in_number, mut closing, mut escaped) = (false, None, false);
    for c in e.chars() {
        let was_escaped = escaped;
        escaped = c == '\\' && !was_escaped;
        match closing {
            Some(end) if c == end && !was_escaped => {
                closing = None;
                out.push('…');
                out.push(c);
            }
            Some(_) => {}
            None if c == '"' || c == '[' => {
                closing = Some(if c == '"' { '"' } else { ']' });
                out.push(c);
            }
            None => {
                let digit = c.is_ascii_hexdigit() && (in_number || c.is_ascii_digit());
                let hex_prefix = in_number && c == 'x';
                if !digit && !hex_prefix {
                    out.push(c);
                } else if digit && !in_number {
                    out.push('#');
                }
                in_number = digit || hex_prefix;
            }
        }
    }
    out.chars().take(160).collect()
}

/// Empties (or creates) `dir`.
fn fresh(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::create_dir_all(dir)
}

/// Saves `input` with its story as `out/<name>/`.
fn save(out: &Path, name: &str, input: &Input, story: &str) -> Result<PathBuf> {
    let dir = out.join(name);
    fresh(&dir)?;
    input.write_to(&dir)?;
    std::fs::write(dir.join(crate::REPRO_FILE), story)?;
    Ok(dir)
}

/// The per-input time limit: a thread that, when one input has run too
/// long, saves it and ends the process (a stuck reader cannot be unwound).
struct Watchdog {
    started_ms: Arc<AtomicU64>,
    busy: Arc<AtomicBool>,
    story: Arc<Mutex<String>>,
}

impl Watchdog {
    fn start(cfg: &Config, work: PathBuf, epoch: Instant) -> Watchdog {
        let w = Watchdog {
            started_ms: Arc::new(AtomicU64::new(0)),
            busy: Arc::new(AtomicBool::new(false)),
            story: Arc::new(Mutex::new(String::new())),
        };
        let (started_ms, busy, story) = (w.started_ms.clone(), w.busy.clone(), w.story.clone());
        let (limit, out, name) = (cfg.input_timeout, cfg.out.clone(), cfg.target.name());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let ran = epoch.elapsed().as_millis() as u64 - started_ms.load(Ordering::Relaxed);
            if busy.load(Ordering::Relaxed) && ran > limit.as_millis() as u64 {
                let story = format!(
                    "hang: still running after {} s\n{}",
                    limit.as_secs_f64(),
                    story.lock().unwrap_or_else(|e| e.into_inner())
                );
                let saved = Input::load(&work, None)
                    .map_err(anyhow::Error::from)
                    .and_then(|input| save(&out, &format!("hang-{name}"), &input, &story));
                eprintln!("fuzz {name}: {story}saved as {saved:?}");
                std::process::exit(3);
            }
        });
        w
    }
}

/// Runs `cfg.target` for `cfg.seconds`; crashes are counted and saved, not
/// returned as errors.
pub fn run(cfg: &Config) -> Result<Summary> {
    quiet_panics();
    let name = cfg.target.name();
    let seeds = load_corpus(&cfg.corpus, cfg.target)
        .with_context(|| format!("loading the {name} corpus"))?;
    anyhow::ensure!(
        !seeds.is_empty(),
        "no seeds for {name} under {}/{} (regenerate with `krr-fuzz seed`)",
        cfg.corpus.display(),
        cfg.target.corpus()
    );
    let work = cfg.out.join(format!("work-{name}"));
    let epoch = Instant::now();
    let watchdog = Watchdog::start(cfg, work.clone(), epoch);
    // The pool: seeds, then mutants that met a refusal not seen before
    // (a cheap stand-in for coverage: they got somewhere new).
    let mut pool: Vec<(String, Input)> = seeds;
    let seeds_len = pool.len();
    let mut shapes: BTreeSet<String> = BTreeSet::new();
    let mut crash_kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut s = Summary {
        target: name.into(),
        seed: cfg.seed,
        seconds: 0.0,
        inputs: 0,
        accepted: 0,
        refused: 0,
        distinct_errors: 0,
        crashes: 0,
        saved: Vec::new(),
    };
    let mut last_report = Instant::now();
    let mut iteration: u64 = 0;
    while epoch.elapsed().as_secs_f64() < cfg.seconds {
        // One generator per iteration: (seed, iteration) names a mutant.
        let mut rng =
            Pcg64Mcg::seed_from_u64(cfg.seed ^ iteration.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let (from, base) = &pool[rng.random_range(0..pool.len())];
        let other = &pool[rng.random_range(0..pool.len())].1;
        // Now and then the seed itself, so an accepted seed stays checked.
        let input = if iteration < seeds_len as u64 {
            pool[iteration as usize].1.clone()
        } else {
            mutate::mutate(&mut rng, base, other)
        };
        let story = format!(
            "target {name}, seed {}, iteration {iteration}, mutant of {from}\nreplay: krr-fuzz repro --target {name} <this folder>\n",
            cfg.seed
        );
        *watchdog.story.lock().unwrap_or_else(|e| e.into_inner()) = story.clone();
        fresh(&work)?;
        watchdog
            .started_ms
            .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        watchdog.busy.store(true, Ordering::Relaxed);
        let outcome = check(cfg.target, &input, &work);
        watchdog.busy.store(false, Ordering::Relaxed);
        s.inputs += 1;
        match outcome {
            Outcome::Accepted => s.accepted += 1,
            Outcome::Refused(e) => {
                s.refused += 1;
                if shapes.insert(shape(&e, &work)) && pool.len() < 512 {
                    pool.push((format!("{from}+{iteration}"), input));
                }
            }
            Outcome::Crash(what) => {
                s.crashes += 1;
                let kind = shape(&what, &work);
                let n = crash_kinds.entry(kind).or_insert(0);
                *n += 1;
                eprintln!("fuzz {name}: CRASH at iteration {iteration}: {what}");
                // A few of each kind: enough to reproduce, not a flood.
                if *n <= 3 {
                    let story = format!("{story}crash: {what}\n");
                    let dir = save(
                        &cfg.out,
                        &format!("crash-{name}-{iteration}"),
                        &input,
                        &story,
                    )?;
                    eprintln!("   saved as {}", dir.display());
                    s.saved.push(dir);
                }
            }
        }
        iteration += 1;
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "fuzz {name}: {:.0} s, {} inputs ({} accepted, {} refused, {} distinct errors), {} crashes",
                epoch.elapsed().as_secs_f64(),
                s.inputs,
                s.accepted,
                s.refused,
                shapes.len(),
                s.crashes
            );
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    // The kinds of refusal met, for reading what the run reached.
    let errors = cfg.out.join(format!("errors-{name}.txt"));
    let list: String = shapes.iter().map(|e| format!("{e}\n")).collect();
    std::fs::write(&errors, list).with_context(|| format!("writing {}", errors.display()))?;
    s.seconds = epoch.elapsed().as_secs_f64();
    s.distinct_errors = shapes.len();
    Ok(s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn shapes_blank_values() {
        let work = std::path::Path::new("/w");
        assert_eq!(
            super::shape(
                "/w/x: chunk 3 at 0x1f: bad magic [ff, a1], expected \"K\\\"R\"",
                work
            ),
            "<input>/x: chunk # at #: bad magic […], expected \"…\""
        );
    }
}
