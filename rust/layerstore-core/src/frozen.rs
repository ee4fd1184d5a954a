//! A read-only path → value map laid out for lookups.
//!
//! A stat of an image answers from one hash probe, so the probe's memory traffic is the cost:
//! a general-purpose map of `Arc<[u8]>` keys touches a control group, a bucket, and the key's
//! own heap allocation (scattered across the heap, one cache miss each). This map keeps the
//! keys back to back in one arena and the table as packed `u64` slots (a 32-bit hash tag and
//! the entry number), so a lookup reads one slot, usually rejects every other key by its tag
//! without touching it, and compares the one candidate in the arena. Small enough for the
//! tables of a 25k-entry image to stay in a core's L2 cache.

use std::hash::{BuildHasher, Hasher};

/// An immutable open-addressing map (linear probing, load at most one half).
#[derive(Debug)]
pub struct FrozenMap<V> {
    state: foldhash::fast::RandomState,
    /// Power-of-two table: `tag << 32 | (entry + 1)`, 0 when empty.
    slots: Box<[u64]>,
    /// Per entry: where its key lies in `keys`, and its value (one cache line read per hit).
    records: Box<[Record<V>]>,
    keys: Box<[u8]>,
}

#[derive(Debug)]
struct Record<V> {
    start: u32,
    len: u32,
    value: V,
}

impl<V> FrozenMap<V> {
    /// A map of `entries` (keys distinct, as in the map they are copied from), or `None` when
    /// they are too many or their keys too long for its 32-bit offsets (4 GiB of paths).
    pub fn new<'a>(len: usize, entries: impl IntoIterator<Item = (&'a [u8], V)>) -> Option<Self> {
        if len >= u32::MAX as usize {
            return None;
        }
        let state = foldhash::fast::RandomState::default();
        let slot_count = (len * 2).next_power_of_two().max(16);
        let mask = slot_count - 1;
        let mut slots = vec![0u64; slot_count].into_boxed_slice();
        let mut records = Vec::with_capacity(len);
        let mut keys = Vec::new();
        for (key, value) in entries {
            let n = records.len();
            if n >= len {
                return None;
            }
            let hash = hash(&state, key);
            let mut i = hash as usize & mask;
            while slots[i] != 0 {
                i = (i + 1) & mask;
            }
            slots[i] = (hash >> 32) << 32 | (n as u64 + 1);
            let start = u32::try_from(keys.len()).ok()?;
            let key_len = u32::try_from(key.len()).ok()?;
            start.checked_add(key_len)?;
            keys.extend_from_slice(key);
            records.push(Record {
                start,
                len: key_len,
                value,
            });
        }
        Some(FrozenMap {
            state,
            slots,
            records: records.into_boxed_slice(),
            keys: keys.into_boxed_slice(),
        })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn get(&self, key: &[u8]) -> Option<&V> {
        let hash = hash(&self.state, key);
        let tag = hash >> 32;
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return None;
            }
            if slot >> 32 == tag {
                let record = &self.records[(slot as u32 - 1) as usize];
                let start = record.start as usize;
                if self.keys[start..start + record.len as usize] == *key {
                    return Some(&record.value);
                }
            }
            i = (i + 1) & mask;
        }
    }
}

fn hash(state: &foldhash::fast::RandomState, key: &[u8]) -> u64 {
    let mut h = state.build_hasher();
    h.write(key);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_key_and_nothing_else() {
        let keys: Vec<Vec<u8>> = (0..5000)
            .map(|i| format!("usr/lib/x/{i}").into_bytes())
            .chain([Vec::new(), b"a".to_vec(), vec![0xff, 0, b'/']])
            .collect();
        let map = FrozenMap::new(
            keys.len(),
            keys.iter().enumerate().map(|(i, k)| (&k[..], i)),
        )
        .unwrap();
        assert_eq!(map.len(), keys.len());
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(map.get(k), Some(&i), "{k:?}");
        }
        for absent in [&b"usr/lib/x/5000"[..], b"usr/lib/x", b"b", b"usr/lib/x/1/"] {
            assert_eq!(map.get(absent), None);
        }
    }

    #[test]
    fn an_empty_map_finds_nothing() {
        let map = FrozenMap::<u8>::new(0, []).unwrap();
        assert!(map.is_empty());
        assert_eq!(map.get(b""), None);
        assert_eq!(map.get(b"x"), None);
    }

    #[test]
    fn a_small_table_finds_every_key() {
        // Sixteen slots, seven keys: probes pass occupied slots and may wrap around the end.
        let keys: Vec<Vec<u8>> = (0..7).map(|i| vec![b'k', i]).collect();
        let map = FrozenMap::new(7, keys.iter().map(|k| (&k[..], k[1]))).unwrap();
        for k in &keys {
            assert_eq!(map.get(k), Some(&k[1]));
        }
        assert_eq!(map.get(b"k\x07"), None);
    }

    #[test]
    fn more_entries_than_announced_build_no_map() {
        let keys = [&b"a"[..], b"b"];
        assert!(FrozenMap::new(1, keys.iter().map(|k| (*k, ()))).is_none());
    }
}
