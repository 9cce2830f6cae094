//! Which input partition a customer's events go to: the producers'
//! partitioner, computed here too, so that any instance can tell which
//! partition (and so which instance) holds a customer.
//!
//! The names are librdkafka's `partitioner` values; each keyed message goes
//! where librdkafka (and, for `murmur2`, the Java clients and Kafka
//! Streams) would send it. The `_random` variants differ only for messages
//! without a key, which carry no customer.

use std::fmt;

/// A producer partitioner (`[kafka] partitioner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// Java-compatible murmur2 (the Java clients' and Kafka Streams' default).
    #[default]
    Murmur2Random,
    Murmur2,
    /// CRC32 (librdkafka's default is `consistent_random`).
    ConsistentRandom,
    Consistent,
    /// FNV-1a, 32 bits (Sarama's default).
    Fnv1aRandom,
    Fnv1a,
}

impl Partitioner {
    pub const ALL: [Partitioner; 6] = [
        Partitioner::Murmur2Random,
        Partitioner::Murmur2,
        Partitioner::ConsistentRandom,
        Partitioner::Consistent,
        Partitioner::Fnv1aRandom,
        Partitioner::Fnv1a,
    ];

    /// librdkafka's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Partitioner::Murmur2Random => "murmur2_random",
            Partitioner::Murmur2 => "murmur2",
            Partitioner::ConsistentRandom => "consistent_random",
            Partitioner::Consistent => "consistent",
            Partitioner::Fnv1aRandom => "fnv1a_random",
            Partitioner::Fnv1a => "fnv1a",
        }
    }

    /// The partition of a message keyed `key` in a topic of `count`
    /// partitions (`count` > 0).
    pub fn partition(self, key: &[u8], count: i32) -> i32 {
        let count = count.max(1) as u32;
        let p = match self {
            Partitioner::Murmur2Random | Partitioner::Murmur2 => {
                (murmur2(key) & 0x7fff_ffff) % count
            }
            Partitioner::ConsistentRandom | Partitioner::Consistent => crc32fast::hash(key) % count,
            Partitioner::Fnv1aRandom | Partitioner::Fnv1a => fnv1a(key) % count,
        };
        p as i32
    }
}

impl fmt::Display for Partitioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), as
/// librdkafka's `rd_murmur2` computes it.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// 32-bit FNV-1a as librdkafka's `rd_fnv1a` returns it: the absolute
/// value of the hash read as a signed integer (as Sarama's hash
/// partitioner does).
pub fn fnv1a(data: &[u8]) -> u32 {
    let h = data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    }) as i32;
    (if h < 0 { h.wrapping_neg() } else { h }) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_known_values() {
        // From Kafka's UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 3] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key) as i32, expected, "{:?}", key);
        }
    }
}
