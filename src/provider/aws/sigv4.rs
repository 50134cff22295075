//! AWS Signature Version 4 for the few requests this driver sends: pure functions from a
//! request's parts, a credential and a time to the headers that authenticate it.
//!
//! Why by hand: the algorithm is a canonical form, a SHA-256 and four HMACs, about a hundred
//! lines over the `sha2` we already build and the small `hmac` crate. The official signing
//! crate (`aws-sigv4`) cannot be had without the smithy runtime crates, `http` 0.2 and 1,
//! `time`, and a second `sha2`/`digest` generation; see the `hmac` entry of Cargo.toml.
//!
//! What is signed: `host`, `x-amz-date`, `x-amz-content-sha256` (the payload's SHA-256, or
//! `UNSIGNED-PAYLOAD` for a streamed S3 body), `x-amz-security-token` when the credential has
//! a session token, and any further `x-amz-*` or `content-type` header the caller passes.
//! The canonical path is encoded once (paths here are built from ids and never hold
//! characters that need encoding; S3 object keys are encoded by the caller); query
//! parameters are sorted and encoded as RFC 3986 asks. The unit tests check AWS's published
//! test-suite vectors (`get-vanilla`, `get-vanilla-query-order-key-case`, `post-vanilla`).
//!
//! Secrets: the secret key only ever enters an HMAC; nothing here formats it.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::credentials::Credentials;

/// The SHA-256 of an empty payload, hex.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Where a request is scoped: region and service (`ec2`, `ebs`, `s3`).
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub region: &'a str,
    pub service: &'a str,
}

/// One request to sign. `query` holds decoded name/value pairs.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// `host[:port]` as sent in the Host header.
    pub host: &'a str,
    /// The path, already percent-encoded where needed, starting with `/`.
    pub path: &'a str,
    pub query: &'a [(String, String)],
    /// Extra headers to sign (name, value), e.g. `content-type`.
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the payload, or `UNSIGNED-PAYLOAD`.
    pub payload_sha256: &'a str,
}

/// The headers to add to a signed request (the Host header is the client's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub headers: Vec<(String, String)>,
}

/// `20150830T123600Z` and `20150830` of a time.
pub fn amz_date(at: SystemTime) -> (String, String) {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let date = format!("{y:04}{m:02}{d:02}");
    let stamp = format!(
        "{date}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    );
    (stamp, date)
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `k1=v1&k2=v2…`, keys and values [`uri_encode`]d: an EC2 form body, an S3 tagging header.
pub fn encode_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    pairs
        .into_iter()
        .map(|(k, v)| format!("{}={}", uri_encode(k), uri_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
pub fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The query string as it is signed and sent: encoded pairs sorted by name, then value.
pub fn canonical_query(query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k), uri_encode(v)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Signs `req` at `at`: the `x-amz-date`, `x-amz-content-sha256`, optional
/// `x-amz-security-token` and `authorization` headers.
pub fn sign(req: &Request, scope: Scope, creds: &Credentials, at: SystemTime) -> Signed {
    let (stamp, date) = amz_date(at);
    let mut headers: Vec<(String, String)> = vec![
        ("host".into(), req.host.to_string()),
        ("x-amz-date".into(), stamp.clone()),
        (
            "x-amz-content-sha256".into(),
            req.payload_sha256.to_string(),
        ),
    ];
    if let Some(token) = creds.session_token() {
        headers.push(("x-amz-security-token".into(), token.to_string()));
    }
    headers.extend(
        req.headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string())),
    );
    headers.sort();
    let signature = signature(req, scope, creds, &stamp, &date, &headers);
    let signed_headers = signed_header_names(&headers);
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={}/{date}/{}/{}/aws4_request, SignedHeaders={signed_headers}, Signature={signature}",
        creds.access_key_id(),
        scope.region,
        scope.service
    );
    let mut out: Vec<(String, String)> = headers
        .into_iter()
        .filter(|(k, _)| k != "host" && !req.headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(k)))
        .collect();
    out.push(("authorization".into(), authorization));
    Signed { headers: out }
}

