// SPDX-License-Identifier: GPL-2.0-or-later
//! Structured mutation fuzzing of what krr reads from a recording (issue
//! 19, "Hostile and damaged recordings"): seeds from `corpus/`, mutants
//! from a seeded generator ([`mutate`]), each run through a [`Target`] under
//! `catch_unwind`, a per-input time limit and an allocation limit
//! ([`LimitAlloc`]). A crash is saved as the input's files and becomes a
//! regression test under `regressions/<target>/`.

pub mod mutate;
pub mod runner;
pub mod seeds;
pub mod targets;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

pub use targets::Target;

/// The file of a ring corpus entry: a ring region image (header page and
/// data area; trailing zeros may be left out).
pub const RING_FILE: &str = "ring.bin";

/// One input: files by their path relative to the input's folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Input {
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Input {
    /// Reads every file under `dir` (an input folder of the corpus, a
    /// crash, a regression), keeping only `only` when given.
    pub fn load(dir: &Path, only: Option<&str>) -> io::Result<Input> {
        let mut files = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path
                    .strip_prefix(dir)
                    .expect("below dir")
                    .to_string_lossy()
                    .into_owned();
                if rel == REPRO_FILE || only.is_some_and(|o| o != rel) {
                    continue;
                }
                files.insert(rel, std::fs::read(&path)?);
            }
        }
        Ok(Input { files })
    }

    /// Writes the files under `dir` (which exists and is empty).
    pub fn write_to(&self, dir: &Path) -> io::Result<()> {
        for (rel, bytes) in &self.files {
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, bytes)?;
        }
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.files.values().map(Vec::len).sum()
    }
}

/// Beside a saved crash: what it was and how it was found.
pub const REPRO_FILE: &str = "repro.txt";

/// `engine/fuzz/` in the source tree (the corpus and regressions).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The seeds of `target`: each folder under `corpus/<target's corpus>/`.
pub fn load_corpus(corpus: &Path, target: Target) -> io::Result<Vec<(String, Input)>> {
    let root = corpus.join(target.corpus());
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", root.display())))?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()?;
    entries.sort();
    let mut seeds = Vec::new();
    for dir in entries.into_iter().filter(|p| p.is_dir()) {
        let input = Input::load(&dir, target.files())?;
        if !input.files.is_empty() {
            let name = dir.file_name().expect("a folder").to_string_lossy().into();
            seeds.push((name, input));
        }
    }
    Ok(seeds)
}

/// The global allocator of the fuzz binary and its tests: the system's,
/// noting the largest single request and the peak of live bytes, so a
/// reader that allocates what a damaged length asks for is caught, not
/// just slow. Requests above [`HARD_LIMIT`] fail (the process aborts and
/// the input is left in the run's work folder).
pub struct LimitAlloc;

/// No single allocation may exceed this: the log reader's own cap on a
/// chunk is 256 MiB.
pub const ALLOC_LIMIT: usize = 320 << 20;
/// Refused outright (rather than letting the machine swap or the kernel
/// kill the run).
pub const HARD_LIMIT: usize = 4 << 30;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` with the caller's layout; the
// counters are only statistics.
unsafe impl GlobalAlloc for LimitAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !note_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !note_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !note_alloc(new_size) {
            return std::ptr::null_mut();
        }
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as for `dealloc` and `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note_alloc(size: usize) -> bool {
    LARGEST.fetch_max(size, Ordering::Relaxed);
    if size > HARD_LIMIT {
        return false;
    }
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
    true
}

/// Starts measuring one input; returns the live bytes before it.
pub fn alloc_reset() -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

/// (largest single request, peak live bytes above `base`) since
/// [`alloc_reset`] returned `base`.
pub fn alloc_measure(base: usize) -> (usize, usize) {
    (
        LARGEST.load(Ordering::Relaxed),
        PEAK.load(Ordering::Relaxed).saturating_sub(base),
    )
}
