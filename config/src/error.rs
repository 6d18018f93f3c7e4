use std::path::PathBuf;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse config")]
    Parse { source: Box<toml::de::Error> },
    #[error("invalid value for `{field}`: {reason}")]
    InvalidValue { field: String, reason: String },
}

impl ConfigError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::InvalidValue {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
