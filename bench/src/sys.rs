//! Readings from /proc: machine CPU time, process-tree CPU and memory, kernel
//! socket memory, and the fd limit.

use std::fs;

/// Busy CPU time of the whole machine so far, in microseconds: user, nice,
/// system, irq, softirq and steal of every CPU. The sockmap path works in
/// softirq and kernel workers, so only a machine-wide count is fair.
pub fn cpu_busy_us() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    busy * 1_000_000 / hz
}

/// `pid` and every process below it.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // The command name may hold spaces; fields resume after ')'.
            let Some(rest) = stat.rsplit_once(')').map(|x| x.1) else {
                continue;
            };
            if let Some(pp) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parents.push((p, pp));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// CPU time that `pid` and its descendants have run so far, in
/// nanoseconds: the sum of every thread's `/proc/<p>/task/<t>/schedstat`
/// (time on a CPU, user and kernel, as the scheduler counts it). Softirq
/// work that the kernel does on the way out of their syscalls is in it;
/// work in kernel threads (kworkers, ksoftirqd) is not, and that is where
/// the sockmap path moves bytes. Threads that already ended are not
/// counted; the proxies' threads live as long as they do.
pub fn cpu_tree_ns(pid: u32) -> u64 {
    tree(pid)
        .into_iter()
        .map(|p| {
            let Ok(rd) = fs::read_dir(format!("/proc/{p}/task")) else {
                return 0;
            };
            rd.flatten()
                .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Resident memory of a process, in bytes (0 if it is gone).
pub fn rss(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Resident memory of `pid` and its descendants, in bytes.
pub fn rss_tree(pid: u32) -> u64 {
    tree(pid).into_iter().map(rss).sum()
}

/// Kernel memory that sockets use: TCP buffer pages (`/proc/net/sockstat`)
/// plus the slab caches (socket structures), in bytes.
pub fn kernel_socket_mem() -> u64 {
    let sockstat = fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let pages = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|x| *x == "mem")?;
            f.get(i + 1)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let slab = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    pages * 4096 + slab * 1024
}

/// How many fds this process has open.
pub fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Waits until this process has at most `most` fds open, for up to
/// `limit`; the count it ended at. The origin's end of a connection the
/// load generator closed goes once the origin has read the FIN, which
/// behind a proxy over veth can take longer than the next run takes to
/// start.
pub fn wait_for_fds(most: usize, limit: std::time::Duration) -> usize {
    let end = std::time::Instant::now() + limit;
    loop {
        let n = open_fds();
        if n <= most || std::time::Instant::now() > end {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Raises the fd limit (children inherit it): to 262144 if allowed (root
/// may raise the hard limit), else the soft limit to the hard one.
/// Returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 262_144,
        rlim_max: 262_144,
    };
    // SAFETY: valid pointers to rlimit structs.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    r.rlim_cur
}

/// This host's name, for the results file.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_tree_counts_a_childs_busy_threads() {
        // A shell that spins in its own arithmetic (no child processes,
        // whose time would leave with them), then sleeps.
        let mut c = std::process::Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done; sleep 5",
            ])
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        let mut ns = 0;
        // Until the spin is over: the count stops growing.
        while t0.elapsed() < std::time::Duration::from_secs(4) {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let now = cpu_tree_ns(c.id());
            if now == ns {
                break;
            }
            ns = now;
        }
        let wall = t0.elapsed().as_nanos() as u64;
        let _ = c.kill();
        let _ = c.wait();
        assert!(ns >= 20_000_000, "only {ns} ns counted");
        assert!(ns <= wall, "{ns} ns of CPU in {wall} ns of wall time");
        assert_eq!(cpu_tree_ns(u32::MAX), 0, "a pid that cannot exist");
    }
}
