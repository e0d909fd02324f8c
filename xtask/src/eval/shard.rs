// SPDX-License-Identifier: GPL-2.0-or-later
//! `--shard K/N`: a deterministic slice of an eval for one of N hosts.
//!
//! The unit dealt out is a group that must stay on one host: for
//! `record-perf` a (workload, vCPUs) pair with all its schemes and
//! repetitions (its ratios compare cells measured side by side), for
//! `bug-repro` one bug. Groups go round-robin in plan order, so every host
//! gets a similar mix and the same command on every host agrees on the
//! split without talking to the others.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Shard `index` (1-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Shard, String> {
        let expected = || format!("`{s}`: expected K/N with 1 <= K <= N, e.g. 2/4");
        let (k, n) = s.split_once('/').ok_or_else(expected)?;
        let (index, count) = match (k.trim().parse::<u32>(), n.trim().parse::<u32>()) {
            (Ok(k), Ok(n)) => (k, n),
            _ => return Err(expected()),
        };
        if index == 0 || count == 0 || index > count {
            return Err(expected());
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Whether the `group`-th group (0-based, in plan order) is this shard's.
    pub fn owns(&self, group: usize) -> bool {
        group % self.count as usize == (self.index - 1) as usize
    }

    /// The items of this shard: items are grouped by `group_of` (equal keys
    /// in a row form one group) and groups dealt round-robin.
    pub fn slice<T: Clone, K: PartialEq>(&self, items: &[T], group_of: impl Fn(&T) -> K) -> Vec<T> {
        let mut out = Vec::new();
        let mut group = 0usize;
        let mut last: Option<K> = None;
        for item in items {
            let key = group_of(item);
            if let Some(prev) = &last {
                if *prev != key {
                    group += 1;
                }
            }
            if self.owns(group) {
                out.push(item.clone());
            }
            last = Some(key);
        }
        out
    }
}

/// Checks that `shards` are exactly 1/N..N/N of one N, each once: what
/// `results merge` needs before it can call their union the whole eval.
pub fn check_complete(shards: &[(String, Option<Shard>)]) -> Result<u32> {
    let Some(count) = shards.first().and_then(|(_, s)| s.map(|s| s.count)) else {
        let what = shards.first().map(|(d, _)| d.as_str()).unwrap_or("nothing");
        bail!("{what}: not a sharded eval (it ran without --shard); there is nothing to merge");
    };
    let mut seen: Vec<Option<&str>> = vec![None; count as usize];
    for (dir, shard) in shards {
        let Some(shard) = shard else {
            bail!("{dir}: not a sharded eval (it ran without --shard)");
        };
        if shard.count != count {
            bail!(
                "{dir}: shard {shard}, but {} is a shard of {count}: the shards of one eval share N",
                shards[0].0
            );
        }
        let slot = &mut seen[(shard.index - 1) as usize];
        if let Some(other) = slot {
            bail!("{dir} and {other} are both shard {shard}");
        }
        *slot = Some(dir);
    }
    let missing: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(_, d)| d.is_none())
        .map(|(i, _)| format!("{}/{count}", i + 1))
        .collect();
    if !missing.is_empty() {
        bail!(
            "shard(s) {} missing: pass every shard's results directory",
            missing.join(", ")
        );
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_refuse_what_is_not_k_of_n() {
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        assert_eq!("1/1".parse::<Shard>().unwrap().to_string(), "1/1");
        for bad in ["0/3", "4/3", "2", "a/b", "1/0", "/2", "-1/2"] {
            let err = bad.parse::<Shard>().unwrap_err();
            assert!(err.contains("expected K/N"), "{bad}: {err}");
        }
    }

    #[test]
    fn groups_are_dealt_whole_and_once() {
        let items = ["a1", "a2", "b1", "c1", "c2", "c3", "d1", "e1"];
        let group = |s: &&str| s.as_bytes()[0];
        for count in 1..=6 {
            let mut union = Vec::new();
            for index in 1..=count {
                let slice = Shard { index, count }.slice(&items, group);
                for g in slice.iter().map(group) {
                    let whole = items.iter().filter(|i| group(i) == g).count();
                    let here = slice.iter().filter(|i| group(i) == g).count();
                    assert_eq!(here, whole, "group {} split by {index}/{count}", g as char);
                }
                union.extend(slice);
            }
            union.sort();
            let mut all = items.to_vec();
            all.sort();
            assert_eq!(union, all, "{count} shards");
        }
    }

    #[test]
    fn an_incomplete_set_of_shards_names_what_is_missing_or_doubled() {
        let s = |i, n| Some(Shard { index: i, count: n });
        let dirs = |v: Vec<Option<Shard>>| -> Vec<(String, Option<Shard>)> {
            v.into_iter()
                .enumerate()
                .map(|(i, s)| (format!("d{i}"), s))
                .collect()
        };
        assert_eq!(check_complete(&dirs(vec![s(2, 2), s(1, 2)])).unwrap(), 2);
        let err = |v| format!("{:#}", check_complete(&dirs(v)).unwrap_err());
        assert!(err(vec![s(1, 3), s(3, 3)]).contains("shard(s) 2/3 missing"));
        assert!(err(vec![s(1, 2), s(1, 2)]).contains("d1 and d0 are both shard 1/2"));
        assert!(err(vec![s(1, 2), s(2, 3)]).contains("share N"));
        assert!(err(vec![None]).contains("not a sharded eval"));
    }
}
