//! The Braze REST API key: where it comes from (Secrets Manager, SSM SecureString, or a plain
//! value for local use) and a newtype that never prints it. Resolve it once per container and
//! keep it in an [`ApiKeyCache`]; when Braze refuses it, read it again from its store
//! ([`KeyReread`], bypassing the cache) so a rotated key is picked up without a cold start.

use std::fmt;
use std::sync::Arc;

use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata};
use tokio::sync::OnceCell;

/// A Braze REST API key. `Debug` and `Display` print `ApiKey(***)`; the only way to read it is
/// [`ApiKey::expose`], used when building the `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    /// Wraps a key after trimming surrounding whitespace. Refuses an empty key, one wrapped in
    /// quotes (Braze answers 401 to those) and one that cannot travel in an HTTP header.
    pub fn new(raw: impl AsRef<str>) -> Result<Self, ApiKeyError> {
        let key = raw.as_ref().trim();
        if key.is_empty() {
            return Err(ApiKeyError::Invalid {
                reason: "the key is empty".into(),
            });
        }
        if key.starts_with(['"', '\'']) || key.ends_with(['"', '\'']) {
            return Err(ApiKeyError::Invalid {
                reason: "the key is wrapped in quotes; store the bare key".into(),
            });
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiKeyError::Invalid {
                reason: "the key contains spaces or non-printable characters".into(),
            });
        }
        Ok(Self(Arc::from(key)))
    }

    /// The key itself. Only the HTTP client calls this.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// Where the key is stored.
#[derive(Clone, PartialEq, Eq)]
pub enum ApiKeySource {
    /// AWS Secrets Manager secret (name or ARN). The secret string is the key itself, or JSON
    /// with an `api_key` (or `braze_api_key`) field.
    SecretsManager(String),
    /// SSM Parameter Store SecureString (name or ARN), read with decryption.
    Ssm(String),
    /// A key given directly (local runs only).
    Plain(ApiKey),
}

impl fmt::Debug for ApiKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiKeySource::SecretsManager(id) => write!(f, "SecretsManager({id})"),
            ApiKeySource::Ssm(name) => write!(f, "Ssm({name})"),
            ApiKeySource::Plain(_) => f.write_str("Plain(***)"),
        }
    }
}

impl ApiKeySource {
    /// Reads a reference to a stored key: a Secrets Manager ARN (`arn:aws:secretsmanager:...`),
    /// an SSM parameter ARN (`arn:aws:ssm:...:parameter/...`), or `secretsmanager:<name>` /
    /// `ssm:<name>`. Returns `None` for anything else (it is not a reference).
    pub fn parse_reference(s: &str) -> Option<Self> {
        let s = s.trim();
        let arn_service = |svc: &str| {
            s.starts_with("arn:")
                && s.split(':').nth(2).is_some_and(|part| part == svc)
                && s.split(':').count() >= 6
        };
        if arn_service("secretsmanager") {
            Some(ApiKeySource::SecretsManager(s.to_string()))
        } else if arn_service("ssm") {
            Some(ApiKeySource::Ssm(s.to_string()))
        } else if let Some(rest) = s.strip_prefix("secretsmanager:") {
            (!rest.is_empty()).then(|| ApiKeySource::SecretsManager(rest.to_string()))
        } else if let Some(rest) = s.strip_prefix("ssm:") {
            (!rest.is_empty()).then(|| ApiKeySource::Ssm(rest.to_string()))
        } else {
            None
        }
    }

