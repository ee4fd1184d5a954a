//! Names that say which process made them, so that what a dead process left can be found.
//!
//! Invariants: a name made by [`owner_tag`] records the process id and its start time; a name
//! is judged abandoned only when it records an owner and that owner (that pid *with* that start
//! time) no longer runs. A name that records no owner is never judged abandoned.

pub(crate) fn unique_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = blake3::Hasher::new();
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&format!("{:?}", std::thread::current().id()).into_bytes());
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    h.update(
        &COUNTER
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes(),
    );
    h.finalize().to_hex()[..24].to_string()
}

/// A fresh name for scratch space under `tmp/` that says who owns it,
/// `<kind>-<pid>-<start time>-<unique>`: `gc` removes what a dead process left there and never
/// what a live one uses.
pub(crate) fn owned_tmp_name(kind: &str) -> String {
    format!("{kind}-{}", owner_tag())
}

/// `<pid>-<start time>-<unique>`: a fresh name part that says which process made it.
pub(crate) fn owner_tag() -> String {
    let pid = std::process::id();
    let start = process_start_time(pid).unwrap_or(0);
    format!("{pid}-{start}-{}", unique_name())
}

/// Whether an [`owner_tag`] names a process that is gone; `false` for text that is not one
/// (a name without an owner is never judged abandoned).
pub(crate) fn owner_gone(tag: &str) -> bool {
    tag_owner(tag).is_some_and(|(pid, start)| process_start_time(pid) != Some(start))
}

/// The owner (pid, start time) an [`owner_tag`] records; `None` for any other text.
fn tag_owner(tag: &str) -> Option<(u32, u64)> {
    let mut parts = tag.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    parts.next().filter(|unique| !unique.is_empty())?;
    Some((pid, start))
}

/// A process's start time as `/proc/PID/stat` gives it (field 22), if it runs.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22, counted after the parenthesised command name (which may contain spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_names_record_their_owner() {
        let name = owned_tmp_name("oci");
        let tag = name.strip_prefix("oci-").unwrap();
        assert_eq!(tag_owner(tag).map(|o| o.0), Some(std::process::id()));
        assert!(!owner_gone(tag));
        assert_eq!(tag_owner("12-34-ab.tar"), Some((12, 34)));
        assert!(
            owner_gone("12-34-ab.tar"),
            "no process 12 started at tick 34"
        );
        for other in ["0123abcd", "12-34-", "x-34-ab"] {
            assert_eq!(tag_owner(other), None, "{other}");
            assert!(!owner_gone(other), "{other}");
        }
    }
}
