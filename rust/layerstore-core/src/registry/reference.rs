//! Image references: `[host[:port]/]repository[:tag][@algorithm:hex]`, resolved with Docker Hub's
//! defaults exactly as docker and skopeo resolve them.
//!
//! Invariants: the first path component names a registry only when it contains `.` or `:` or is
//! `localhost` (else the whole name is a Docker Hub repository, and a one-component one lives
//! under `library/`); `index.docker.io` is `docker.io`; a reference with neither tag nor digest
//! means `:latest`; repository components are lowercase; a digest parses as an OCI digest. The
//! canonical form ([`Reference`]'s `Display`) is what a pulled image is tagged with.

use std::fmt;

use crate::digest::OciDigest;
use crate::error::{Error, Result};

/// Docker Hub as references name it.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` as written (Docker Hub as `docker.io`).
    pub registry: String,
    /// The repository path inside the registry (`library/debian`).
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:…` when the reference pins a manifest.
    pub digest: Option<String>,
}

fn bad(s: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("invalid image reference {s:?}: {why}"))
}

impl Reference {
    /// Parse `s` (see the module documentation).
    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(s, "empty, or contains whitespace"));
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => {
                OciDigest::parse(d).map_err(|_| bad(s, "the digest is not algorithm:hex"))?;
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag follows the last ':' that is after the last '/' (a ':' before it is a port).
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (
                &name[..last_slash + i],
                Some(name[last_slash + i + 1..].to_string()),
            ),
            None => (name, None),
        };
        if let Some(t) = &tag {
            let ok_first = t.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
            let ok_rest = t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !ok_first || !ok_rest || t.len() > 128 {
                return Err(bad(
                    s,
                    "a tag is 1-128 of [A-Za-z0-9_.-], not starting with . or -",
                ));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        check_repository(s, &repository)?;
        check_host(s, &registry)?;
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The `host[:port]` whose `/v2/` API serves this reference.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What goes after `/manifests/` when fetching: the digest if pinned, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// `registry/repository` (no tag, no digest).
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Repository components: lowercase alphanumerics separated by one `.`, `_`, `__` or dashes.
fn check_repository(s: &str, repo: &str) -> Result<()> {
    for part in repo.split('/') {
        let ok = !part.is_empty()
            && part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && part.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && part.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            })
            && !part.contains("..")
            && !part.contains("___");
        if !ok {
            return Err(bad(
                s,
                "repository components are lowercase letters and digits, separated by . _ or -",
            ));
        }
    }
    Ok(())
}

fn check_host(s: &str, host: &str) -> Result<()> {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if !n.ends_with(']') || n.starts_with('[') => (n, Some(p)),
        _ => (host, None),
    };
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok());
    if name_ok && port_ok {
        Ok(())
    } else {
        Err(bad(s, "the registry is not host[:port]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(s: &str) -> (String, String, Option<String>, Option<String>) {
        let r = Reference::parse(s).unwrap();
        (r.registry, r.repository, r.tag, r.digest)
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn registry_docker_hub_defaults_apply_as_docker_applies_them() {
        let hub = |repo: &str, tag: &str| {
            (
                "docker.io".to_string(),
                repo.to_string(),
                Some(tag.to_string()),
                None,
            )
        };
        assert_eq!(parts("debian"), hub("library/debian", "latest"));
        assert_eq!(parts("debian:12"), hub("library/debian", "12"));
        assert_eq!(parts("bitnami/redis:7"), hub("bitnami/redis", "7"));
        assert_eq!(parts("docker.io/debian"), hub("library/debian", "latest"));
        assert_eq!(parts("index.docker.io/x/y:1"), hub("x/y", "1"));
        let r = Reference::parse("debian").unwrap();
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.to_string(), "docker.io/library/debian:latest");
    }

    #[test]
    fn registry_hosts_ports_and_digests_parse() {
        assert_eq!(
            parts("127.0.0.1:5000/a/b:v1"),
            (
                "127.0.0.1:5000".into(),
                "a/b".into(),
                Some("v1".into()),
                None
            )
        );
        assert_eq!(
            parts("localhost/app"),
            (
                "localhost".into(),
                "app".into(),
                Some("latest".into()),
                None
            )
        );
        assert_eq!(
            parts("localhost:5000/app"),
            (
                "localhost:5000".into(),
                "app".into(),
                Some("latest".into()),
                None
            )
        );
        assert_eq!(
            parts(&format!("quay.io/org/app@{D}")),
            ("quay.io".into(), "org/app".into(), None, Some(D.into()))
        );
        let r = Reference::parse(&format!("example.com:443/app:1.0@{D}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.manifest_ref()), (Some("1.0"), D));
        assert_eq!(r.to_string(), format!("example.com:443/app:1.0@{D}"));
    }

    #[test]
    fn registry_bad_references_are_refused() {
        for s in [
            "",
            "Upper/case",
            "a b",
            "host:5000/app:bad tag",
            "app:-dash",
            "app@sha256:xyz",
            "host:99999/app",
            "a//b",
            "app:",
        ] {
            assert!(Reference::parse(s).is_err(), "{s:?} accepted");
        }
    }
}
