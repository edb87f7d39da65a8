//! The benchmark harness behind `cargo xtask bench`: a direct connection,
//! Sluice's four data paths, nginx, HAProxy and Caddy side by side, against
//! one origin and one load generator, all in this process's control.
//!
//! | module | job |
//! |---|---|
//! | `ws` | RFC 6455 handshake and frames (masked from the client) |
//! | `origin` | the origin server (echo, sink, bulk) |
//! | `load` | the workloads W1 to W4 |
//! | `pool` | single-threaded runtimes on threads of their own, for W2's clients |
//! | `netns` | the run's own network namespace and congestion control |
//! | `targets` | starts and stops the proxies; installs the Debian ones |
//! | `sys` | CPU, memory and fd-limit readings from /proc |
//! | `report` | medians, the Markdown table, the checks against the targets |
//! | `chart` | one SVG chart per workload |

pub mod chart;
pub mod load;
pub mod netns;
pub mod origin;
pub mod pool;
pub mod report;
pub mod sys;
pub mod targets;
pub mod ws;

use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use report::{Record, Workload};
use targets::{Kind, Target};

/// What Sluice logs when a sockmap direction moves to user space, and
/// why: its receiver fell behind, or the other direction half-closed (a
/// half-closed socket can no longer leave the kernel path, so it leaves
/// before the FIN goes out).
const MOVED: [(&str, &str); 2] = [
    (
        "bytes behind at a check (a stream",
        "a stream: its receiver fell a sixteenth of limits.max_buffer_per_direction behind the kernel's redirect; the rest of the connection went through user space",
    ),
    (
        "the other direction half-closed; this direction continues",
        "the other direction half-closed first (a half-closed socket cannot leave the kernel path later)",
    ),
];

/// What Sluice's access log says at a close, and on which path: sessions
/// on sockmap or uring that closed on `userspace` never joined the chosen
/// path (`limits.promote_after_ms`), so the figure is partly or wholly
/// the user-space relay's.
const CLOSED: [&str; 4] = [MOVED[0].0, MOVED[1].0, "closed: ", "datapath=userspace"];

/// What to run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// The smaller matrix for development (under 3 minutes).
    pub quick: bool,
    /// The `sluice` binary.
    pub sluice: PathBuf,
    /// Where results go (`<date>-<host>.md` and the charts).
    pub out: PathBuf,
    /// Only these targets (row names), if given.
    pub only: Vec<String>,
    /// Repetitions (default: 3, or 1 with `--quick`).
    pub reps: Option<usize>,
    /// Peers on other hosts (see [`netns::Remote`]) instead of loopback.
    pub remote: bool,
    /// With `remote`: the origin on the targets' host, listening on their
    /// address (an app behind its edge proxy), not in a namespace of its own.
    pub origin_here: bool,
    /// Only these workloads (`w1`..`w4`), if given.
    pub workloads: Vec<String>,
    /// Measure in the host's network namespace, under its TCP settings,
    /// instead of the run's own (see [`netns`]).
    pub host_network: bool,
    /// W2's connection counts, if given (default 1, 100 and 1,000).
    pub echo_conns: Vec<usize>,
    /// W2's message sizes in bytes, if given (default 64, 1,024 and 16,384).
    pub echo_sizes: Vec<usize>,
}

/// The sizes of one run of the matrix.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Repetitions of the W2 and W3 measurements (medians are reported).
    pub reps: usize,
    /// Repetitions of W1 and W4: each run is short (a gigabyte takes a
    /// third of a second direct), so one burst of the host's noise can
    /// take a whole run; more of them keep the median clear of it.
    pub reps_short: usize,
    /// W1 bytes per direction.
    pub bulk_bytes: u64,
    /// W2 connection counts.
    pub echo_conns: Vec<usize>,
    /// W2 message sizes.
    pub echo_sizes: Vec<usize>,
    /// W2 time per case.
    pub echo_time: Duration,
    /// W3 connections.
    pub idle_conns: usize,
    /// W3 hold time.
    pub idle_time: Duration,
    /// W4 concurrent clients.
    pub hs_par: usize,
    /// W4 time.
    pub hs_time: Duration,
}