fn signed_header_names(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";")
}

/// The hex signature over sorted, lowercased `headers`.
fn signature(
    req: &Request,
    scope: Scope,
    creds: &Credentials,
    stamp: &str,
    date: &str,
    headers: &[(String, String)],
) -> String {
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let canonical_request = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{}\n{}",
        req.method,
        req.path,
        canonical_query(req.query),
        signed_header_names(headers),
        req.payload_sha256
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{stamp}\n{date}/{}/{}/aws4_request\n{}",
        scope.region,
        scope.service,
        sha256_hex(canonical_request.as_bytes())
    );
    let key = creds.with_secret(|secret| hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes()));
    let key = hmac(&key, scope.region.as_bytes());
    let key = hmac(&key, scope.service.as_bytes());
    let key = hmac(&key, b"aws4_request");
    hex(&hmac(&key, string_to_sign.as_bytes()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// AWS's SigV4 test suite: its credential, time, region and service.
    fn suite(method: &str, query: &[(String, String)]) -> String {
        let creds = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
        );
        let at = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let (stamp, date) = amz_date(at);
        assert_eq!(
            (stamp.as_str(), date.as_str()),
            ("20150830T123600Z", "20150830")
        );
        // The suite signs only host and x-amz-date; compute over exactly those.
        let headers = vec![
            ("host".to_string(), "example.amazonaws.com".to_string()),
            ("x-amz-date".to_string(), stamp.clone()),
        ];
        let req = Request {
            method,
            host: "example.amazonaws.com",
            path: "/",
            query,
            headers: &[],
            payload_sha256: EMPTY_SHA256,
        };
        let scope = Scope {
            region: "us-east-1",
            service: "service",
        };
        signature(&req, scope, &creds, &stamp, &date, &headers)
    }

    #[test]
    fn signatures_match_the_published_sigv4_test_suite() {
        assert_eq!(
            suite("GET", &[]),
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        // get-vanilla-query-order-key-case: sent out of order, signed sorted.
        let query = [
            ("Param2".to_string(), "value2".to_string()),
            ("Param1".to_string(), "value1".to_string()),
        ];
        assert_eq!(
            suite("GET", &query),
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
        );
        assert_eq!(
            suite("POST", &[]),
            "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
        );
    }

    #[test]
    fn the_authorization_header_names_scope_and_signed_headers_but_never_the_secret() {
        let creds = Credentials::new("AKID", "topsecret", Some("sessiontok"));
        let req = Request {
            method: "POST",
            host: "ec2.eu-west-1.amazonaws.com",
            path: "/",
            query: &[],
            headers: &[(
                "Content-Type".into(),
                "application/x-www-form-urlencoded".into(),
            )],
            payload_sha256: EMPTY_SHA256,
        };
        let scope = Scope {
            region: "eu-west-1",
            service: "ec2",
        };
        let signed = sign(
            &req,
            scope,
            &creds,
            UNIX_EPOCH + Duration::from_secs(1_440_938_160),
        );
        let names: Vec<&str> = signed.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "x-amz-content-sha256",
                "x-amz-date",
                "x-amz-security-token",
                "authorization"
            ]
        );
        let auth = &signed.headers[3].1;
        assert!(auth.starts_with(
            "AWS4-HMAC-SHA256 Credential=AKID/20150830/eu-west-1/ec2/aws4_request, \
             SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;x-amz-security-token, Signature="
        ), "{auth}");
        assert!(!format!("{signed:?}").contains("topsecret"));
    }

    #[test]
    fn queries_are_encoded_and_sorted() {
        let q = [
            ("b".to_string(), "x y/z".to_string()),
            ("a".to_string(), "~.-_".to_string()),
        ];
        assert_eq!(canonical_query(&q), "a=~.-_&b=x%20y%2Fz");
    }

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(amz_date(UNIX_EPOCH).0, "19700101T000000Z");
        // 2024-02-29 23:59:59 UTC.
        let leap = UNIX_EPOCH + Duration::from_secs(1_709_251_199);
        assert_eq!(amz_date(leap).0, "20240229T235959Z");
    }
}
