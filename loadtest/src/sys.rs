//! Readings from /proc: a process's RSS and CPU time, kernel socket memory.
use std::fs;

/// Resident set size of `pid`, bytes.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// User + system CPU time of `pid`, seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Kernel memory charged to TCP sockets system-wide, bytes (sockstat
/// `mem`, in pages), and sockets in use.
pub(crate) fn tcp_kernel() -> Option<(u64, u64)> {
    let s = fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = s.lines().find(|l| l.starts_with("TCP:"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let get = |k: &str| {
        f.iter()
            .position(|x| *x == k)
            .and_then(|i| f.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((get("mem")? * 4096, get("inuse")?))
}

/// Kernel slab memory (SReclaimable + SUnreclaim), bytes: socket structs,
/// inodes and dentries of sockets live here.
pub(crate) fn slab_bytes() -> Option<u64> {
    let s = fs::read_to_string("/proc/meminfo").ok()?;
    let kb = |k: &str| -> Option<u64> {
        s.lines()
            .find(|l| l.starts_with(k))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((kb("SReclaimable:")? + kb("SUnreclaim:")?) * 1024)
}