    /// Fetches the key. Call once per container (see [`ApiKeyCache`]).
    pub async fn resolve(&self, aws: &aws_config::SdkConfig) -> Result<ApiKey, ApiKeyError> {
        match self {
            ApiKeySource::Plain(k) => Ok(k.clone()),
            ApiKeySource::SecretsManager(id) => {
                let client = aws_sdk_secretsmanager::Client::new(aws);
                let out = client
                    .get_secret_value()
                    .secret_id(id)
                    .send()
                    .await
                    .map_err(|e| ApiKeyError::Fetch {
                        source_name: format!("Secrets Manager secret {id}"),
                        code: e.code().map(str::to_string),
                        message: DisplayErrorContext(&e).to_string(),
                    })?;
                let text = match (out.secret_string(), out.secret_binary()) {
                    (Some(s), _) => s.to_string(),
                    (None, Some(b)) => {
                        String::from_utf8(b.as_ref().to_vec()).map_err(|_| ApiKeyError::Format {
                            source_name: format!("Secrets Manager secret {id}"),
                            reason: "the binary secret is not UTF-8 text".into(),
                        })?
                    }
                    (None, None) => {
                        return Err(ApiKeyError::Format {
                            source_name: format!("Secrets Manager secret {id}"),
                            reason: "the secret has no value".into(),
                        });
                    }
                };
                key_from_secret_text(&text).map_err(|reason| ApiKeyError::Format {
                    source_name: format!("Secrets Manager secret {id}"),
                    reason,
                })
            }
            ApiKeySource::Ssm(name) => {
                let client = aws_sdk_ssm::Client::new(aws);
                let out = client
                    .get_parameter()
                    .name(name)
                    .with_decryption(true)
                    .send()
                    .await
                    .map_err(|e| ApiKeyError::Fetch {
                        source_name: format!("SSM parameter {name}"),
                        code: aws_sdk_ssm::error::ProvideErrorMetadata::code(&e)
                            .map(str::to_string),
                        message: aws_sdk_ssm::error::DisplayErrorContext(&e).to_string(),
                    })?;
                let param = out.parameter().ok_or_else(|| ApiKeyError::Format {
                    source_name: format!("SSM parameter {name}"),
                    reason: "the parameter has no value".into(),
                })?;
                if param.r#type() != Some(&aws_sdk_ssm::types::ParameterType::SecureString) {
                    return Err(ApiKeyError::Format {
                        source_name: format!("SSM parameter {name}"),
                        reason: "the parameter is not a SecureString; store the key encrypted"
                            .into(),
                    });
                }
                let value = param.value().unwrap_or("");
                ApiKey::new(value).map_err(|e| ApiKeyError::Format {
                    source_name: format!("SSM parameter {name}"),
                    reason: e.to_string(),
                })
            }
        }
    }
}

