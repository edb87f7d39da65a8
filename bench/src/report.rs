//! Medians over repetitions, the Markdown report with ratios to direct and
//! to nginx, the checks against the targets, and the charts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::load::Run;
use crate::{chart, Opts, Plan};

/// The four workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    /// W1: one connection, bulk bytes.
    Bulk,
    /// W2: closed-loop echo.
    Echo,
    /// W3: many idle connections.
    Idle,
    /// W4: new sessions per second.
    Handshake,
}

impl Workload {
    /// Its id on the command line.
    pub fn id(self) -> &'static str {
        match self {
            Workload::Bulk => "w1",
            Workload::Echo => "w2",
            Workload::Idle => "w3",
            Workload::Handshake => "w4",
        }
    }

    /// Short title.
    pub fn title(self) -> &'static str {
        match self {
            Workload::Bulk => "W1 bulk",
            Workload::Echo => "W2 echo",
            Workload::Idle => "W3 idle",
            Workload::Handshake => "W4 handshakes",
        }
    }
}

/// One measurement.
pub struct Record {
    /// Which workload.
    pub workload: Workload,
    /// Which case of it (for example `1000 x 64 B`).
    pub case: String,
    /// Which target (row name).
    pub target: String,
    /// What it measured, or why it failed.
    pub run: Result<Run, String>,
}

/// The W2 case name.
pub fn echo_case(conns: usize, size: usize) -> String {
    format!("{conns} x {size} B")
}

/// Parses a W2 case name back.
pub fn parse_echo_case(s: &str) -> Option<(usize, usize)> {
    let (c, rest) = s.split_once(" x ")?;
    Some((c.parse().ok()?, rest.strip_suffix(" B")?.parse().ok()?))
}

/// The median of the finite values (NaN if none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// (max − min) / median of the finite values: how far apart repetitions
/// landed. NaN with fewer than two, or a median of zero.
pub fn spread(v: &[f64]) -> f64 {
    let f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if f.len() < 2 {
        return f64::NAN;
    }
    let max = f.iter().copied().fold(f64::MIN, f64::max);
    let min = f.iter().copied().fold(f64::MAX, f64::min);
    let m = median(f);
    if m == 0.0 {
        f64::NAN
    } else {
        (max - min) / m.abs()
    }
}

/// A fraction as a whole percentage, or "–".
fn percent(v: f64) -> String {
    if v.is_finite() {
        format!("{:.0}%", v * 100.0)
    } else {
        "–".into()
    }
}