impl Plan {
    /// The full matrix (under 20 minutes) or the quick one (under 3).
    pub fn new(quick: bool, reps: Option<usize>) -> Plan {
        if quick {
            Plan {
                reps: reps.unwrap_or(1),
                reps_short: reps.unwrap_or(1),
                bulk_bytes: 256 << 20,
                echo_conns: vec![1, 100, 1000],
                echo_sizes: vec![64, 1024, 16384],
                echo_time: Duration::from_millis(700),
                idle_conns: 1000,
                idle_time: Duration::from_secs(3),
                hs_par: 50,
                hs_time: Duration::from_secs(1),
            }
        } else {
            Plan {
                reps: reps.unwrap_or(3),
                reps_short: reps.unwrap_or(5),
                // Twice the least, for the same reason as
                // `reps_short`.
                bulk_bytes: 2 << 30,
                echo_conns: vec![1, 100, 1000],
                echo_sizes: vec![64, 1024, 16384],
                echo_time: Duration::from_millis(1500),
                idle_conns: 10_000,
                idle_time: Duration::from_secs(5),
                hs_par: 50,
                hs_time: Duration::from_secs(3),
            }
        }
    }

    /// Repetitions of workload `w`.
    pub fn reps_of(&self, w: Workload) -> usize {
        match w {
            Workload::Bulk | Workload::Handshake => self.reps_short,
            Workload::Echo | Workload::Idle => self.reps,
        }
    }
}

/// Every target, in the order of the tables.
pub const ALL: [Kind; 8] = [
    Kind::Direct,
    Kind::Sluice("sockmap"),
    Kind::Sluice("tcpsplice"),
    Kind::Sluice("uring"),
    Kind::Sluice("userspace"),
    Kind::Nginx,
    Kind::Haproxy,
    Kind::Caddy,
];

