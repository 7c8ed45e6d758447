//! The in-memory layer: values put since the last flush, by key, each key's values in LSN
//! order. A hash map of per-key vectors: ingest appends (LSNs only grow), which costs far less
//! than keeping one ordered map of (key, LSN); the order a layer file needs is made once, at
//! flush, by sorting the keys.

use super::key::Key;
use super::value::Value;
use neon_types::Lsn;
use std::collections::HashMap;
use std::ops::Range;

#[derive(Default, Clone)]
pub struct MemLayer {
    by_key: HashMap<Key, Vec<(Lsn, Value)>>,
    values: usize,
}

impl MemLayer {
    pub fn len(&self) -> usize {
        self.values
    }

    pub fn is_empty(&self) -> bool {
        self.values == 0
    }

    /// Files a value; a second value for the same key at the same LSN replaces the first.
    pub fn put(&mut self, key: Key, lsn: Lsn, value: Value) {
        let v = self.by_key.entry(key).or_default();
        match v.last_mut() {
            Some(last) if last.0 == lsn => last.1 = value,
            Some(last) if last.0 > lsn => {
                let at = v.partition_point(|(l, _)| *l < lsn);
                if v.get(at).is_some_and(|(l, _)| *l == lsn) {
                    v[at].1 = value;
                } else {
                    v.insert(at, (lsn, value));
                    self.values += 1;
                }
            }
            _ => {
                v.push((lsn, value));
                self.values += 1;
            }
        }
    }

    /// Moves the values newer than `upto` into a new layer.
    pub fn split_newer(&mut self, upto: Lsn) -> MemLayer {
        let mut newer = MemLayer::default();
        for (key, v) in self.by_key.iter_mut() {
            let at = v.partition_point(|(l, _)| *l <= upto);
            if at < v.len() {
                let tail = v.split_off(at);
                self.values -= tail.len();
                newer.values += tail.len();
                newer.by_key.insert(*key, tail);
            }
        }
        self.by_key.retain(|_, v| !v.is_empty());
        newer
    }

    /// Adds everything of `newer` (values after all of this layer's).
    pub fn append(&mut self, newer: MemLayer) {
        for (key, v) in newer.by_key {
            for (lsn, value) in v {
                self.put(key, lsn, value);
            }
        }
    }

    /// Every value in (key, LSN) order.
    pub fn sorted(&self) -> impl Iterator<Item = (Key, Lsn, &Value)> {
        let mut keys: Vec<&Key> = self.by_key.keys().collect();
        keys.sort_unstable();
        keys.into_iter().flat_map(move |k| self.by_key[k].iter().map(move |(l, v)| (*k, *l, v)))
    }

    /// The LSN range of the values.
    pub fn lsn_range(&self) -> Option<(Lsn, Lsn)> {
        let first = self.by_key.values().filter_map(|v| v.first()).map(|x| x.0).min()?;
        let last = self.by_key.values().filter_map(|v| v.last()).map(|x| x.0).max()?;
        Some((first, last))
    }

    /// `key`'s values at or before `lsn`, newest first.
    pub fn newest_first(&self, key: &Key, lsn: Lsn) -> impl Iterator<Item = &(Lsn, Value)> {
        let v = self.by_key.get(key).map(Vec::as_slice).unwrap_or_default();
        v[..v.partition_point(|(l, _)| *l <= lsn)].iter().rev()
    }

    /// Every value of keys in `keys`, in no particular order.
    pub fn in_range(&self, keys: Range<Key>) -> impl Iterator<Item = (Key, Lsn, &Value)> {
        self.by_key
            .iter()
            .filter(move |(k, _)| keys.contains(k))
            .flat_map(|(k, v)| v.iter().map(move |(l, val)| (*k, *l, val)))
    }
}