fn pct(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

/// The metrics of one run, by name.
fn metrics(w: Workload, r: &Run) -> Metrics {
    let mut m = BTreeMap::new();
    match w {
        Workload::Bulk => {
            m.insert("gbps", r.count * 8.0 / r.secs / 1e9);
            m.insert("cpu_per_mib", r.cpu_us / (r.count / f64::from(1u32 << 20)));
            m.insert(
                "proxy_cpu_per_mib",
                r.proxy_cpu_us / (r.count / f64::from(1u32 << 20)),
            );
        }
        Workload::Echo => {
            m.insert("msgs", r.count / r.secs);
            m.insert("p50", pct(&r.rtt_ns, 0.5));
            m.insert("p99", pct(&r.rtt_ns, 0.99));
            m.insert("p999", pct(&r.rtt_ns, 0.999));
            m.insert("cpu_per_msg", r.cpu_us / r.count);
        }
        Workload::Idle => {
            m.insert("rss", r.rss_per_conn);
            m.insert("kernel", r.kernel_per_conn);
            m.insert("cpu_pct", r.cpu_us / (r.secs * 1e6) * 100.0);
        }
        Workload::Handshake => {
            m.insert("rate", r.count / r.secs);
            m.insert("cpu_per_hs", r.cpu_us / r.count);
            m.insert("proxy_cpu_per_hs", r.proxy_cpu_us / r.count);
            m.insert("errors", r.errors as f64);
        }
    }
    m
}

/// (workload, case, target).
type Key = (Workload, String, String);
/// Metric values by name.
type Metrics = BTreeMap<&'static str, f64>;

/// Medians and ranges per key and metric; failures by key.
struct Table {
    med: BTreeMap<Key, Metrics>,
    /// (max − min) / median over the repetitions, where there are two.
    range: BTreeMap<Key, Metrics>,
    failed: BTreeMap<Key, (usize, String)>,
}

impl Table {
    fn new(records: &[Record]) -> Table {
        let mut all: BTreeMap<Key, Vec<Metrics>> = BTreeMap::new();
        let mut failed = BTreeMap::new();
        for r in records {
            let key = (r.workload, r.case.clone(), r.target.clone());
            match &r.run {
                Ok(run) => all.entry(key).or_default().push(metrics(r.workload, run)),
                Err(e) => {
                    let f = failed.entry(key).or_insert((0, String::new()));
                    f.0 += 1;
                    f.1 = e.clone();
                }
            }
        }
        let mut med = BTreeMap::new();
        let mut range = BTreeMap::new();
        for (k, runs) in all {
            let (mut m, mut r) = (BTreeMap::new(), BTreeMap::new());
            for name in runs[0].keys() {
                let v: Vec<f64> = runs.iter().map(|r| r[name]).collect();
                r.insert(*name, spread(&v));
                m.insert(*name, median(v));
            }
            med.insert(k.clone(), m);
            range.insert(k, r);
        }
        Table { med, range, failed }
    }

    /// The range of `metric` as a fraction of its median (NaN if unknown).
    fn range(&self, w: Workload, case: &str, target: &str, metric: &str) -> f64 {
        self.range
            .get(&(w, case.to_string(), target.to_string()))
            .and_then(|m| m.get(metric).copied())
            .unwrap_or(f64::NAN)
    }

    fn get(&self, w: Workload, case: &str, target: &str, metric: &str) -> f64 {
        self.med
            .get(&(w, case.to_string(), target.to_string()))
            .and_then(|m| m.get(metric).copied())
            .unwrap_or(f64::NAN)
    }
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

/// A ratio beside the goal it is checked against: two decimals, or three
/// where two would round it onto the goal (0.696 would read "0.70×", met).
fn ratio_vs(x: f64, goal: f64) -> String {
    if x.is_finite() && x != goal && format!("{x:.2}") == format!("{goal:.2}") {
        format!("{x:.3}×")
    } else {
        ratio(x, 1.0)
    }
}

/// Writes the report and charts; returns the Markdown.
pub fn write(
    opts: &Opts,
    plan: &Plan,
    net: &crate::netns::Network,
    targets: &[String],
    records: &[Record],
    notes: &[String],
) -> Result<String, String> {
    let t = Table::new(records);
    let date = today();
    let host = crate::sys::hostname();
    let mut md = String::new();
    let _ = writeln!(md, "# Sluice benchmark, {date}, {host}\n");
    let _ = writeln!(
        md,
        "{} mode; medians of {} repetition(s) (W1 and W4: {}); kernel {}; {} CPUs. CPU is the whole machine's \
         busy time from /proc/stat (load generator and origin included, the same for every row). \
         \"Range\" is (max − min) / median over the repetitions: a ratio between two rows is only \
         as good as their ranges. Every repetition is in the `.json` file beside this one.\n",
        if opts.quick { "Quick" } else { "Full" },
        plan.reps,
        plan.reps_short,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let _ = writeln!(md, "{}\n", net.describe());
    let rel = |w: Workload, case: &str, tg: &str, m: &str| {
        let v = t.get(w, case, tg, m);
        (
            v,
            ratio(v, t.get(w, case, "direct", m)),
            ratio(v, t.get(w, case, "nginx", m)),
        )
    };

    let echo_cases: Vec<String> = plan
        .echo_conns
        .iter()
        .flat_map(|&c| plan.echo_sizes.iter().map(move |&s| echo_case(c, s)))
        .collect();
    let ran = |w: Workload| records.iter().any(|r| r.workload == w);
    let bulk_mib = plan.bulk_bytes >> 20;
    if ran(Workload::Bulk) {
        let _ = writeln!(
            md,
            "## W1 bulk: one connection, {bulk_mib} MiB per direction\n\n\"Proxy CPU\" is the proxy's own processes' time on a CPU (scheduler's count): softirq work done in their syscalls is in it, kernel workers are not, so the sockmap row understates; a spliced session's rewrite runs in the peers' own sends, so the tcpsplice row shows almost none. The machine's CPU columns count all of it.\n"
        );
        let _ = writeln!(
        md,
        "| target | one way Gbit/s | × direct | × nginx | both ways Gbit/s (sum) | × direct | × nginx | CPU-µs/MiB (one way) | proxy CPU-µs/MiB (one way) | range (one way, both ways) |\n|---|---|---|---|---|---|---|---|---|---|"
    );
        for tg in targets {
            let (a, ad, an) = rel(Workload::Bulk, "one way", tg, "gbps");
            let (b, bd, bn) = rel(Workload::Bulk, "both ways", tg, "gbps");
            let c = t.get(Workload::Bulk, "one way", tg, "cpu_per_mib");
            let p = t.get(Workload::Bulk, "one way", tg, "proxy_cpu_per_mib");
            let _ = writeln!(
                md,
                "| {tg} | {} | {ad} | {an} | {} | {bd} | {bn} | {} | {} | {}, {} |",
                num(a),
                num(b),
                num(c),
                num(p),
                percent(t.range(Workload::Bulk, "one way", tg, "gbps")),
                percent(t.range(Workload::Bulk, "both ways", tg, "gbps"))
            );
        }
    }

    if ran(Workload::Echo) {
        let _ = writeln!(
        md,
        "\n## W2 echo: closed loop, {} s per case\n\nRound trips in µs; \"+p99\" is the p99 added over direct. \"+CPU-µs/msg\" is the machine's CPU per message over a direct run's: what the proxy costs, softirq and kernel workers included.\n",
        plan.echo_time.as_secs_f64()
    );
        let _ = writeln!(md, "| case | target | msgs/s | × direct | × nginx | p50 | p99 | p99.9 | +p99 | CPU-µs/msg | +CPU-µs/msg | × nginx's + | range (msgs/s, p99) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for case in &echo_cases {
            for tg in targets {
                let (m, md_, mn) = rel(Workload::Echo, case, tg, "msgs");
                let p99 = t.get(Workload::Echo, case, tg, "p99");
                let added = p99 - t.get(Workload::Echo, case, "direct", "p99");
                let cpu = t.get(Workload::Echo, case, tg, "cpu_per_msg");
                let base = t.get(Workload::Echo, case, "direct", "cpu_per_msg");
                let cpun = ratio(
                    cpu - base,
                    t.get(Workload::Echo, case, "nginx", "cpu_per_msg") - base,
                );
                let _ = writeln!(
                    md,
                    "| {case} | {tg} | {} | {md_} | {mn} | {} | {} | {} | {} | {} | {} | {cpun} | {}, {} |",
                    num(m),
                    num(t.get(Workload::Echo, case, tg, "p50")),
                    num(p99),
                    num(t.get(Workload::Echo, case, tg, "p999")),
                    num(added),
                    num(cpu),
                    num(cpu - base),
                    percent(t.range(Workload::Echo, case, tg, "msgs")),
                    percent(t.range(Workload::Echo, case, tg, "p99"))
                );
            }
        }
    }

    let idle_case = records
        .iter()
        .find(|r| r.workload == Workload::Idle)
        .map(|r| r.case.clone())
        .unwrap_or_default();
    if ran(Workload::Idle) {
        let _ = writeln!(
            md,
            "\n## W3 many idle: {idle_case}, one 32 B echo per connection per second, held {} s\n",
            plan.idle_time.as_secs()
        );
        let _ = writeln!(md, "| target | proxy RSS KiB/conn | × nginx | kernel KiB/conn (sockstat TCP + slab) | CPU % of one core |\n|---|---|---|---|---|");
        for tg in targets {
            let (r, _, rn) = rel(Workload::Idle, &idle_case, tg, "rss");
            let _ = writeln!(
                md,
                "| {tg} | {} | {rn} | {} | {} |",
                num(r / 1024.0),
                num(t.get(Workload::Idle, &idle_case, tg, "kernel") / 1024.0),
                num(t.get(Workload::Idle, &idle_case, tg, "cpu_pct"))
            );
        }
    }

    let hs_case = format!("{} clients", plan.hs_par);
    if ran(Workload::Handshake) {
        let _ = writeln!(
            md,
            "\n## W4 handshakes: {} concurrent clients (connect, upgrade, one echo, close)\n\n\"CPU\" is the machine's; \"proxy CPU\" is the proxy's own processes' (as in W1).\n",
            plan.hs_par
        );
        let _ = writeln!(md, "| target | sessions/s | × direct | × nginx | CPU-µs/session | proxy CPU-µs/session | × nginx | failed sessions | range |\n|---|---|---|---|---|---|---|---|---|");
        for tg in targets {
            let (r, rd, rn) = rel(Workload::Handshake, &hs_case, tg, "rate");
            let (p, _, pn) = rel(Workload::Handshake, &hs_case, tg, "proxy_cpu_per_hs");
            let _ = writeln!(
                md,
                "| {tg} | {} | {rd} | {rn} | {} | {} | {pn} | {} | {} |",
                num(r),
                num(t.get(Workload::Handshake, &hs_case, tg, "cpu_per_hs")),
                num(p),
                num(t.get(Workload::Handshake, &hs_case, tg, "errors")),
                percent(t.range(Workload::Handshake, &hs_case, tg, "rate"))
            );
        }
    }

    let _ = writeln!(md, "\n## Against the targets\n");
    let _ = writeln!(
        md,
        "| check | target | {} |\n|---|---|{}",
        SLUICE_PATHS.join(" | "),
        "---|".repeat(SLUICE_PATHS.len())
    );
    for (check, goal, f) in checks(&t, &idle_case, &hs_case, &echo_cases) {
        let cells: Vec<String> = SLUICE_PATHS
            .iter()
            .map(|p| f(&format!("sluice-{p}")))
            .collect();
        let _ = writeln!(md, "| {check} | {goal} | {} |", cells.join(" | "));
    }

    let noisy = noisy_baselines(&t, &hs_case);
    if !noisy.is_empty() {
        let _ = writeln!(
            md,
            "\nBaselines that ranged over more than {} of their median in this run, so the \
             checks against them carry that noise (read them again in a quieter hour): {}.",
            percent(NOISY),
            noisy.join("; ")
        );
    }

    if !t.failed.is_empty() || !notes.is_empty() {
        let _ = writeln!(md, "\n## Failures and notes\n");
        for ((w, case, tg), (n, e)) in &t.failed {
            let _ = writeln!(md, "- {} {case}, {tg}: {n} run(s) failed: {e}", w.title());
        }
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
    }

    std::fs::create_dir_all(&opts.out).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    let stem = format!(
        "{date}-{host}{}{}",
        match (opts.remote, opts.origin_here) {
            (true, true) => "-remote-origin-here",
            (true, false) => "-remote",
            (false, _) => "",
        },
        if opts.quick { "-quick" } else { "" }
    );
    let _ = writeln!(
        md,
        "\nCharts: `{stem}-w1.svg`, `{stem}-w2.svg`, `{stem}-w3.svg`, `{stem}-w4.svg`."
    );
    let series = |w: Workload, cases: &[String], m: &str| -> Vec<(String, Vec<f64>)> {
        targets
            .iter()
            .map(|tg| {
                (
                    tg.clone(),
                    cases.iter().map(|c| t.get(w, c, tg, m)).collect(),
                )
            })
            .collect()
    };
    let bulk_cases = ["one way".to_string(), "both ways".to_string()];
    let idle = [idle_case.clone()];
    let hs = [hs_case.clone()];
    let charts: [ChartSpec; 4] = [
        (
            "w1",
            "W1 bulk, one connection",
            "Gbit/s",
            Workload::Bulk,
            &bulk_cases,
            "gbps",
        ),
        (
            "w2",
            "W2 echo, messages per second (connections x size)",
            "messages/s",
            Workload::Echo,
            &echo_cases,
            "msgs",
        ),
        (
            "w3",
            "W3 many idle: proxy RSS per connection",
            "bytes per connection",
            Workload::Idle,
            &idle,
            "rss",
        ),
        (
            "w4",
            "W4 new WebSocket sessions per second",
            "sessions/s",
            Workload::Handshake,
            &hs,
            "rate",
        ),
    ];
    for (id, title, unit, w, cases, metric) in charts {
        chart::bars(
            &opts.out.join(format!("{stem}-{id}.svg")),
            title,
            unit,
            cases,
            &series(w, cases, metric),
        )?;
    }
    let path = opts.out.join(format!("{stem}.md"));
    std::fs::write(&path, &md).map_err(|e| format!("{}: {e}", path.display()))?;
    let path = opts.out.join(format!("{stem}.json"));
    let json = serde_json::to_string_pretty(&raw(plan, records, &date, &host))
        .map_err(|e| e.to_string())?;
    std::fs::write(&path, json + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(md)
}

/// Sluice's data paths, as the targets table's columns.
const SLUICE_PATHS: [&str; 4] = ["tcpsplice", "sockmap", "uring", "userspace"];

/// Every repetition's metrics (or its error), in the order they ran, for
/// comparing runs beyond the medians.
fn raw(plan: &Plan, records: &[Record], date: &str, host: &str) -> serde_json::Value {
    let mut rep: BTreeMap<Key, usize> = BTreeMap::new();
    let runs: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            let key = (r.workload, r.case.clone(), r.target.clone());
            let n = rep.entry(key).or_default();
            *n += 1;
            let mut o = serde_json::json!({
                "workload": r.workload.id(),
                "case": r.case,
                "target": r.target,
                "repetition": *n,
            });
            match &r.run {
                Ok(run) => {
                    // JSON has no NaN: metrics that do not apply are left out.
                    let m: serde_json::Map<String, serde_json::Value> = metrics(r.workload, run)
                        .into_iter()
                        .filter(|(_, v)| v.is_finite())
                        .map(|(k, v)| (k.to_string(), v.into()))
                        .collect();
                    o["metrics"] = m.into();
                }
                Err(e) => o["error"] = e.as_str().into(),
            }
            o
        })
        .collect();
    serde_json::json!({
        "date": date,
        "host": host,
        "repetitions": plan.reps,
        "repetitions_w1_w4": plan.reps_short,
        "runs": runs,
    })
}

/// A chart: file id, title, unit, workload, cases, metric.
type ChartSpec<'a> = (&'a str, &'a str, &'a str, Workload, &'a [String], &'a str);

type Check<'a> = (String, &'static str, Box<dyn Fn(&str) -> String + 'a>);

/// The targets, each as a function of the Sluice row.
/// A baseline whose repetitions range over more than this fraction of
/// their median makes the checks against it unreliable.
const NOISY: f64 = 0.3;

/// The baselines of the checks (direct for W1, nginx for W2 at 1,000 × 64 B
/// and for W4) whose range in this run is over [`NOISY`], each as
/// "<workload> <case>, <target>: <range>".
fn noisy_baselines(t: &Table, hs: &str) -> Vec<String> {
    let e64 = echo_case(1000, 64);
    [
        (Workload::Bulk, "one way", "direct", "gbps"),
        (Workload::Bulk, "both ways", "direct", "gbps"),
        (Workload::Echo, e64.as_str(), "nginx", "msgs"),
        (Workload::Handshake, hs, "nginx", "rate"),
    ]
    .into_iter()
    .filter_map(|(w, case, tg, m)| {
        let r = t.range(w, case, tg, m);
        (r > NOISY).then(|| format!("{} {case}, {tg}: {}", w.title(), percent(r)))
    })
    .collect()
}

fn checks<'a>(
    t: &'a Table,
    idle: &'a str,
    hs: &'a str,
    echo_cases: &'a [String],
) -> Vec<Check<'a>> {
    let mark = |ok: bool, s: String| {
        if s.contains('–') {
            "–".to_string()
        } else if ok {
            format!("met ({s})")
        } else {
            format!("**missed** ({s})")
        }
    };
    let e64 = echo_case(1000, 64);
    vec![
        (
            "W1 bulk (one way, both ways) vs direct, vs HAProxy".into(),
            "≥ 0.70× direct and ≥ 1.5× HAProxy, both cases",
            Box::new(move |tg: &str| {
                let mut ok = true;
                let mut parts = Vec::new();
                for case in ["one way", "both ways"] {
                    let v = t.get(Workload::Bulk, case, tg, "gbps");
                    let d = v / t.get(Workload::Bulk, case, "direct", "gbps");
                    let h = v / t.get(Workload::Bulk, case, "haproxy", "gbps");
                    ok &= d >= 0.7 && h >= 1.5;
                    parts.push(format!(
                        "{case}: {} direct, {} HAProxy",
                        ratio_vs(d, 0.7),
                        ratio_vs(h, 1.5)
                    ));
                }
                mark(ok, parts.join("; "))
            }),
        ),
        (
            format!("W2 {e64}: msgs/s vs nginx and HAProxy, CPU-µs/msg"),
            "≥ 1.5× the msgs/s, ≤ 0.5× the added CPU of both",
            Box::new(move |tg: &str| {
                let g = |x: &str, m: &str| t.get(Workload::Echo, &e64, x, m);
                let rate = g(tg, "msgs") / g("nginx", "msgs").max(g("haproxy", "msgs"));
                // The proxy's share: machine CPU over a direct run's.
                let base = g("direct", "cpu_per_msg");
                let cpu = (g(tg, "cpu_per_msg") - base)
                    / (g("nginx", "cpu_per_msg") - base).min(g("haproxy", "cpu_per_msg") - base);
                mark(
                    rate >= 1.5 && cpu <= 0.5,
                    format!("{} rate, {} CPU", ratio_vs(rate, 1.5), ratio_vs(cpu, 0.5)),
                )
            }),
        ),
        (
            "W2 added p99 over direct vs nginx's".into(),
            "≤ nginx's in every case",
            Box::new(move |tg: &str| {
                let mut missed = Vec::new();
                let mut n = 0;
                for c in echo_cases {
                    let p99 = |x: &str| t.get(Workload::Echo, c, x, "p99");
                    let d = p99("direct");
                    let ours = p99(tg) - d;
                    let theirs = p99("nginx") - d;
                    if ours.is_finite() && theirs.is_finite() {
                        n += 1;
                        if ours > theirs {
                            // A miss by less than either row's p99 moved
                            // between its own repetitions says so.
                            let spread = |x: &str| {
                                let r = t.range(Workload::Echo, c, x, "p99") * p99(x);
                                if r.is_finite() {
                                    r
                                } else {
                                    0.0
                                }
                            };
                            let by = ours - theirs;
                            let noise = spread(tg).max(spread("nginx"));
                            missed.push(if by < noise {
                                format!(
                                    "{c} (by {} µs, within the {} µs its or nginx's p99 \
                                     moved between repetitions)",
                                    num(by),
                                    num(noise)
                                )
                            } else {
                                format!("{c} (by {} µs)", num(by))
                            });
                        }
                    }
                }
                if n == 0 {
                    "–".into()
                } else if missed.is_empty() {
                    mark(true, format!("in all {n} cases"))
                } else {
                    let met = n - missed.len();
                    let which = missed.join(", ");
                    mark(false, format!("met in {met} of {n} cases; missed: {which}"))
                }
            }),
        ),
        (
            "W3 user-space memory per idle connection".into(),
            "≤ 4 KiB",
            Box::new(move |tg: &str| {
                let v = t.get(Workload::Idle, idle, tg, "rss");
                mark(v <= 4096.0, format!("{} KiB", num(v / 1024.0)))
            }),
        ),
        (
            "W4 sessions/s vs nginx".into(),
            "≥ 1.0× nginx",
            Box::new(move |tg: &str| {
                let v = t.get(Workload::Handshake, hs, tg, "rate");
                let n = t.get(Workload::Handshake, hs, "nginx", "rate");
                mark(v >= n, ratio_vs(v / n, 1.0))
            }),
        ),
    ]
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
fn today() -> String {
    let mut d = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    d.truncate(10);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ratio_beside_its_goal_shows_which_side() {
        assert_eq!(ratio_vs(0.696, 0.7), "0.696×");
        assert_eq!(ratio_vs(0.7018, 0.7), "0.702×");
        assert_eq!(ratio_vs(0.7, 0.7), "0.70×");
        assert_eq!(ratio_vs(0.58, 0.7), "0.58×");
        assert_eq!(ratio_vs(0.996, 1.0), "0.996×");
        assert_eq!(ratio_vs(f64::NAN, 1.0), "–");
    }

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![f64::NAN]).is_nan());
        let v: Vec<u32> = (1..=1000).map(|x| x * 1000).collect();
        assert_eq!(pct(&v, 0.5), 500.0);
        assert_eq!(pct(&v, 0.99), 990.0);
        assert_eq!(pct(&v, 0.999), 999.0);
    }

    /// One W2 repetition of `case` on `tg`, whose p99 is `p99_us`.
    fn echo(tg: &str, case: &str, p99_us: u32) -> Record {
        Record {
            workload: Workload::Echo,
            case: case.into(),
            target: tg.into(),
            run: Ok(Run {
                secs: 1.0,
                count: 1.0,
                rtt_ns: vec![p99_us * 1000],
                ..Run::default()
            }),
        }
    }

    /// The added-p99 check's verdict for each of `targets`.
    fn p99_verdicts(records: &[Record], cases: &[String], targets: &[&str]) -> Vec<String> {
        let t = Table::new(records);
        let all = checks(&t, "", "", cases);
        let (_, _, p99) = all
            .iter()
            .find(|(name, _, _)| name.contains("p99"))
            .unwrap();
        targets.iter().map(|tg| p99(tg)).collect()
    }

    #[test]
    fn the_p99_check_names_the_cases_it_missed() {
        let cases = [echo_case(1, 64), echo_case(100, 64)];
        let records = [
            echo("direct", &cases[0], 100),
            echo("nginx", &cases[0], 140),
            echo("sluice-userspace", &cases[0], 150),
            echo("direct", &cases[1], 100),
            echo("nginx", &cases[1], 140),
            echo("sluice-userspace", &cases[1], 120),
        ];
        assert_eq!(
            p99_verdicts(&records, &cases, &["sluice-userspace", "nginx"]),
            [
                "**missed** (met in 1 of 2 cases; missed: 1 x 64 B (by 10.0 µs))",
                "met (in all 2 cases)"
            ]
        );
    }

    #[test]
    fn a_p99_miss_within_the_repetitions_spread_says_so() {
        let cases = [echo_case(1, 64)];
        let reps = |tg: &str, p99s: &[u32]| {
            p99s.iter()
                .map(|&us| echo(tg, &cases[0], us))
                .collect::<Vec<_>>()
        };
        let mut records = reps("direct", &[100, 100, 100]);
        records.extend(reps("nginx", &[140, 140, 140]));
        // Median 150 (10 over nginx's), repetitions 120 to 180: a spread
        // of 60 µs.
        records.extend(reps("sluice-userspace", &[120, 150, 180]));
        // Median 200, 60 over nginx's, more than any row's spread.
        records.extend(reps("sluice-uring", &[190, 200, 210]));
        assert_eq!(
            p99_verdicts(&records, &cases, &["sluice-userspace", "sluice-uring"]),
            [
                "**missed** (met in 0 of 1 cases; missed: 1 x 64 B (by 10.0 µs, within the \
                 60.0 µs its or nginx's p99 moved between repetitions))",
                "**missed** (met in 0 of 1 cases; missed: 1 x 64 B (by 60.0 µs))"
            ]
        );
    }

    #[test]
    fn a_noisy_baseline_is_named_and_a_steady_one_is_not() {
        let bulk = |tg: &str, case: &str, gbps: f64| Record {
            workload: Workload::Bulk,
            case: case.into(),
            target: tg.into(),
            run: Ok(Run {
                secs: 1.0,
                count: gbps * 1e9 / 8.0,
                ..Run::default()
            }),
        };
        let mut records = Vec::new();
        for g in [18.7, 43.1, 40.8, 25.4, 26.2] {
            records.push(bulk("direct", "one way", g));
        }
        for g in [40.0, 42.0, 44.0] {
            records.push(bulk("direct", "both ways", g));
        }
        let t = Table::new(&records);
        assert_eq!(
            noisy_baselines(&t, "50 clients"),
            ["W1 bulk one way, direct: 93%"]
        );
    }

    #[test]
    fn spread_is_the_range_over_the_median() {
        assert_eq!(spread(&[90.0, 100.0, 110.0]), 0.2);
        assert_eq!(spread(&[100.0, f64::NAN, 100.0]), 0.0);
        assert!(spread(&[100.0]).is_nan());
        assert!(spread(&[0.0, 0.0]).is_nan());
        assert_eq!(percent(0.2), "20%");
        assert_eq!(percent(f64::NAN), "–");
    }

    #[test]
    fn the_json_numbers_repetitions_and_leaves_out_what_does_not_apply() {
        let run = |target: &str, ok: bool| Record {
            workload: Workload::Handshake,
            case: "50 clients".into(),
            target: target.into(),
            run: if ok {
                Ok(Run {
                    secs: 2.0,
                    count: 10.0,
                    proxy_cpu_us: f64::NAN,
                    ..Run::default()
                })
            } else {
                Err("refused".into())
            },
        };
        let records = [
            run("direct", true),
            run("direct", true),
            run("nginx", false),
        ];
        let v = raw(&Plan::new(true, Some(2)), &records, "2026-01-01", "h");
        let runs = v["runs"].as_array().unwrap();
        assert_eq!(runs[1]["repetition"], 2);
        assert_eq!(runs[1]["metrics"]["rate"], 5.0);
        assert!(runs[1]["metrics"].get("proxy_cpu_per_hs").is_none());
        assert_eq!(runs[2]["repetition"], 1);
        assert_eq!(runs[2]["error"], "refused");
        assert_eq!(v["repetitions"], 2);
    }

    #[test]
    fn echo_case_round_trips() {
        assert_eq!(parse_echo_case(&echo_case(1000, 64)), Some((1000, 64)));
    }

    #[test]
    fn date_is_civil() {
        let d = today();
        assert_eq!(d.len(), 10, "{d}");
        assert!(d.starts_with("20"), "{d}");
    }
}
