//! One repository of one registry over HTTP: authentication, retries and redirects, so that
//! pull and push see only the distribution API's answers.
//!
//! Invariants:
//! - Credentials (a Basic header or a Bearer token) go only to the origin (scheme, host and
//!   port) of the registry they belong to, and to the token realm its challenge names; a
//!   redirect elsewhere (a blob store) is followed without them.
//! - A request is retried, with exponential backoff, on connection errors and on 408, 429 and
//!   5xx (a `Retry-After` in seconds is honoured, capped); a 401 is answered once by the
//!   challenge it carries; a 401 or 403 after that is [`Error::RegistryDenied`].
//! - No message carries a secret or a URL's query (upload URLs carry the registry's state).
//! - Plain HTTP is used only when the caller turned TLS verification off and the registry
//!   does not speak TLS (as skopeo's `--tls-verify=false`).

use std::io::Read;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use ureq::http::{self, Method};

use super::auth::Credentials;
use crate::error::{Error, Result};

/// Largest error or token document read from a registry.
const SMALL_BODY: u64 = 64 << 10;
/// Longest wait a `Retry-After` may impose.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Redirects followed for one request.
const MAX_REDIRECTS: u32 = 10;

/// How to reach a registry.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Verify TLS certificates (and never fall back to plain HTTP).
    pub tls_verify: bool,
    /// A PEM file of CA certificates to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Retries of a request after the first attempt.
    pub retries: u32,
    /// Credentials given by the caller; `None` looks in the auth files.
    pub credentials: Option<Credentials>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            tls_verify: true,
            ca_file: None,
            retries: 4,
            credentials: None,
        }
    }
}

/// An HTTP answer from the registry (any status other than those the client handles itself).
pub(crate) struct Answer {
    pub status: u16,
    pub url: String,
    response: http::Response<ureq::Body>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<String> {
        self.response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }

    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }

    pub fn into_reader(self) -> ureq::BodyReader<'static> {
        self.response.into_body().into_reader()
    }

    /// The body, refused when over `limit` bytes.
    pub fn read_limited(self, limit: u64, what: &str) -> Result<Vec<u8>> {
        if self.content_length().is_some_and(|n| n > limit) {
            return Err(too_large(what, limit));
        }
        let url = self.url.clone();
        let mut bytes = Vec::new();
        self.into_reader()
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| network(&url, &e.to_string()))?;
        if bytes.len() as u64 > limit {
            return Err(too_large(what, limit));
        }
        Ok(bytes)
    }

    /// The registry's error codes (`MANIFEST_UNKNOWN`, …) or the start of its body.
    pub fn reason(self) -> String {
        let status = self.status;
        let body = self
            .read_limited(SMALL_BODY, "an error body")
            .unwrap_or_default();
        let codes: Vec<String> = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("errors").and_then(Value::as_array).cloned())
            .unwrap_or_default()
            .iter()
            .map(|e| {
                let code = e.get("code").and_then(Value::as_str).unwrap_or("?");
                match e.get("message").and_then(Value::as_str) {
                    Some(m) => format!("{code}: {m}"),
                    None => code.to_string(),
                }
            })
            .collect();
        if codes.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status} {}", codes.join("; "))
        }
    }

    /// An error for an answer the caller did not expect.
    pub fn unexpected(self, doing: &str) -> Error {
        let url = redact(&self.url);
        Error::Registry {
            url,
            reason: format!("{doing}: {}", self.reason()),
        }
    }
}

fn too_large(what: &str, limit: u64) -> Error {
    Error::InvalidImage {
        blob: what.to_string(),
        reason: format!("over the {limit}-byte limit"),
    }
}

/// A URL without its query (registries put upload state there) for messages.
pub(crate) fn redact(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or(url).to_string()
}

fn network(url: &str, reason: &str) -> Error {
    Error::Network {
        url: redact(url),
        reason: reason.to_string(),
    }
}

/// `scheme://host[:port]` of an absolute URL.
fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    let end = url[after..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| after + i);
    &url[..end]
}

/// Percent-encode a query value.
fn pct(s: &str) -> String {
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

/// The scheme and parameters of a `WWW-Authenticate` header.
pub(crate) fn parse_challenge(header: &str) -> (String, Vec<(String, String)>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_ascii_lowercase();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        params.push((key, value.trim().to_string()));
    }
    (scheme.to_ascii_lowercase(), params)
}