/// Runs the matrix and writes the report. Returns the Markdown.
pub fn run(opts: &Opts) -> Result<String, String> {
    let mut plan = Plan::new(opts.quick, opts.reps);
    if !opts.echo_conns.is_empty() {
        plan.echo_conns.clone_from(&opts.echo_conns);
    }
    if !opts.echo_sizes.is_empty() {
        plan.echo_sizes.clone_from(&opts.echo_sizes);
    }
    if plan.echo_conns.contains(&0) || plan.echo_sizes.contains(&0) {
        return Err("--echo-conns and --echo-sizes take numbers above 0".into());
    }
    let nofile = sys::raise_nofile();
    let mut notes: Vec<String> = Vec::new();
    let mut kinds: Vec<Kind> = ALL
        .into_iter()
        .filter(|k| opts.only.is_empty() || opts.only.contains(&k.name()))
        .collect();
    targets::sweep_stale_dirs();
    netns::sweep_stale();
    for (k, why) in targets::ensure_installed(&kinds) {
        notes.push(format!("{}: left out, {why}", k.name()));
        kinds.retain(|x| *x != k);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        for path in ["sockmap", "tcpsplice"] {
            if kinds.contains(&Kind::Sluice(path)) {
                notes.push(format!("sluice-{path}: left out, loading eBPF needs root"));
                kinds.retain(|x| *x != Kind::Sluice(path));
            }
        }
    }
    // Both the proxy and this process (client and origin ends) hold two fds
    // per connection.
    let idle_conns = if nofile < (plan.idle_conns as u64) * 2 + 200 {
        let n = (nofile.saturating_sub(200) / 2) as usize;
        notes.push(format!(
            "W3: {n} connections instead of {}: the fd limit is {nofile}",
            plan.idle_conns
        ));
        n
    } else {
        plan.idle_conns
    };
    // After the installs (they need the host's network), before any thread
    // or process that should share the run's namespace.
    let (net, remote) = if opts.host_network {
        (netns::host(None), None)
    } else if opts.remote {
        let (mut net, r) = netns::enter_remote()?;
        net.origin_here = opts.origin_here;
        (net, Some(r))
    } else {
        (netns::enter()?, None)
    };
    // With peers elsewhere: the origin's threads and sockets start in its
    // namespace, the targets in the run's, the load generator in the
    // clients'; this thread follows, as it makes the sockets of each.
    let to = |side: netns::Side| remote.as_ref().map_or(Ok(()), |r| r.enter(side));
    let (origin_ip, listen_ip) = match (&remote, opts.origin_here) {
        (Some(_), false) => (netns::ORIGIN_IP, std::net::IpAddr::from(netns::PROXY_IP)),
        (Some(_), true) => (netns::PROXY_IP, std::net::IpAddr::from(netns::PROXY_IP)),
        (None, _) => ([127, 0, 0, 1], std::net::IpAddr::from([127, 0, 0, 1])),
    };
    to(if opts.origin_here {
        netns::Side::Proxy
    } else {
        netns::Side::Origin
    })?;
    let origin =
        origin::Origin::start(2, origin_ip).map_err(|e| format!("starting the origin: {e}"))?;
    to(netns::Side::Proxy)?;
    let mut started: Vec<Target> = Vec::new();
    for k in kinds {
        match Target::start(k, listen_ip, origin.addr, &opts.sluice) {
            Ok(t) => started.push(t),
            Err(e) => notes.push(format!("{}: left out, {e}", k.name())),
        }
    }
    to(netns::Side::Clients)?;
    let load = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // One thread: with two, on two cores beside the origin's two, the
    // client threads took turns with the origin's, and the connections of
    // the one waiting waited a scheduler slice (see `pool`).
    let echo_pool = pool::Pool::new(1, "echo").map_err(|e| e.to_string())?;
    let mut running: Vec<Target> = Vec::new();
    for t in started {
        // A smoke check: one session through it before measuring.
        let ok = load.block_on(async {
            let mut c = load::Client::connect(t.addr, "/echo", 1).await?;
            c.send(ws::op::BINARY, b"smoke").await?;
            let f = c.recv(true).await?;
            c.close().await;
            if f.payload == b"smoke" {
                Ok(())
            } else {
                Err("echo differs".to_string())
            }
        });
        match ok {
            Ok(()) => running.push(t),
            Err(e) => notes.push(format!(
                "{}: left out, smoke check failed: {e}",
                t.kind.name()
            )),
        }
    }
    if running.is_empty() {
        return Err(format!("no target could start: {}", notes.join("; ")));
    }

    let mut cases: Vec<(Workload, String)> = vec![
        (Workload::Bulk, "one way".into()),
        (Workload::Bulk, "both ways".into()),
    ];
    for &c in &plan.echo_conns {
        for &s in &plan.echo_sizes {
            cases.push((Workload::Echo, report::echo_case(c, s)));
        }
    }
    cases.push((Workload::Idle, format!("{idle_conns} conns")));
    cases.push((Workload::Handshake, format!("{} clients", plan.hs_par)));
    cases.retain(|(w, _)| opts.workloads.is_empty() || opts.workloads.iter().any(|x| x == w.id()));

    let steps = cases
        .iter()
        .map(|(w, _)| plan.reps_of(*w) * running.len())
        .sum::<usize>() as u64;
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let mut records: Vec<Record> = Vec::new();
    // Directions the sockmap path moved to user space, per case and reason
    // (an index into MOVED): after a move for backpressure, a bulk figure
    // is mostly that user-space relay's.
    // The value: directions moved, and the runs they were counted over.
    let mut moved: std::collections::BTreeMap<(String, usize), (usize, usize)> = Default::default();
    // Sessions on sockmap or uring that stayed in user space, per case:
    // (stayed, closed).
    let mut stayed: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    // Cases outside, repetitions next, targets inside: every target meets
    // the same machine weather within a repetition. Each repetition starts
    // one target further on, so no target always runs in the same place
    // in the round: a place may bias a row. W4 with two rows of the same
    // user-space relay, 8 quick rounds of 3 repetitions: the first row ran
    // 0.84-1.04x the second, median 0.96, in a fixed order; 0.92-1.09x,
    // median 0.98, rotated.
    let n_targets = running.len();
    for (w, case) in &cases {
        for rep in 0..plan.reps_of(*w) {
            for i in round_order(n_targets, rep) {
                let t = &mut running[i];
                // W3 measures what connections add to a fresh process: in one
                // that ran W1 and W2, freed and pooled memory hides the cost.
                if *w == Workload::Idle {
                    // The last run's connections, both ends of which are in
                    // this process, must be gone before this one's open.
                    let most = (nofile as usize).saturating_sub(2 * idle_conns);
                    let open = sys::wait_for_fds(most, Duration::from_secs(30));
                    if open > most {
                        notes.push(format!(
                            "{}: {open} fds still open before {} (at most {most} leave room)",
                            t.kind.name(),
                            w.title()
                        ));
                    }
                    let restarted =
                        to(netns::Side::Proxy).and_then(|()| t.restart(origin.addr, &opts.sluice));
                    // Back to the clients' whatever happened.
                    let back = to(netns::Side::Clients);
                    if let Err(e) = restarted.and(back) {
                        notes.push(format!(
                            "{}: cannot restart for {}: {e}",
                            t.kind.name(),
                            w.title()
                        ));
                    }
                }
                let before = t.log_counts(CLOSED);
                bar.set_message(format!(
                    "{} {case} {} #{}",
                    w.title(),
                    t.kind.name(),
                    rep + 1
                ));
                let log_from = t.log_len();
                let cpu0 = t.cpu_ns();
                let run =
                    measure(&load, &echo_pool, &plan, *w, case, idle_conns, t).map(|mut r| {
                        r.proxy_cpu_us = match (cpu0, t.cpu_ns()) {
                            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e3,
                            _ => f64::NAN,
                        };
                        r
                    });
                // A failed run's own log lines say why (reset, fallback).
                let run = run.map_err(|e| {
                    // Sluice writes its log in batches every 20 ms.
                    std::thread::sleep(Duration::from_millis(100));
                    let why = t.problems_since(log_from, 3);
                    if why.is_empty() {
                        e
                    } else {
                        format!("{e}; its log: {}", why.join(" | "))
                    }
                });
                if !t.alive() {
                    notes.push(format!(
                        "{} died during {} {case}: {}",
                        t.kind.name(),
                        w.title(),
                        t.log_tail()
                    ));
                }
                records.push(Record {
                    workload: *w,
                    case: case.clone(),
                    target: t.kind.name(),
                    run,
                });
                bar.inc(1);
                // Let sockets in TIME_WAIT and closing connections settle.
                std::thread::sleep(Duration::from_millis(200));
                let after = t.log_counts(CLOSED);
                let [behind, half_closed, closed, in_user_space]: [usize; 4] =
                    std::array::from_fn(|i| after[i].saturating_sub(before[i]));
                let promoting = matches!(t.kind, Kind::Sluice("sockmap" | "uring" | "tcpsplice"));
                if promoting && in_user_space > 0 {
                    let key = format!("{} {} {case}", t.kind.name(), w.title());
                    let e = stayed.entry(key).or_insert((0, 0));
                    e.0 += in_user_space;
                    e.1 += closed;
                }
                for (i, n) in [behind, half_closed].into_iter().enumerate() {
                    // At a close the move is part of the session's cost,
                    // which only W4 measures; elsewhere it is teardown.
                    if n == 0 || (i == 1 && *w != Workload::Handshake) {
                        continue;
                    }
                    let key = format!("{} {} {case}", t.kind.name(), w.title());
                    let e = moved.entry((key, i)).or_insert((0, plan.reps_of(*w)));
                    e.0 += n;
                }
            }
        }
    }
    bar.finish_and_clear();
    for ((key, reason), (n, runs)) in moved {
        notes.push(format!(
            "{key}: {n} direction(s) moved from the kernel to user space over {runs} run(s): {}",
            MOVED[reason].1
        ));
    }
    for (key, (n, of)) in stayed {
        notes.push(format!(
            "{key}: {n} of {of} session(s) stayed in user space: they closed before \
             limits.promote_after_ms, or were never idle both ways after it"
        ));
    }
    let names: Vec<String> = running.iter().map(|t| t.kind.name()).collect();
    drop(running);
    drop(echo_pool);
    drop(load);
    drop(origin);
    drop(remote);
    report::write(opts, &plan, &net, &names, &records, &notes)
}

