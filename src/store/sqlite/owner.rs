//! Who holds a lease on SQLite: this process, named so that a later
//! process can tell it is gone. A process id alone could be reused after a
//! crash; with the boot and the process's start time it cannot.

use std::sync::OnceLock;

/// This process, as the holder of the leases it takes.
pub fn this_process() -> &'static str {
    static ME: OnceLock<String> = OnceLock::new();
    ME.get_or_init(|| {
        let pid = std::process::id();
        format!(
            "{pid}:{}:{}",
            boot_id(),
            start_time(pid).unwrap_or_default()
        )
    })
}

/// True when the process `owner` names is certainly not running: another
/// boot, no such process, or another process with its id. Where that cannot
/// be known (no `/proc`), false: its leases then run out as usual.
pub fn is_gone(owner: &str) -> bool {
    let mut parts = owner.splitn(3, ':');
    let (Some(pid), Some(boot), Some(start)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    if !std::path::Path::new("/proc/self/stat").exists() {
        return false;
    }
    if boot != boot_id() {
        return true;
    }
    start_time(pid).map_or(true, |now| now != start)
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The start time of process `pid` (clock ticks after boot: field 22 of
/// `/proc/<pid>/stat`), if it runs.
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_not_gone_and_a_dead_one_is() {
        assert!(!is_gone(this_process()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let owner = format!(
            "{pid}:{}:{}",
            boot_id(),
            start_time(pid).unwrap_or_default()
        );
        child.wait().unwrap();
        assert!(is_gone(&owner), "{owner}");
        // The same id, another start: not the holder.
        let me = this_process().rsplit_once(':').unwrap().0;
        assert!(is_gone(&format!("{me}:1")));
        assert!(!is_gone("not an owner"));
    }
}
