//! Whether the binary runs under Lambda (the runtime API is set) or as an operator's CLI.

/// The environment variable Lambda (and cargo-lambda's emulator) sets for the runtime API.
pub const RUNTIME_API_VAR: &str = "AWS_LAMBDA_RUNTIME_API";

/// True when the process was started by a Lambda runtime.
pub fn is_lambda() -> bool {
    std::env::var_os(RUNTIME_API_VAR).is_some()
}

/// Reads an optional environment variable with a default.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Reads an optional environment variable and parses it, naming it when it does not parse.
pub fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> Result<T, ConfigError> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| ConfigError::Invalid(name.to_string(), v)),
        Err(_) => Ok(default),
    }
}

/// A configuration variable is missing or wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A required variable is not set.
    #[error("environment variable {0} is required")]
    Missing(String),
    /// A variable does not parse.
    #[error("environment variable {0} has an invalid value {1:?}")]
    Invalid(String, String),
}
