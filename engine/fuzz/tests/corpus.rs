// SPDX-License-Identifier: GPL-2.0-or-later
//! Every seed of the committed corpus, and every saved crash under
//! `regressions/<target>/<name>/` (a fuzz finding, kept once fixed), run
//! through its target: none may panic or allocate past the limit.

use krr_fuzz::runner::{check, Outcome};
use krr_fuzz::{crate_dir, load_corpus, targets, Input, LimitAlloc, Target};

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc;

fn outcome(target: Target, input: &Input) -> Outcome {
    let work = tempfile::tempdir().unwrap();
    check(target, input, work.path())
}

/// The seeds are what the writers write today: every target accepts them
/// (a seed the readers refuse would fuzz nothing but the refusal).
#[test]
fn every_seed_is_accepted() {
    for target in targets::ALL {
        let seeds = load_corpus(&crate_dir().join("corpus"), target).unwrap();
        assert!(!seeds.is_empty(), "{}: no seeds", target.name());
        for (name, input) in seeds {
            assert_eq!(
                outcome(target, &input),
                Outcome::Accepted,
                "{}: seed {name}",
                target.name()
            );
        }
    }
}

/// Each saved crash is refused or accepted now, never a crash.
#[test]
fn no_regression_crashes() {
    let mut ran = 0;
    for target in targets::ALL {
        let dir = crate_dir().join("regressions").join(target.name());
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let input = Input::load(&path, target.files()).unwrap();
            if let Outcome::Crash(what) = outcome(target, &input) {
                panic!("{}: {what}", path.display());
            }
            ran += 1;
        }
    }
    eprintln!("{ran} regression inputs");
}

/// A short run of every target from a fixed seed: the machinery works and
/// the first mutants crash nothing (the timed runs are `cargo xtask fuzz`).
#[test]
fn a_few_mutants_of_each_target() {
    let out = tempfile::tempdir().unwrap();
    for target in targets::ALL {
        let s = krr_fuzz::runner::run(&krr_fuzz::runner::Config {
            target,
            seconds: 0.5,
            seed: 7,
            corpus: crate_dir().join("corpus"),
            out: out.path().to_path_buf(),
            input_timeout: std::time::Duration::from_secs(60),
        })
        .unwrap();
        assert!(s.inputs > 0 && s.crashes == 0, "{s:?}");
    }
}
