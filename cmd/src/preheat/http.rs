//! The preheat API's HTTP/1.1 side: routes, the caller's credential, status codes and
//! bodies as Harbor's provider client reads them (any 2xx is success; on an error it shows
//! the status and body).

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use shoal_config::PreheatAuth;

use super::api::{CreateJob, JobView};
use super::Preheater;

/// A create request larger than this is not one of ours.
pub const MAX_BODY_BYTES: usize = 64 << 10;
pub const HEALTH_PATH: &str = "/healthy";
pub const JOBS_PATH: &str = "/oapi/v1/jobs";

type Answer = Response<Full<Bytes>>;

/// Answers one request.
pub async fn answer(preheater: Arc<Preheater>, request: Request<Incoming>) -> Answer {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    // Health answers everyone, as Dragonfly's does: it says nothing but "up".
    if path == HEALTH_PATH {
        return match method {
            Method::GET | Method::HEAD => text(StatusCode::OK, "OK"),
            _ => not_allowed(),
        };
    }
    if !admitted(&preheater.auth, request.headers().get(AUTHORIZATION)) {
        let mut answer = message(StatusCode::UNAUTHORIZED, "unauthorized");
        let challenge = match preheater.auth {
            PreheatAuth::Basic { .. } => "Basic realm=\"shoal-preheat\"",
            _ => "Bearer realm=\"shoal-preheat\"",
        };
        answer
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        return answer;
    }
    if path == JOBS_PATH {
        if method != Method::POST {
            return not_allowed();
        }
        let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return message(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("a job request is at most {MAX_BODY_BYTES} bytes"),
                )
            }
        };
        let request: CreateJob = match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(error) => return message(StatusCode::BAD_REQUEST, &format!("parse job: {error}")),
        };
        let preheat = match request.validate() {
            Ok(preheat) => preheat,
            Err(why) => return message(StatusCode::BAD_REQUEST, &why),
        };
        return match preheater.start(preheat) {
            Ok(job) => json(StatusCode::OK, &preheater.view(&job)),
            Err(_) => message(
                StatusCode::TOO_MANY_REQUESTS,
                "too many preheat jobs running; try again later",
            ),
        };
    }
    if let Some(id) = path
        .strip_prefix(JOBS_PATH)
        .and_then(|p| p.strip_prefix('/'))
    {
        if method != Method::GET {
            return not_allowed();
        }
        return match id.parse::<u64>().ok().and_then(|id| preheater.jobs.get(id)) {
            Some(job) => json(StatusCode::OK, &preheater.view(&job)),
            None => message(StatusCode::NOT_FOUND, &format!("no job {id}")),
        };
    }
    message(StatusCode::NOT_FOUND, "not found")
}

/// Whether `given` is the `Authorization` the config asks for.
pub fn admitted(auth: &PreheatAuth, given: Option<&HeaderValue>) -> bool {
    let given = given.map(HeaderValue::as_bytes).unwrap_or_default();
    match auth {
        PreheatAuth::None => true,
        PreheatAuth::Bearer(token) => same(given, format!("Bearer {token}").as_bytes()),
        PreheatAuth::Basic { username, password } => same(
            given,
            format!("Basic {}", BASE64.encode(format!("{username}:{password}"))).as_bytes(),
        ),
    }
}

/// Compares in time that does not depend on where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json(status: StatusCode, view: &JobView) -> Answer {
    let body = serde_json::to_vec(view).unwrap_or_default();
    with_type(status, body.into(), "application/json; charset=utf-8")
}

/// An error as Dragonfly's manager writes one: `{"message": ...}`.
fn message(status: StatusCode, text: &str) -> Answer {
    let body = serde_json::to_vec(&serde_json::json!({ "message": text })).unwrap_or_default();
    with_type(status, body.into(), "application/json; charset=utf-8")
}

fn text(status: StatusCode, text: &'static str) -> Answer {
    with_type(
        status,
        Bytes::from_static(text.as_bytes()),
        "text/plain; charset=utf-8",
    )
}

fn not_allowed() -> Answer {
    message(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

fn with_type(status: StatusCode, body: Bytes, kind: &'static str) -> Answer {
    let mut answer = Response::new(Full::new(body));
    *answer.status_mut() = status;
    answer
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_as_harbors_auth_modes_send_them() {
        let header = |text: &str| HeaderValue::from_str(text).unwrap();
        assert!(admitted(&PreheatAuth::None, None));
        let bearer = PreheatAuth::Bearer("t0k".into());
        assert!(admitted(&bearer, Some(&header("Bearer t0k"))));
        assert!(!admitted(&bearer, Some(&header("Bearer t0K"))));
        assert!(!admitted(&bearer, Some(&header("t0k"))));
        assert!(!admitted(&bearer, None));
        let basic = PreheatAuth::Basic {
            username: "harbor".into(),
            password: "pw".into(),
        };
        // Go's `SetBasicAuth("harbor", "pw")`.
        assert!(admitted(&basic, Some(&header("Basic aGFyYm9yOnB3"))));
        assert!(!admitted(&basic, Some(&header("Basic aGFyYm9yOnB4"))));
        assert!(!admitted(&basic, None));
    }
}
