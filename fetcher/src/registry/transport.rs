//! One HTTP attempt: send, follow redirects without leaking credentials, read the body within
//! its bounds.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use reqwest::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, LOCATION,
};
use reqwest::{Client, Response, StatusCode, Url};

use super::failure::HttpFailure;

/// Registries redirect blobs to storage once; chains longer than this are loops.
const MAX_REDIRECTS: usize = 10;
/// Buffers start at most this large and grow with the bytes that actually arrive.
const MAX_PREALLOCATION: u64 = 16 << 20;

/// What to make of a successful response's body.
#[derive(Debug, Clone)]
pub enum BodyPlan {
    /// The whole body, which must not exceed `limit` bytes.
    Full { limit: u64 },
    /// Bytes `range` of a blob of `blob_size` bytes, from a 206 or sliced out of a 200.
    Range { range: Range<u64>, blob_size: u64 },
}

/// A final (non-redirect) response. `body` is read only for 2xx statuses.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Sends a GET to `url`, following redirects. `auth` goes only to `url`'s own origin: blob
/// storage behind a redirect gets its credentials from the signed URL, never from us.
pub async fn attempt(
    client: &Client,
    url: &Url,
    headers: &HeaderMap,
    auth: Option<&HeaderValue>,
    plan: &BodyPlan,
) -> Result<Reply, HttpFailure> {
    let origin = url.origin();
    let mut current = url.clone();
    for _ in 0..=MAX_REDIRECTS {
        let mut request = client.get(current.clone()).headers(headers.clone());
        if let Some(auth) = auth.filter(|_| current.origin() == origin) {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let response = request
            .send()
            .await
            .map_err(|error| send_failure(&current, error))?;
        if !response.status().is_redirection() {
            return read_reply(response, plan).await;
        }
        current = redirect_target(&current, &response)?;
    }
    Err(HttpFailure::Redirect {
        reason: format!("more than {MAX_REDIRECTS} redirects"),
    })
}

/// A request that got no response: [`HttpFailure::PlainHttp`] when TLS met a plain-HTTP
/// answer (so the message can name the setting), else the transport error.
pub fn send_failure(url: &Url, error: reqwest::Error) -> HttpFailure {
    if url.scheme() == "https" && answered_plain_http(&error) {
        let host = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => url.as_str().to_owned(),
        };
        return HttpFailure::PlainHttp { host };
    }
    HttpFailure::Transport { error }
}

/// Whether TLS failed because the first bytes back were no TLS record at all, as when an
/// HTTP server answers a ClientHello. rustls's error sits inside `io::Error`s, whose
/// `source` skips what they wrap, so each one is opened instead.
fn answered_plain_http(error: &reqwest::Error) -> bool {
    let is_it = |error: &(dyn std::error::Error + 'static)| {
        matches!(
            error.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))
        )
    };
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = next {
        if is_it(error) {
            return true;
        }
        next = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    false
}

fn redirect_target(current: &Url, response: &Response) -> Result<Url, HttpFailure> {
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| HttpFailure::Redirect {
            reason: format!("status {} without a usable location", response.status()),
        })?;
    let target = current.join(location).map_err(|e| HttpFailure::Redirect {
        reason: format!("location `{location}`: {e}"),
    })?;
    if !matches!(target.scheme(), "http" | "https") {
        return Err(HttpFailure::Redirect {
            reason: format!("location `{location}` is not http(s)"),
        });
    }
    Ok(target)
}

