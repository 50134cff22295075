//! The S3 side of the `snapshot` and `image` imports: the image file goes to
//! `<bucket>/<external name>.<format>` as a multipart upload, part by part from the file
//! (one part in memory at a time, whatever the image size), each part with its SHA-256 (signed
//! as the payload hash and sent as `x-amz-checksum-sha256`, so S3 checks it). The object is
//! tagged like upstream's (`x-amz-tagging`, the image's tags URL-encoded) and deleted once
//! EC2 has imported it, whatever the import's outcome; a failed upload is aborted, so S3
//! keeps no parts.
//!
//! Addressing: path style (`<endpoint>/<bucket>/<key>`) when an endpoint is configured
//! (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`: S3 stand-ins and private endpoints),
//! virtual-hosted (`https://<bucket>.s3.<region>.amazonaws.com/<key>`) otherwise, as the SDKs
//! do. This module holds the pure parts; the calls are in the driver.

use std::collections::BTreeMap;

/// The smallest part (S3 wants at least 5 MiB for all but the last).
pub const MIN_PART: u64 = 8 << 20;
/// S3's most parts per upload.
pub const MAX_PARTS: u64 = 10_000;

/// The part size for a file of `len` bytes: [`MIN_PART`], or more (whole MiB) so that the
/// file fits in [`MAX_PARTS`] parts.
pub fn part_size(len: u64) -> u64 {
    let needed = len.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
    needed.max(MIN_PART)
}

/// The object key: upstream's `<image name>.<format>`.
pub fn object_key(external_name: &str, format: &str) -> String {
    format!("{external_name}.{format}")
}

/// The key as it appears in a path: every segment encoded, `/` kept.
pub fn encode_key(key: &str) -> String {
    key.split('/')
        .map(super::sigv4::uri_encode)
        .collect::<Vec<_>>()
        .join("/")
}

/// The `x-amz-tagging` value: tags URL-encoded as a query string.
pub fn tagging(tags: &BTreeMap<String, String>) -> String {
    super::sigv4::encode_pairs(tags.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// One uploaded part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub number: u32,
    pub etag: String,
    pub checksum_b64: String,
}

/// The `CompleteMultipartUpload` body.
pub fn complete_body(parts: &[Part]) -> Vec<u8> {
    let mut xml =
        String::from("<CompleteMultipartUpload xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">");
    for p in parts {
        xml.push_str(&format!(
            "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag><ChecksumSHA256>{}</ChecksumSHA256></Part>",
            p.number,
            xml_escape(&p.etag),
            xml_escape(&p.checksum_b64)
        ));
    }
    xml.push_str("</CompleteMultipartUpload>");
    xml.into_bytes()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The `UploadId` of a `CreateMultipartUpload` answer.
pub fn parse_upload_id(xml: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(xml).map_err(|_| "the answer is not UTF-8".to_string())?;
    let doc =
        roxmltree::Document::parse(text).map_err(|e| format!("the answer is not XML ({e})"))?;
    doc.descendants()
        .find(|n| n.has_tag_name("UploadId"))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| "the answer has no UploadId".into())
}

/// Whether a `CompleteMultipartUpload` answer (status 200) is really an error: S3 may
/// send `<Error>` in a 200 after it started answering.
pub fn complete_failed(xml: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(xml).ok()?;
    let doc = roxmltree::Document::parse(text).ok()?;
    let root = doc.root_element();
    root.has_tag_name("Error").then(|| {
        root.children()
            .filter(|c| c.is_element())
            .map(|c| format!("{}: {}", c.tag_name().name(), c.text().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_8_mib_until_the_file_needs_more_than_10000() {
        assert_eq!(part_size(0), MIN_PART);
        assert_eq!(part_size(80_000 << 20), MIN_PART);
        // 100 GiB: 10.24 MiB per part, rounded up to 11 MiB.
        assert_eq!(part_size(100 << 30), 11 << 20);
        assert!(part_size(100 << 30) * MAX_PARTS >= 100 << 30);
    }

    #[test]
    fn keys_tags_and_bodies_are_encoded() {
        assert_eq!(
            object_key("fedora-1700000000", "vhd"),
            "fedora-1700000000.vhd"
        );
        assert_eq!(encode_key("a b/c+d"), "a%20b/c%2Bd");
        let tags = BTreeMap::from([
            ("nodepool_build_id".to_string(), "b1".to_string()),
            ("team".to_string(), "a&b c".to_string()),
        ]);
        assert_eq!(tagging(&tags), "nodepool_build_id=b1&team=a%26b%20c");
        let body = String::from_utf8(complete_body(&[Part {
            number: 1,
            etag: "\"e1\"".into(),
            checksum_b64: "c1".into(),
        }]))
        .unwrap();
        assert!(body.contains("<PartNumber>1</PartNumber><ETag>&quot;e1&quot;</ETag><ChecksumSHA256>c1</ChecksumSHA256>"), "{body}");
        assert_eq!(
            parse_upload_id(b"<InitiateMultipartUploadResult><Bucket>b</Bucket><UploadId>u-1</UploadId></InitiateMultipartUploadResult>"),
            Ok("u-1".into())
        );
        assert_eq!(complete_failed(b"<CompleteMultipartUploadResult/>"), None);
        assert!(
            complete_failed(b"<Error><Code>InternalError</Code></Error>")
                .unwrap()
                .contains("InternalError")
        );
    }
}
