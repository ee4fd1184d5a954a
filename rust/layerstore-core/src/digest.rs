//! Digests: BLAKE3 names everything inside the store; sha256 (and sha512 when verifying) is what
//! OCI artefacts carry.
//!
//! Invariants: a [`Blake3`] is always 32 bytes and prints as `blake3:<64 hex>`; an OCI digest string
//! is `algorithm:hex` with a registered algorithm. The store never trusts a digest it did not
//! compute itself.

use std::fmt;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::error::{Error, Result};

/// A BLAKE3 digest: the name of a chunk, a layer (`layer.id`) or a tree (`layer.tree_id`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Blake3(pub [u8; 32]);

impl Blake3 {
    pub fn of(data: &[u8]) -> Self {
        Blake3(*blake3::hash(data).as_bytes())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse `blake3:<hex>` (or bare hex).
    pub fn parse(s: &str) -> Result<Self> {
        let h = s.strip_prefix("blake3:").unwrap_or(s);
        let mut out = [0u8; 32];
        hex::decode_to_slice(h, &mut out)
            .map_err(|_| Error::InvalidLayer(format!("not a blake3 digest: {s:?}")))?;
        Ok(Blake3(out))
    }
}

impl From<blake3::Hash> for Blake3 {
    fn from(h: blake3::Hash) -> Self {
        Blake3(*h.as_bytes())
    }
}

impl fmt::Display for Blake3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.hex())
    }
}

impl fmt::Debug for Blake3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}…", &self.hex()[..12])
    }
}

/// Format a sha256 output as an OCI digest string.
pub fn sha256_string(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(bytes))
}

/// An OCI digest string to compare against (`sha256:` or `sha512:`), validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OciDigest {
    pub algorithm: OciAlgorithm,
    pub hex: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OciAlgorithm {
    Sha256,
    Sha512,
}

impl OciDigest {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::InvalidLayer(format!("not a valid digest: {s:?}"));
        let (alg, hex) = s.split_once(':').ok_or_else(bad)?;
        let (algorithm, len) = match alg {
            "sha256" => (OciAlgorithm::Sha256, 64),
            "sha512" => (OciAlgorithm::Sha512, 128),
            _ => return Err(bad()),
        };
        if hex.len() != len
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad());
        }
        Ok(OciDigest {
            algorithm,
            hex: hex.to_string(),
        })
    }
}

impl fmt::Display for OciDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let alg = match self.algorithm {
            OciAlgorithm::Sha256 => "sha256",
            OciAlgorithm::Sha512 => "sha512",
        };
        write!(f, "{alg}:{}", self.hex)
    }
}

/// Digests of one whole byte stream.
#[derive(Clone, Debug)]
pub struct StreamDigests {
    pub blake3: Blake3,
    pub sha256: String,
    /// Only when requested (verifying a `sha512:` expectation).
    pub sha512: Option<String>,
    pub len: u64,
    /// Time the hasher spent hashing (not waiting).
    pub busy_seconds: f64,
}

/// Bytes handed to the hasher thread, moved or shared rather than copied.
enum Block {
    Shared(Box<dyn AsRef<[u8]> + Send>),
    /// A buffer the hasher hands back afterwards (see [`StreamHasher::spare`]).
    Owned(Vec<u8>),
}

impl Block {
    fn bytes(&self) -> &[u8] {
        match self {
            Block::Shared(b) => (**b).as_ref(),
            Block::Owned(v) => v,
        }
    }
}

/// Hashed owned buffers kept for reuse: refilling a buffer already in memory is far cheaper
/// than faulting in (and zeroing) a fresh one per megabyte.
const SPARE_BUFFERS: usize = 4;

/// Hashes a stream on its own thread: the sha256 of a layer costs more than everything else in an
/// import, so it runs beside the parser instead of in front of it.
pub struct StreamHasher {
    tx: Option<Sender<Block>>,
    handle: Option<JoinHandle<StreamDigests>>,
    spare: crossbeam_channel::Receiver<Vec<u8>>,
}