/// The targets' order in repetition `rep`: one further on each time, so
/// that over `n` repetitions each target runs once in each place.
fn round_order(n: usize, rep: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (k + rep) % n)
}

fn measure(
    rt: &tokio::runtime::Runtime,
    echo_pool: &pool::Pool,
    plan: &Plan,
    w: Workload,
    case: &str,
    idle_conns: usize,
    t: &Target,
) -> Result<load::Run, String> {
    let addr = t.addr;
    let limit = Duration::from_secs(300);
    rt.block_on(async {
        let f = async {
            match w {
                Workload::Bulk => load::bulk(addr, plan.bulk_bytes, case == "both ways").await,
                Workload::Echo => {
                    let (c, s) = report::parse_echo_case(case).ok_or("bad case")?;
                    load::echo(echo_pool, addr, c, s, plan.echo_time).await
                }
                Workload::Idle => load::idle(addr, idle_conns, plan.idle_time, || t.rss()).await,
                Workload::Handshake => load::handshakes(addr, plan.hs_par, plan.hs_time).await,
            }
        };
        tokio::time::timeout(limit, f)
            .await
            .unwrap_or_else(|_| Err(format!("no result within {limit:?}")))
    })
}

#[cfg(test)]
mod tests {
    use super::round_order;

    #[test]
    fn over_n_repetitions_each_target_runs_once_in_each_place() {
        let n = 8;
        // seen[target][place]
        let mut seen = vec![vec![0; n]; n];
        for rep in 0..n {
            let order: Vec<usize> = round_order(n, rep).collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "rep {rep}: {order:?}");
            for (place, &t) in order.iter().enumerate() {
                seen[t][place] += 1;
            }
        }
        assert!(seen.iter().flatten().all(|&c| c == 1), "{seen:?}");
        // The first repetition keeps the tables' order.
        assert_eq!(round_order(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(round_order(3, 1).collect::<Vec<_>>(), [1, 2, 0]);
    }
}
