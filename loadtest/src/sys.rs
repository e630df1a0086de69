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

/// Server processes to watch; every scenario takes these.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct Pids {
    /// Edge process ids, comma-separated: their RSS per connection and CPU time.
    #[arg(
        long = "edge-pids",
        alias = "edge-pid",
        value_name = "PIDS",
        value_delimiter = ','
    )]
    pub(crate) edge: Vec<u32>,
    /// Other processes (routers) whose CPU time to report, comma-separated.
    #[arg(long = "router-pids", value_name = "PIDS", value_delimiter = ',')]
    pub(crate) router: Vec<u32>,
}

/// One set of readings of the watched processes and the kernel.
#[derive(Clone, Copy, Default)]
pub(crate) struct Probe {
    /// Unix µs of the readings.
    at_us: u64,
    edge_rss: Option<u64>,
    edge_cpu: Option<f64>,
    router_cpu: Option<f64>,
    slab: Option<u64>,
    tcp: Option<u64>,
}

fn sum<T: std::iter::Sum>(pids: &[u32], f: impl Fn(u32) -> Option<T>) -> Option<T> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| f(*p)).sum()
}

impl Probe {
    pub(crate) fn take(pids: &Pids) -> Probe {
        Probe {
            at_us: crate::report::now_us(),
            edge_rss: sum(&pids.edge, rss_bytes),
            edge_cpu: sum(&pids.edge, cpu_seconds),
            router_cpu: sum(&pids.router, cpu_seconds),
            slab: slab_bytes(),
            tcp: tcp_kernel().map(|t| t.0),
        }
    }

    /// Taken by worker 0 only: the processes are shared by all workers.
    pub(crate) fn take_if(first: bool, pids: &Pids) -> Option<Probe> {
        first.then(|| Probe::take(pids))
    }

    /// Edge CPU-seconds from `before` to `after`, if both read them.
    pub(crate) fn edge_cpu_between(before: Option<Probe>, after: Option<Probe>) -> Option<f64> {
        let (b, a) = before.zip(after)?;
        b.edge_cpu.zip(a.edge_cpu).map(|(b, a)| a - b)
    }

    /// Router CPU-seconds from `before` to `after`, if both read them.
    pub(crate) fn router_cpu_between(before: Option<Probe>, after: Option<Probe>) -> Option<f64> {
        let (b, a) = before.zip(after)?;
        b.router_cpu.zip(a.router_cpu).map(|(b, a)| a - b)
    }

    /// The report's view: memory from `mem` (before connecting, once all
    /// are connected), CPU time over `cpu` (the traffic phase).
    pub(crate) fn server(
        mem: (Option<Probe>, Option<Probe>),
        cpu: (Option<Probe>, Option<Probe>),
    ) -> crate::report::Server {
        Probe::server_apart(mem, (None, None), cpu)
    }

    /// [`Probe::server`], with the CPU time over `connect` (connecting
    /// and subscribing) reported apart from the traffic window `cpu`.
    pub(crate) fn server_apart(
        mem: (Option<Probe>, Option<Probe>),
        connect: (Option<Probe>, Option<Probe>),
        cpu: (Option<Probe>, Option<Probe>),
    ) -> crate::report::Server {
        let delta = |x: Option<f64>, y: Option<f64>| x.zip(y).map(|(x, y)| y - x);
        let (mb, ma) = (mem.0.unwrap_or_default(), mem.1.unwrap_or_default());
        let (nb, na) = (connect.0.unwrap_or_default(), connect.1.unwrap_or_default());
        let window = cpu
            .0
            .zip(cpu.1)
            .and_then(|(b, a)| crate::report::Report::span_secs(b.at_us, a.at_us));
        let (cb, ca) = (cpu.0.unwrap_or_default(), cpu.1.unwrap_or_default());
        crate::report::Server {
            cpu_window_seconds: window,
            edge_cpu_connect_seconds: delta(nb.edge_cpu, na.edge_cpu),
            router_cpu_connect_seconds: delta(nb.router_cpu, na.router_cpu),
            edge_rss_before_bytes: mb.edge_rss,
            edge_rss_after_bytes: ma.edge_rss,
            kernel_slab_before_bytes: mb.slab,
            kernel_slab_after_bytes: ma.slab,
            kernel_tcp_before_bytes: mb.tcp,
            kernel_tcp_after_bytes: ma.tcp,
            edge_cpu_seconds: delta(cb.edge_cpu, ca.edge_cpu),
            router_cpu_seconds: delta(cb.router_cpu, ca.router_cpu),
            edge_cpu_idle_seconds: None,
            idle_window_seconds: None,
        }
    }

    /// The edges' CPU over `idle` (every socket held, nothing posted),
    /// added to `server`; nothing where the window is empty.
    pub(crate) fn with_idle(
        mut server: crate::report::Server,
        idle: (Option<Probe>, Option<Probe>),
    ) -> crate::report::Server {
        if let (Some(b), Some(a)) = idle
            && a.at_us > b.at_us
        {
            server.idle_window_seconds = crate::report::Report::span_secs(b.at_us, a.at_us);
            server.edge_cpu_idle_seconds = b.edge_cpu.zip(a.edge_cpu).map(|(b, a)| a - b);
        }
        server
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(us: u64, edge_cpu: f64) -> Option<Probe> {
        Some(Probe {
            at_us: us,
            edge_cpu: Some(edge_cpu),
            ..Default::default()
        })
    }

    #[test]
    fn the_idle_window_is_reported_apart_and_only_when_it_was_taken() {
        let s = Probe::with_idle(Default::default(), (at(1_000_000, 2.0), at(6_000_000, 2.5)));
        assert_eq!(s.idle_window_seconds, Some(5.0));
        assert_eq!(s.edge_cpu_idle_seconds, Some(0.5));
        assert_eq!(s.edge_cpu_seconds, None, "the post's window is apart");
        let s = Probe::with_idle(Default::default(), (None, at(6_000_000, 2.5)));
        assert_eq!(
            (s.idle_window_seconds, s.edge_cpu_idle_seconds),
            (None, None)
        );
    }
}
