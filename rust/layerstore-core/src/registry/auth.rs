//! Registry credentials: given by the caller, or read from the auth files podman and docker
//! write (`{"auths": {"host": {"auth": base64("user:password")}}}`).
//!
//! Invariants: a secret never appears in an error message, a `Debug` or `Display` output, or a
//! log; files are looked up in the order podman reads them — `$REGISTRY_AUTH_FILE`, then
//! `$XDG_RUNTIME_DIR/containers/auth.json`, then `~/.docker/config.json` — and the first entry that
//! matches wins, the most specific key (`host/namespace/repo`) before the bare host. `login`
//! writes the first of those files that applies, atomically, readable by its owner only, keeping
//! every other key of the file. Credential helpers (`credsStore`, `credHelpers`) are not run.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::error::{Error, IoContext, Result};

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({:?}, <redacted>)", self.username)
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic` header.
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    fn decode(encoded: &str) -> Option<Self> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (user, pass) = raw.split_once(':')?;
        Some(Credentials {
            username: user.to_string(),
            password: pass.to_string(),
        })
    }
}

/// The auth files, in the order they are read (those whose variable is unset are left out).
pub fn auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|p| !p.is_empty()) {
        files.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        files.push(Path::new(&p).join("containers").join("auth.json"));
    }
    if let Some(p) = std::env::var_os("HOME").filter(|p| !p.is_empty()) {
        files.push(Path::new(&p).join(".docker").join("config.json"));
    }
    files
}

/// A key of an `auths` map reduced to `host[/path]` (`https://index.docker.io/v1/` → `docker.io`).
fn normalise_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let k = k.trim_end_matches('/');
    let k = k
        .strip_suffix("/v1")
        .or_else(|| k.strip_suffix("/v2"))
        .unwrap_or(k);
    match k.split_once('/') {
        Some((host, rest)) => format!("{}/{rest}", canonical_host(host)),
        None => canonical_host(k).to_string(),
    }
}

fn canonical_host(h: &str) -> &str {
    match h {
        "index.docker.io" | "registry-1.docker.io" => super::reference::DOCKER_HUB,
        other => other,
    }
}

/// The keys to try for `registry`/`repository`, most specific first.
fn candidates(registry: &str, repository: &str) -> Vec<String> {
    let host = canonical_host(registry);
    let mut keys = Vec::new();
    let parts: Vec<&str> = repository.split('/').collect();
    for n in (1..=parts.len()).rev() {
        keys.push(format!("{host}/{}", parts[..n].join("/")));
    }
    keys.push(host.to_string());
    keys
}

/// Credentials for `registry`/`repository` from the auth files, if any names them.
pub fn lookup(registry: &str, repository: &str) -> Result<Option<Credentials>> {
    lookup_in(&auth_files(), registry, repository)
}

pub(crate) fn lookup_in(
    files: &[PathBuf],
    registry: &str,
    repository: &str,
) -> Result<Option<Credentials>> {
    let keys = candidates(registry, repository);
    for file in files {
        let Some(doc) = read_auth_file(file)? else {
            continue;
        };
        let Some(auths) = doc.get("auths").and_then(Value::as_object) else {
            continue;
        };
        for want in &keys {
            for (key, entry) in auths {
                if normalise_key(key) != *want {
                    continue;
                }
                if let Some(c) = entry
                    .get("auth")
                    .and_then(Value::as_str)
                    .and_then(Credentials::decode)
                {
                    return Ok(Some(c));
                }
            }
        }
    }
    Ok(None)
}

fn read_auth_file(path: &Path) -> Result<Option<Value>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    // The parser's message could quote the file's text (a secret): name the file only.
    serde_json::from_slice::<Value>(&bytes)
        .ok()
        .filter(Value::is_object)
        .map(Some)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} is not a JSON auth file ({{\"auths\": {{…}}}})",
                path.display()
            ))
        })
}

/// The file `login` writes: the first of [`auth_files`].
pub fn login_file() -> Result<PathBuf> {
    auth_files().into_iter().next().ok_or_else(|| {
        Error::InvalidArgument(
            "no auth file: set REGISTRY_AUTH_FILE, XDG_RUNTIME_DIR or HOME".to_string(),
        )
    })
}

/// Record `creds` for `registry` in [`login_file`]; returns that file.
pub fn store(registry: &str, creds: &Credentials) -> Result<PathBuf> {
    let path = login_file()?;
    let raw = format!("{}:{}", creds.username, creds.password);
    let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
    update(&path, |auths| {
        auths.retain(|k, _| normalise_key(k) != canonical_host(registry));
        auths.insert(registry.to_string(), json!({ "auth": encoded }));
    })?;
    Ok(path)
}

/// Forget the credentials of `registry` in every auth file; returns whether any was removed.
pub fn remove(registry: &str) -> Result<bool> {
    let mut removed = false;
    for path in auth_files() {
        if read_auth_file(&path)?.is_none() {
            continue;
        }
        update(&path, |auths| {
            let before = auths.len();
            auths.retain(|k, _| normalise_key(k) != canonical_host(registry));
            removed |= auths.len() != before;
        })?;
    }
    Ok(removed)
}

/// Rewrite the `auths` map of `path` (created if missing) through a temporary file.
fn update(path: &Path, change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Result<()> {
    let mut doc = read_auth_file(path)?.unwrap_or_else(|| json!({}));
    let obj = doc.as_object_mut().expect("read_auth_file checked");
    let auths = obj.entry("auths").or_insert_with(|| json!({}));
    if !auths.is_object() {
        *auths = json!({});
    }
    change(auths.as_object_mut().expect("made an object"));
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".tmp-{}", crate::owner::unique_name()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .ctx(|| format!("creating {}", tmp.display()))?;
        let bytes = serde_json::to_vec_pretty(&doc).expect("a JSON value serialises");
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .ctx(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, path).ctx(|| format!("writing {}", path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_auth_files_match_the_most_specific_key_first() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.json");
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        fs::write(
            &a,
            json!({"auths": {
                "https://index.docker.io/v1/": {"auth": enc("hub:pw1")},
                "reg.example:5000": {"auth": enc("host:pw2")},
                "reg.example:5000/team": {"auth": enc("team:pw3")},
            }})
            .to_string(),
        )
        .unwrap();
        let files = vec![dir.path().join("missing.json"), a];
        let user =
            |reg: &str, repo: &str| lookup_in(&files, reg, repo).unwrap().map(|c| c.username);
        assert_eq!(user("docker.io", "library/debian").as_deref(), Some("hub"));
        assert_eq!(
            user("reg.example:5000", "other/app").as_deref(),
            Some("host")
        );
        assert_eq!(
            user("reg.example:5000", "team/app").as_deref(),
            Some("team")
        );
        assert_eq!(user("elsewhere.example", "app"), None);
        let c = lookup_in(&files, "reg.example:5000", "x").unwrap().unwrap();
        assert!(
            !format!("{c:?}").contains("pw2"),
            "Debug shows the password"
        );
    }

    #[test]
    fn registry_a_malformed_auth_file_error_quotes_none_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.json");
        fs::write(&a, b"{\"auths\": secret-password").unwrap();
        let e = lookup_in(&[a], "h", "r").unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
    }
}