impl StreamHasher {
    pub fn spawn(with_sha512: bool) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<Block>(64);
        let (spare_tx, spare) = crossbeam_channel::bounded::<Vec<u8>>(SPARE_BUFFERS);
        let handle = std::thread::Builder::new()
            .name("layerstore-hash".into())
            .spawn(move || {
                let mut sha = sha2::Sha256::new();
                let mut sha512 = with_sha512.then(sha2::Sha512::new);
                let mut b3 = blake3::Hasher::new();
                let mut len = 0u64;
                let mut busy = std::time::Duration::ZERO;
                for block in rx {
                    let bytes = block.bytes();
                    let started = std::time::Instant::now();
                    sha.update(bytes);
                    if let Some(s) = sha512.as_mut() {
                        s.update(bytes);
                    }
                    b3.update(bytes);
                    len += bytes.len() as u64;
                    busy += started.elapsed();
                    if let Block::Owned(mut v) = block {
                        v.clear();
                        let _ = spare_tx.try_send(v); // enough kept: let it go
                    }
                }
                StreamDigests {
                    blake3: b3.finalize().into(),
                    sha256: sha256_string(&sha.finalize()),
                    sha512: sha512.map(|s| format!("sha512:{}", hex::encode(s.finalize()))),
                    len,
                    busy_seconds: busy.as_secs_f64(),
                }
            })
            .expect("spawn hasher thread");
        StreamHasher {
            tx: Some(tx),
            handle: Some(handle),
            spare,
        }
    }

    /// Hash `block` next (an `Arc<[u8]>` shared with another consumer, or a buffer moved in).
    pub fn update(&self, block: impl AsRef<[u8]> + Send + 'static) {
        self.send(Block::Shared(Box::new(block)));
    }

    /// Hash `buf` next; once hashed it may come back, emptied, from [`Self::spare`].
    pub fn update_owned(&self, buf: Vec<u8>) {
        self.send(Block::Owned(buf));
    }

    /// An empty buffer the hasher is done with, if one is free.
    pub fn spare(&self) -> Option<Vec<u8>> {
        self.spare.try_recv().ok()
    }

    fn send(&self, block: Block) {
        if let Some(tx) = &self.tx {
            // The receiver only stops when we drop the sender, so this cannot fail.
            let _ = tx.send(block);
        }
    }

    pub fn finish(mut self) -> StreamDigests {
        drop(self.tx.take());
        self.handle
            .take()
            .expect("finish once")
            .join()
            .expect("hasher thread panicked")
    }
}

impl Drop for StreamHasher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Check an optional expected OCI digest against computed digests.
pub fn check_expected(what: &str, expected: &OciDigest, got: &StreamDigests) -> Result<()> {
    let found = match expected.algorithm {
        OciAlgorithm::Sha256 => got.sha256.clone(),
        OciAlgorithm::Sha512 => got.sha512.clone().unwrap_or_default(),
    };
    if found != expected.to_string() {
        return Err(Error::DigestMismatch {
            what: what.into(),
            expected: expected.to_string(),
            found,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_hasher_matches_one_shot() {
        let h = StreamHasher::spawn(true);
        // A shared buffer, then one moved in (and handed back once hashed).
        h.update(std::sync::Arc::<[u8]>::from(&b"hello "[..]));
        h.update_owned(b"world".to_vec());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut back = None;
        while back.is_none() && std::time::Instant::now() < deadline {
            back = h.spare();
            std::thread::yield_now();
        }
        let back = back.expect("the owned buffer comes back once hashed");
        assert!(back.is_empty() && back.capacity() >= 5);
        let d = h.finish();
        assert_eq!(d.len, 11);
        assert_eq!(d.blake3, Blake3::of(b"hello world"));
        assert_eq!(
            d.sha256,
            "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert!(d
            .sha512
            .unwrap()
            .starts_with("sha512:309ecc489c12d6eb4cc40f50c902f2b4"));
    }

    #[test]
    fn oci_digest_parse_rejects_garbage() {
        assert!(OciDigest::parse("sha256:abc").is_err());
        assert!(OciDigest::parse("md5:00").is_err());
        assert!(OciDigest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(OciDigest::parse(&format!("sha256:{}", "a".repeat(64))).is_ok());
    }

    #[test]
    fn blake3_roundtrip() {
        let d = Blake3::of(b"x");
        assert_eq!(Blake3::parse(&d.to_string()).unwrap(), d);
    }
}
