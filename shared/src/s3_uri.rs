//! `s3://bucket/key` addresses: parsing, display, and joining keys under a prefix.

use std::fmt;
use std::str::FromStr;

/// A bucket and key, shown as `s3://bucket/key` in every log line and error.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct S3Uri {
    /// Bucket name.
    pub bucket: String,
    /// Object key, already URL-decoded.
    pub key: String,
}

impl S3Uri {
    /// Builds an address from its parts.
    pub fn new(bucket: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            key: key.into(),
        }
    }

    /// The same bucket with another key.
    pub fn with_key(&self, key: impl Into<String>) -> Self {
        Self::new(self.bucket.clone(), key)
    }

    /// The key's folder (everything up to and including the last `/`), or `""` at the root.
    pub fn folder(&self) -> &str {
        match self.key.rfind('/') {
            Some(i) => &self.key[..=i],
            None => "",
        }
    }

    /// The key's last path segment.
    pub fn file_name(&self) -> &str {
        match self.key.rfind('/') {
            Some(i) => &self.key[i + 1..],
            None => &self.key,
        }
    }
}

impl fmt::Display for S3Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// Why a string is not an `s3://bucket/key` address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not an s3://bucket/key address: {0:?}")]
pub struct S3UriError(pub String);

impl FromStr for S3Uri {
    type Err = S3UriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| S3UriError(s.to_string()))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(S3UriError(s.to_string()));
        }
        Ok(Self::new(bucket, key))
    }
}

/// Characters left as they are when a key is percent-encoded for S3 (`CopySource`,
/// notification bodies): unreserved characters and `/`.
const KEY_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes a key (spaces as `%20`, `+` as `%2B`), keeping `/`.
pub fn encode_key(key: &str) -> String {
    percent_encoding::utf8_percent_encode(key, KEY_ENCODE).to_string()
}

/// Joins a prefix and a relative key with exactly one `/` between them (an empty prefix adds none).
pub fn join_key(prefix: &str, rest: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let rest = rest.trim_start_matches('/');
    if prefix.is_empty() {
        rest.to_string()
    } else {
        format!("{prefix}/{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bucket_and_key_with_slashes() {
        let u: S3Uri = "s3://b/a/b c.csv".parse().unwrap();
        assert_eq!(u.bucket, "b");
        assert_eq!(u.key, "a/b c.csv");
        assert_eq!(u.folder(), "a/");
        assert_eq!(u.file_name(), "b c.csv");
        assert_eq!(u.to_string(), "s3://b/a/b c.csv");
    }

    #[test]
    fn rejects_other_schemes_and_empty_bucket() {
        assert!("https://b/k".parse::<S3Uri>().is_err());
        assert!("s3:///k".parse::<S3Uri>().is_err());
    }

    #[test]
    fn encode_key_round_trips_through_notification_decoding() {
        let key = "in/a b+c=é %.csv";
        assert_eq!(encode_key(key), "in/a%20b%2Bc%3D%C3%A9%20%25.csv");
        assert_eq!(
            crate::trigger::decode_s3_key(&encode_key(key)).unwrap(),
            key
        );
    }

    #[test]
    fn join_key_puts_one_slash() {
        assert_eq!(join_key("state/", "/r/x"), "state/r/x");
        assert_eq!(join_key("", "x"), "x");
    }
}
