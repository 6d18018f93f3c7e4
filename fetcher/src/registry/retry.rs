//! When to try an HTTP request again, and how long to wait first.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};

/// First backoff delay; each further attempt doubles it.
const BASE_DELAY: Duration = Duration::from_millis(100);
/// Backoff never grows beyond this.
const MAX_DELAY: Duration = Duration::from_secs(10);
/// A server's `Retry-After` is honoured up to this long; beyond it the wait is not worth it.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Retry budget, per-attempt deadline and whole-request deadline of registry requests.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts after the first one.
    pub retries: u32,
    /// Deadline of one attempt: connect, headers and body.
    pub timeout: Duration,
    /// Deadline of one request: every attempt, backoff and mirror together. Attempts stop
    /// when it runs out, whatever `retries` still allows.
    pub deadline: Duration,
}

/// What one request may still spend: its policy, and when its deadline falls.
#[derive(Debug, Clone, Copy)]
pub(super) struct Budget {
    pub policy: RetryPolicy,
    pub until: tokio::time::Instant,
}

impl RetryPolicy {
    /// The budget of a request that starts now.
    pub(super) fn start(self) -> Budget {
        Budget {
            policy: self,
            until: tokio::time::Instant::now() + self.deadline,
        }
    }

    /// This policy cut down to one attempt of at most `limit`.
    pub fn brief(self, limit: Duration) -> RetryPolicy {
        RetryPolicy {
            retries: 0,
            timeout: self.timeout.min(limit),
            deadline: self.deadline.min(limit),
        }
    }

    /// Delay before retry number `retry` (0-based): exponential with a little jitter, or the
    /// server's `Retry-After` when it asks for longer.
    pub fn delay(&self, retry: u32, headers: Option<&HeaderMap>) -> Duration {
        let exponential = BASE_DELAY
            .saturating_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX))
            .min(MAX_DELAY);
        let backoff = exponential + jitter(exponential / 4);
        match headers.and_then(retry_after) {
            Some(asked) => asked.min(MAX_RETRY_AFTER).max(backoff),
            None => backoff,
        }
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Spreads retries of many nodes apart; the clock's sub-second noise is random enough here.
fn jitter(max: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let max_nanos = max.as_nanos().max(1);
    Duration::from_nanos((u128::from(nanos) % max_nanos) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            retries: 3,
            timeout: Duration::from_secs(1),
            deadline: Duration::from_secs(10),
        };
        let first = policy.delay(0, None);
        assert!(first >= BASE_DELAY && first < BASE_DELAY * 2, "{first:?}");
        let third = policy.delay(2, None);
        assert!(third >= BASE_DELAY * 4, "{third:?}");
        assert!(policy.delay(40, None) <= MAX_DELAY + MAX_DELAY / 4);
    }

    #[test]
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        let policy = RetryPolicy {
            retries: 1,
            timeout: Duration::from_secs(1),
            deadline: Duration::from_secs(10),
        };
        assert_eq!(policy.delay(0, Some(&headers)), Duration::from_secs(3));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3600"));
        assert_eq!(policy.delay(0, Some(&headers)), MAX_RETRY_AFTER);

        let later = SystemTime::now() + Duration::from_secs(30);
        let date = httpdate::fmt_http_date(later);
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&date).unwrap());
        let parsed = retry_after(&headers).unwrap();
        assert!(parsed > Duration::from_secs(28) && parsed <= Duration::from_secs(30));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }
}
