//! [`ParseError`]: a digest or an image reference that does not parse.

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("parse digest `{text}`: {reason}")]
    ParseDigest { text: String, reason: String },

    #[error("parse image reference `{text}`: {reason}")]
    ParseReference { text: String, reason: String },
}