/// The key from a secret's text: the text itself, a JSON string, or a JSON object with
/// `api_key` / `braze_api_key`. The reason never contains the text.
pub fn key_from_secret_text(text: &str) -> Result<ApiKey, String> {
    let trimmed = text.trim();
    if trimmed.starts_with('{') || trimmed.starts_with('"') {
        let v: serde_json::Value = serde_json::from_str(trimmed).map_err(|e| {
            format!(
                "the secret looks like JSON but does not parse (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        let found = match &v {
            serde_json::Value::String(s) => Some(s.as_str()),
            serde_json::Value::Object(o) => ["api_key", "braze_api_key", "BRAZE_API_KEY"]
                .iter()
                .find_map(|k| o.get(*k).and_then(|x| x.as_str())),
            _ => None,
        };
        let Some(k) = found else {
            return Err(
                "the secret is JSON without a string field named api_key (or braze_api_key)".into(),
            );
        };
        return ApiKey::new(k).map_err(|e| e.to_string());
    }
    ApiKey::new(trimmed).map_err(|e| e.to_string())
}

/// Why the key could not be had. Never contains the key.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    /// The key's text is unusable.
    #[error("Braze API key is invalid: {reason}")]
    Invalid {
        /// Why (never the key).
        reason: String,
    },
    /// The store refused or failed.
    #[error("could not read the Braze API key from {source_name}: {message}")]
    Fetch {
        /// `Secrets Manager secret <id>` or `SSM parameter <name>`.
        source_name: String,
        /// The service error code (`AccessDeniedException`, `ResourceNotFoundException`, ...).
        code: Option<String>,
        /// The service's message.
        message: String,
    },
    /// The stored value is not a usable key.
    #[error("the Braze API key stored in {source_name} is unusable: {reason}")]
    Format {
        /// `Secrets Manager secret <id>` or `SSM parameter <name>`.
        source_name: String,
        /// Why (never the value).
        reason: String,
    },
}

impl ApiKeyError {
    /// Whether trying again later can help (throttling or a network problem, not a missing
    /// secret or a denied read).
    pub fn is_retryable(&self) -> bool {
        match self {
            ApiKeyError::Fetch { code, .. } => !matches!(
                code.as_deref(),
                Some(
                    "AccessDeniedException"
                        | "ResourceNotFoundException"
                        | "ParameterNotFound"
                        | "InvalidKeyId"
                        | "DecryptionFailure"
                        | "ValidationException"
                        | "InvalidParameterException"
                        | "InvalidRequestException"
                )
            ),
            _ => false,
        }
    }
}

/// Reads the key again from where it is stored, bypassing any per-container cache (after a
/// 401/403: the key may have been rotated or fixed since the container started).
#[async_trait::async_trait]
pub trait KeyReread: Send + Sync {
    /// The key as stored now.
    async fn reread(&self) -> Result<ApiKey, ApiKeyError>;
}

/// [`KeyReread`] over the configured source and the container's AWS configuration.
#[derive(Debug, Clone)]
pub struct SourceReread {
    /// Where the key is stored.
    pub source: ApiKeySource,
    /// AWS configuration (region, credentials, endpoint).
    pub aws: aws_config::SdkConfig,
}

#[async_trait::async_trait]
impl KeyReread for SourceReread {
    async fn reread(&self) -> Result<ApiKey, ApiKeyError> {
        self.source.resolve(&self.aws).await
    }
}

/// The key resolved at most once per container (a Lambda container serves many invocations).
#[derive(Debug)]
pub struct ApiKeyCache {
    source: ApiKeySource,
    cell: OnceCell<ApiKey>,
}

impl ApiKeyCache {
    /// A cache over `source`; nothing is fetched until [`ApiKeyCache::get`].
    pub fn new(source: ApiKeySource) -> Self {
        Self {
            source,
            cell: OnceCell::new(),
        }
    }

    /// The key, fetched on first use. A failed fetch is not cached (the next call tries again).
    pub async fn get(&self, aws: &aws_config::SdkConfig) -> Result<ApiKey, ApiKeyError> {
        self.cell
            .get_or_try_init(|| self.source.resolve(aws))
            .await
            .cloned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_key() {
        let k = ApiKey::new("abc-123-secret").unwrap();
        assert_eq!(format!("{k:?}"), "ApiKey(***)");
        assert_eq!(format!("{k}"), "ApiKey(***)");
        assert_eq!(
            format!("{:?}", ApiKeySource::Plain(k.clone())),
            "Plain(***)"
        );
        assert_eq!(k.expose(), "abc-123-secret");
    }

    #[test]
    fn quoted_or_empty_keys_are_refused_without_echoing_them() {
        for bad in ["", "  ", "\"abc-secret\"", "'abc-secret'", "abc secret"] {
            let err = ApiKey::new(bad).unwrap_err().to_string();
            assert!(!err.contains("abc"), "{err}");
        }
    }

    #[test]
    fn secret_text_may_be_bare_json_string_or_object() {
        assert_eq!(key_from_secret_text(" k-1\n").unwrap().expose(), "k-1");
        assert_eq!(key_from_secret_text("\"k-2\"").unwrap().expose(), "k-2");
        assert_eq!(
            key_from_secret_text(r#"{"api_key": "k-3", "other": 1}"#)
                .unwrap()
                .expose(),
            "k-3"
        );
        assert_eq!(
            key_from_secret_text(r#"{"braze_api_key": "k-4"}"#)
                .unwrap()
                .expose(),
            "k-4"
        );
    }

    #[test]
    fn json_secret_without_the_field_names_the_field_not_the_value() {
        let err = key_from_secret_text(r#"{"token": "k-secret-5"}"#).unwrap_err();
        assert!(err.contains("api_key"));
        assert!(!err.contains("k-secret-5"));
        let err = key_from_secret_text(r#"{"api_key": "k-secret-6""#).unwrap_err();
        assert!(!err.contains("k-secret-6"));
    }

    #[test]
    fn references_are_recognised_by_arn_service_or_prefix() {
        assert_eq!(
            ApiKeySource::parse_reference(
                "arn:aws:secretsmanager:us-east-1:123456789012:secret:braze-AbCdEf"
            ),
            Some(ApiKeySource::SecretsManager(
                "arn:aws:secretsmanager:us-east-1:123456789012:secret:braze-AbCdEf".into()
            ))
        );
        assert_eq!(
            ApiKeySource::parse_reference("arn:aws:ssm:eu-west-1:123456789012:parameter/braze/key"),
            Some(ApiKeySource::Ssm(
                "arn:aws:ssm:eu-west-1:123456789012:parameter/braze/key".into()
            ))
        );
        assert_eq!(
            ApiKeySource::parse_reference("ssm:/braze/key"),
            Some(ApiKeySource::Ssm("/braze/key".into()))
        );
        assert_eq!(
            ApiKeySource::parse_reference("secretsmanager:braze"),
            Some(ApiKeySource::SecretsManager("braze".into()))
        );
        assert_eq!(ApiKeySource::parse_reference("just-a-key"), None);
    }

    #[tokio::test]
    async fn plain_source_resolves_once_through_the_cache() {
        let cache = ApiKeyCache::new(ApiKeySource::Plain(ApiKey::new("local-key").unwrap()));
        let aws = aws_config::SdkConfig::builder().build();
        assert_eq!(cache.get(&aws).await.unwrap().expose(), "local-key");
        assert_eq!(cache.get(&aws).await.unwrap().expose(), "local-key");
    }
}
