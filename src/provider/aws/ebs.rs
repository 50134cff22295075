//! The EBS direct API as the `ebs-direct` import uses it: `StartSnapshot`,
//! `PutSnapshotBlock` (512 KiB blocks, each with its base64 SHA-256), `CompleteSnapshot`.
//! JSON bodies in and out; the pure parts (sizes, block checksums, request bodies, answers)
//! live here, the calls in the driver.
//!
//! As upstream: the snapshot's size is the file's size rounded up to whole GiB, the last
//! block is padded with zeros to 512 KiB, the snapshot and its `ClientToken` (a fresh uuid,
//! so a repeated `StartSnapshot` is idempotent) carry the image's tags, and
//! `CompleteSnapshot` gives the number of blocks written and is repeated until the status
//! is `completed` (`error` fails). Unlike upstream, a block that is all zeros is not sent: a
//! new snapshot without a parent reads as zeros wherever nothing was written, so a sparse
//! 20 GiB raw image with 2 GiB of data costs 4,096 requests instead of 40,960.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The EBS block size.
pub const BLOCK_SIZE: usize = 512 * 1024;
const GIB: u64 = 1 << 30;

/// The snapshot's size in GiB for a file of `len` bytes (at least 1).
pub fn volume_size_gib(len: u64) -> u64 {
    len.div_ceil(GIB).max(1)
}

/// One block ready to send: zero-padded to [`BLOCK_SIZE`], with its checksums.
#[derive(Debug)]
pub struct Block {
    pub index: u64,
    pub data: Vec<u8>,
    /// Base64 SHA-256 (the `x-amz-Checksum` header).
    pub checksum_b64: String,
    /// Hex SHA-256 (the signature's payload hash).
    pub sha256_hex: String,
}

impl Block {
    /// The block `index` holding `data` (at most [`BLOCK_SIZE`] bytes), or `None` when it
    /// is all zeros and need not be written.
    pub fn new(index: u64, mut data: Vec<u8>) -> Option<Block> {
        if data.iter().all(|&b| b == 0) {
            return None;
        }
        data.resize(BLOCK_SIZE, 0);
        let digest = Sha256::digest(&data);
        Some(Block {
            index,
            checksum_b64: base64::engine::general_purpose::STANDARD.encode(digest),
            sha256_hex: digest.iter().map(|b| format!("{b:02x}")).collect(),
            data,
        })
    }
}

/// The `StartSnapshot` body.
pub fn start_body(
    volume_size: u64,
    client_token: &str,
    tags: &BTreeMap<String, String>,
    description: &str,
) -> Vec<u8> {
    let tags: Vec<Value> = tags
        .iter()
        .map(|(k, v)| json!({"Key": k, "Value": v}))
        .collect();
    json!({
        "VolumeSize": volume_size,
        "ClientToken": client_token,
        "Tags": tags,
        "Description": description,
    })
    .to_string()
    .into_bytes()
}

/// The `SnapshotId` of a `StartSnapshot` answer.
pub fn parse_start(body: &[u8]) -> Result<String, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON ({e})"))?;
    v.get("SnapshotId")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| "the answer has no SnapshotId".into())
}

/// What `CompleteSnapshot` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    Pending,
    Completed,
    Error,
}

pub fn parse_complete(body: &[u8]) -> Result<Completion, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON ({e})"))?;
    match v.get("Status").and_then(Value::as_str) {
        Some("completed") => Ok(Completion::Completed),
        Some("pending") => Ok(Completion::Pending),
        Some("error") => Ok(Completion::Error),
        other => Err(format!("unexpected snapshot status {other:?}")),
    }
}

/// The message of an EBS error answer (`{"Message": ...}`), on one line.
pub fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.get("Message")
                .or_else(|| v.get("message"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned())
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_whole_gib() {
        assert_eq!(volume_size_gib(0), 1);
        assert_eq!(volume_size_gib(1), 1);
        assert_eq!(volume_size_gib(GIB), 1);
        assert_eq!(volume_size_gib(GIB + 1), 2);
    }

    #[test]
    fn zero_blocks_are_skipped_and_short_blocks_padded_with_their_checksum() {
        assert!(Block::new(3, vec![0; BLOCK_SIZE]).is_none());
        let b = Block::new(7, b"abc".to_vec()).unwrap();
        assert_eq!(b.data.len(), BLOCK_SIZE);
        assert_eq!(&b.data[..3], b"abc");
        let mut padded = b"abc".to_vec();
        padded.resize(BLOCK_SIZE, 0);
        let digest = Sha256::digest(&padded);
        assert_eq!(
            b.checksum_b64,
            base64::engine::general_purpose::STANDARD.encode(digest)
        );
        assert_eq!(
            b.sha256_hex,
            crate::provider::aws::sigv4::sha256_hex(&padded)
        );
    }

    #[test]
    fn answers_parse() {
        assert_eq!(
            parse_start(br#"{"SnapshotId":"snap-1","Status":"pending","BlockSize":524288}"#),
            Ok("snap-1".into())
        );
        assert_eq!(
            parse_complete(br#"{"Status":"completed"}"#),
            Ok(Completion::Completed)
        );
        assert_eq!(
            parse_complete(br#"{"Status":"error"}"#),
            Ok(Completion::Error)
        );
        assert_eq!(
            error_message(br#"{"Message":"Bad  checksum"}"#),
            "Bad checksum"
        );
        let body = start_body(2, "tok", &BTreeMap::from([("a".into(), "b".into())]), "d");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["Tags"][0]["Key"], "a");
        assert_eq!(v["VolumeSize"], 2);
    }
}