/// A client for one repository.
pub(crate) struct Client {
    agent: ureq::Agent,
    /// `scheme://host[:port]` of the registry's API.
    base: String,
    registry: String,
    repository: String,
    credentials: Option<Credentials>,
    /// `pull` or `pull,push`: the scope a token is asked for.
    actions: &'static str,
    /// The `Authorization` value for the registry's origin, once a challenge asked for one.
    authorization: Mutex<Option<String>>,
    retries: u32,
}

impl Client {
    /// A client for `registry`/`repository` (`api_host` serving its API), after a first
    /// request to `/v2/` that settles the scheme and authenticates.
    pub fn connect(
        registry: &str,
        api_host: &str,
        repository: &str,
        opts: &ClientOptions,
        push: bool,
    ) -> Result<Self> {
        let credentials = match &opts.credentials {
            Some(c) => Some(c.clone()),
            None => super::auth::lookup(registry, repository)?,
        };
        let mut client = Client {
            agent: agent(opts)?,
            base: format!("https://{api_host}"),
            registry: registry.to_string(),
            repository: repository.to_string(),
            credentials,
            actions: if push { "pull,push" } else { "pull" },
            authorization: Mutex::new(None),
            retries: opts.retries,
        };
        if !opts.tls_verify {
            let probe = http::Request::get(format!("{}/v2/", client.base))
                .body(())
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            if client.agent.run(probe).is_err() {
                client.base = format!("http://{api_host}");
            }
        }
        let a = client.request(Method::GET, "/v2/", &[], None)?;
        match a.status {
            200 | 404 => Ok(client), // 404: no /v2/ check endpoint, the API may still work
            _ => Err(a.unexpected("checking the registry API")),
        }
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// An absolute URL for `path` (`/v2/…`), or `path` itself when it is one already.
    pub fn url(&self, path: &str) -> String {
        if path.contains("://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// `/v2/<repository>/<rest>`.
    pub fn repo_path(&self, rest: &str) -> String {
        format!("/v2/{}/{rest}", self.repository)
    }

    fn denied(&self, status: u16) -> Error {
        Error::RegistryDenied {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            status,
        }
    }

    /// Send a request, handling auth, retries and redirects; any other answer is returned.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Answer> {
        let mut url = self.url(path);
        let mut method = method;
        let mut attempt = 0u32;
        let mut redirects = 0u32;
        let mut answered_challenge = false;
        loop {
            let ours = origin(&url) == self.base;
            let mut b = http::Request::builder().method(method.clone()).uri(&url);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            if ours {
                if let Some(a) = self.authorization.lock().expect("not poisoned").clone() {
                    b = b.header("Authorization", a);
                }
            }
            let bad = |e: http::Error| Error::InvalidArgument(format!("bad request: {e}"));
            let sent = match body {
                Some(bytes) => self.agent.run(b.body(bytes).map_err(bad)?),
                None => self.agent.run(b.body(()).map_err(bad)?),
            };
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    if attempt < self.retries && transient(&e) {
                        attempt += 1;
                        std::thread::sleep(backoff(attempt));
                        continue;
                    }
                    return Err(network(&url, &e.to_string()));
                }
            };
            let status = response.status().as_u16();
            let a = Answer {
                status,
                url: url.clone(),
                response,
            };
            match status {
                401 if ours && !answered_challenge => {
                    answered_challenge = true;
                    let challenge = a.header("www-authenticate");
                    drop(a);
                    self.answer_challenge(challenge.as_deref())?;
                }
                401 | 403 if ours => return Err(self.denied(status)),
                301 | 302 | 303 | 307 | 308 => {
                    let Some(location) = a.header("location") else {
                        return Ok(a);
                    };
                    redirects += 1;
                    if redirects > MAX_REDIRECTS {
                        return Err(network(&url, "too many redirects"));
                    }
                    url = if location.contains("://") {
                        location
                    } else if location.starts_with('/') {
                        format!("{}{location}", origin(&url))
                    } else {
                        let dir = redact(&url);
                        let dir = dir.rsplit_once('/').map_or(dir.as_str(), |(d, _)| d);
                        format!("{dir}/{location}")
                    };
                    if status == 303 {
                        method = Method::GET;
                    }
                }
                408 | 429 | 500..=599 if attempt < self.retries => {
                    attempt += 1;
                    let wait = a
                        .header("retry-after")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map_or_else(|| backoff(attempt), Duration::from_secs)
                        .min(MAX_RETRY_AFTER);
                    drop(a);
                    std::thread::sleep(wait);
                }
                _ => return Ok(a),
            }
        }
    }