async fn read_reply(mut response: Response, plan: &BodyPlan) -> Result<Reply, HttpFailure> {
    let status = response.status();
    let headers = std::mem::take(response.headers_mut());
    let body = if !status.is_success() {
        Bytes::new()
    } else {
        match plan {
            BodyPlan::Full { limit } => read_full(response, &headers, *limit).await?,
            BodyPlan::Range { range, blob_size } if status == StatusCode::PARTIAL_CONTENT => {
                check_content_range(&headers, range, *blob_size)?;
                read_exact(response, range.end - range.start).await?
            }
            BodyPlan::Range { range, blob_size } if status == StatusCode::OK => {
                // The server ignored `Range`; take our slice of the whole blob as it streams by.
                if let Some(length) = content_length(&headers) {
                    if length != *blob_size {
                        return Err(HttpFailure::Length {
                            expected: *blob_size,
                            actual: length,
                        });
                    }
                }
                read_slice(response, range.clone()).await?
            }
            BodyPlan::Range { .. } => {
                return Err(HttpFailure::Malformed {
                    reason: format!("status {status} to a range request"),
                })
            }
        }
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// `Content-Range: bytes <first>-<last>/<total or *>` must describe exactly what was asked.
fn check_content_range(
    headers: &HeaderMap,
    range: &Range<u64>,
    blob_size: u64,
) -> Result<(), HttpFailure> {
    let header = headers
        .get(CONTENT_RANGE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let mismatch = || HttpFailure::ContentRange {
        header: header.chars().take(100).collect(),
    };
    let spec = header.strip_prefix("bytes ").ok_or_else(mismatch)?;
    let (span, total) = spec.split_once('/').ok_or_else(mismatch)?;
    let (first, last) = span.split_once('-').ok_or_else(mismatch)?;
    let first: u64 = first.trim().parse().map_err(|_| mismatch())?;
    let last: u64 = last.trim().parse().map_err(|_| mismatch())?;
    let total_matches = total == "*" || total.parse::<u64>() == Ok(blob_size);
    if first != range.start || last.checked_add(1) != Some(range.end) || !total_matches {
        return Err(mismatch());
    }
    Ok(())
}

async fn read_full(
    mut response: Response,
    headers: &HeaderMap,
    limit: u64,
) -> Result<Bytes, HttpFailure> {
    let declared = content_length(headers);
    if declared.is_some_and(|length| length > limit) {
        return Err(HttpFailure::TooLarge { limit });
    }
    let capacity = declared.unwrap_or(0).min(MAX_PREALLOCATION);
    let mut body = BytesMut::with_capacity(capacity as usize);
    while let Some(chunk) = next_chunk(&mut response).await? {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(HttpFailure::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Exactly `len` bytes: a shorter or longer body is an error, however the server framed it.
async fn read_exact(mut response: Response, len: u64) -> Result<Bytes, HttpFailure> {
    let mut body = BytesMut::with_capacity(len.min(MAX_PREALLOCATION) as usize);
    while let Some(chunk) = next_chunk(&mut response).await? {
        if body.len() as u64 + chunk.len() as u64 > len {
            return Err(HttpFailure::Length {
                expected: len,
                actual: body.len() as u64 + chunk.len() as u64,
            });
        }
        body.extend_from_slice(&chunk);
    }
    if body.len() as u64 != len {
        return Err(HttpFailure::Length {
            expected: len,
            actual: body.len() as u64,
        });
    }
    Ok(body.freeze())
}

/// Bytes `range` of a full-blob body; the connection is dropped once they have arrived.
async fn read_slice(mut response: Response, range: Range<u64>) -> Result<Bytes, HttpFailure> {
    let len = range.end - range.start;
    let mut body = BytesMut::with_capacity(len.min(MAX_PREALLOCATION) as usize);
    let mut position = 0u64;
    while (body.len() as u64) < len {
        let Some(chunk) = next_chunk(&mut response).await? else {
            break;
        };
        let chunk_end = position + chunk.len() as u64;
        let from = range.start.clamp(position, chunk_end) - position;
        let to = range.end.clamp(position, chunk_end) - position;
        body.extend_from_slice(&chunk[from as usize..to as usize]);
        position = chunk_end;
    }
    if body.len() as u64 != len {
        return Err(HttpFailure::Length {
            expected: len,
            actual: body.len() as u64,
        });
    }
    Ok(body.freeze())
}

async fn next_chunk(response: &mut Response) -> Result<Option<Bytes>, HttpFailure> {
    response
        .chunk()
        .await
        .map_err(|error| HttpFailure::Transport { error })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_range(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_RANGE, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn content_range_must_match() {
        let ok = |v| check_content_range(&with_range(v), &(10..20), 100).is_ok();
        assert!(ok("bytes 10-19/100"));
        assert!(ok("bytes 10-19/*"));
        assert!(!ok("bytes 10-18/100"));
        assert!(!ok("bytes 0-9/100"));
        assert!(!ok("bytes 10-19/99"));
        assert!(!ok("items 10-19/100"));
        assert!(!ok("bytes 10-18446744073709551615/100"));
        assert!(check_content_range(&HeaderMap::new(), &(0..1), 1).is_err());
    }
}