    /// Set the `Authorization` the registry's challenge asks for.
    fn answer_challenge(&self, challenge: Option<&str>) -> Result<()> {
        let (scheme, params) = parse_challenge(challenge.unwrap_or(""));
        let value = match scheme.as_str() {
            "basic" => match &self.credentials {
                Some(c) => c.basic_header(),
                None => return Err(self.denied(401)),
            },
            "bearer" => self.token(&params)?,
            _ => return Err(self.denied(401)),
        };
        *self.authorization.lock().expect("not poisoned") = Some(value);
        Ok(())
    }

    /// A Bearer token from the realm the challenge names (with the credentials, if any).
    fn token(&self, params: &[(String, String)]) -> Result<String> {
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let realm = get("realm").ok_or_else(|| self.denied(401))?;
        let scope = format!("repository:{}:{}", self.repository, self.actions);
        let mut url = format!("{realm}?scope={}", pct(&scope));
        if let Some(service) = get("service") {
            url.push_str(&format!("&service={}", pct(service)));
        }
        let mut last = String::new();
        for attempt in 0..=self.retries {
            let mut b = http::Request::get(&url);
            if let Some(c) = &self.credentials {
                b = b.header("Authorization", c.basic_header());
            }
            let req = b
                .body(())
                .map_err(|e| Error::InvalidArgument(format!("bad token request: {e}")))?;
            match self.agent.run(req) {
                Ok(r) if r.status().is_success() => {
                    let a = Answer {
                        status: 200,
                        url: url.clone(),
                        response: r,
                    };
                    let body = a.read_limited(SMALL_BODY, "a token response")?;
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let token = v
                        .get("token")
                        .or_else(|| v.get("access_token"))
                        .and_then(Value::as_str)
                        .filter(|t| !t.is_empty())
                        .ok_or_else(|| network(&url, "the token response has no token"))?;
                    return Ok(format!("Bearer {token}"));
                }
                Ok(r) if matches!(r.status().as_u16(), 401 | 403) => {
                    return Err(self.denied(r.status().as_u16()))
                }
                Ok(r) => last = format!("HTTP {}", r.status().as_u16()),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(backoff(attempt + 1));
        }
        Err(network(&url, &format!("getting a token: {last}")))
    }
}

/// Whether a failed request may succeed if sent again (a refused, reset or timed-out
/// connection), unlike a certificate the client does not trust or a malformed answer.
fn transient(e: &ureq::Error) -> bool {
    use std::io::ErrorKind as K;
    match e {
        ureq::Error::Io(io) => matches!(
            io.kind(),
            K::ConnectionRefused
                | K::ConnectionReset
                | K::ConnectionAborted
                | K::BrokenPipe
                | K::UnexpectedEof
                | K::TimedOut
                | K::Interrupted
                | K::NotConnected
        ),
        ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed => true,
        _ => false,
    }
}

/// 200 ms, 400 ms, 800 ms, … capped at 5 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(5)).min(5_000))
}

fn agent(opts: &ClientOptions) -> Result<ureq::Agent> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig};
    let roots = match &opts.ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            let certs = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect::<Vec<Certificate<'static>>>();
            if certs.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{} holds no PEM certificate",
                    path.display()
                )));
            }
            RootCerts::Specific(std::sync::Arc::new(certs))
        }
        None => RootCerts::PlatformVerifier,
    };
    let tls = TlsConfig::builder()
        .root_certs(roots)
        .disable_verification(!opts.tls_verify)
        .build();
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .tls_config(tls)
        .proxy(None)
        .user_agent(concat!("layerstore/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(120)))
        .timeout_per_read(Some(Duration::from_secs(120)))
        .build();
    Ok(config.new_agent())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_challenges_parse_with_commas_inside_quotes() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(scheme, "bearer");
        assert_eq!(
            params,
            vec![
                (
                    "realm".to_string(),
                    "https://auth.example/token".to_string()
                ),
                ("service".to_string(), "registry.example".to_string()),
                ("scope".to_string(), "repository:a/b:pull,push".to_string()),
            ]
        );
        let (scheme, params) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!((scheme.as_str(), params.len()), ("basic", 1));
    }

    #[test]
    fn registry_origins_and_redaction() {
        assert_eq!(origin("https://h:5000/v2/x?y=1"), "https://h:5000");
        assert_eq!(origin("http://h"), "http://h");
        assert_eq!(
            redact("http://h/v2/x/blobs/uploads/u?_state=abc"),
            "http://h/v2/x/blobs/uploads/u"
        );
        assert_eq!(
            pct("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }
}
