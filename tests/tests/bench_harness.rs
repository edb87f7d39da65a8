//! The benchmark harness as an operator runs it (`cargo xtask bench`): a
//! small run against direct and Sluice's user-space path writes its report,
//! its data and its four charts and leaves nothing behind; a run killed
//! mid-way takes its targets with it.
//!
//! As root (CI) the harness measures in a network namespace of its own;
//! otherwise in the host's, on loopback either way. As root, small
//! `--remote` runs (peers in namespaces of their own, over veth; then the
//! origin on the proxy's host, `--origin-here`) report their topology and
//! leave no namespace behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_e2e::sluice_bin;

/// `sluice-bench` beside the `sluice` binary the suite runs.
fn bench_bin() -> PathBuf {
    let p = sluice_bin().with_file_name("sluice-bench");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release -p sluice-bench` or run `cargo xtask test`",
        p.display()
    );
    p
}

/// Starts a quick run with `args`, its report into `out`; progress and
/// notes go to the test's stderr.
fn start_bench(args: &[&str], out: &Path, stdout: Stdio) -> Child {
    Command::new(bench_bin())
        .arg("--quick")
        .args(args)
        .arg("--out")
        .arg(out)
        .arg("--sluice")
        .arg(sluice_bin())
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sluice-bench")
}

/// Runs a quick run with `args` to its end (at most 180 s): its pid, its
/// exit status and what it printed.
fn run_bench(args: &[&str], out: &Path) -> (u32, std::process::ExitStatus, String) {
    let mut child = start_bench(args, out, Stdio::piped());
    let pid = child.id();
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let status = wait_for(&mut child, Duration::from_secs(180));
    (pid, status, reader.join().expect("stdout reader"))
}

/// A fresh output directory for one test.
fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("output directory");
    d
}

/// Waits for `child` for at most `limit`; kills it and fails after.
fn wait_for(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sluice-bench still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The fields of `/proc/<pid>/stat` after the command's closing
/// parenthesis (state, ppid, ...), if the process is there.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The pids whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let parent = parent.to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| stat_fields(pid).is_some_and(|f| f.get(1) == Some(&parent)))
        .collect()
}

/// Whether `pid` still runs (a zombie no longer does; in a container
/// nobody may reap it).
fn running(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z" && s != "X"))
}

/// Whether `pid` is a proxy daemon the harness started (it has `--listen`).
fn is_daemon(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmd| cmd.split(|&b| b == 0).any(|a| a == b"--listen"))
}

/// The working directories the run with pid `pid` made for its targets.
fn target_dirs(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("sluice-bench-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// The sessions/s of `target` in the report's W4 table.
fn w4_rate(md: &str, target: &str) -> f64 {
    let table = md
        .split("## W4 handshakes")
        .nth(1)
        .expect("the report has a W4 section");
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("| {target} |")))
        .unwrap_or_else(|| panic!("no W4 row for {target} in:\n{table}"));
    row.split('|')
        .nth(2)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sessions/s in {row}"))
}

fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("output directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect()
}

#[test]
fn a_small_run_writes_its_report_and_leaves_nothing_running() {
    let out = out_dir("bench-small");
    let (pid, status, printed) = run_bench(
        &[
            "--targets",
            "direct,sluice-userspace",
            "--workloads",
            "w2,w4",
            "--echo-conns",
            "1",
            "--echo-sizes",
            "64",
            "--reps",
            "1",
        ],
        &out,
    );
    assert!(status.success(), "sluice-bench: {status}\n{printed}");

    let md = files_with(&out, "md");
    assert_eq!(md.len(), 1, "one report: {md:?}");
    let report = std::fs::read_to_string(&md[0]).expect("report");
    assert_eq!(printed.trim(), report.trim(), "stdout is the report");
    let direct = w4_rate(&report, "direct");
    let sluice = w4_rate(&report, "sluice-userspace");
    println!("W4, quick, 1 repetition: direct {direct} sessions/s, sluice-userspace {sluice}");
    assert!(direct > 0.0 && sluice > 0.0, "{direct} {sluice}");
    assert!(
        report.contains("| 1 x 64 B | sluice-userspace |"),
        "no W2 row:\n{report}"
    );
    assert_eq!(files_with(&out, "json").len(), 1, "one data file");
    assert_eq!(files_with(&out, "svg").len(), 4, "a chart per workload");
    assert!(
        target_dirs(pid).is_empty(),
        "working directories left: {:?}",
        target_dirs(pid)
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_run_with_peers_elsewhere_goes_through_veth_and_removes_its_namespaces() {
    remote_run(&[], "Network: peers on other hosts", "-remote-quick");
}

#[test]
fn a_run_with_the_origin_on_the_proxys_host_says_so_in_its_name() {
    remote_run(
        &["--origin-here"],
        "Network: clients on another host, the origin on the proxy's",
        "-remote-origin-here-quick",
    );
}

/// A small `--remote` run (direct and tcpsplice, W2 at 1 x 64 B) with
/// `extra` arguments: its report names the topology (`network`) and both
/// rows, its name has `stem`, and no namespace of the run is left.
fn remote_run(extra: &[&str], network: &str, stem: &str) {
    if !sluice_e2e::is_root() {
        eprintln!("SKIP: --remote makes network namespaces, which needs root; CI runs as root");
        return;
    }
    let out = out_dir(&format!("bench{stem}"));
    let mut args = vec![
        "--remote",
        "--targets",
        "direct,sluice-tcpsplice",
        "--workloads",
        "w2",
        "--echo-conns",
        "1",
        "--echo-sizes",
        "64",
        "--reps",
        "1",
    ];
    args.extend_from_slice(extra);
    let (pid, status, report) = run_bench(&args, &out);
    assert!(
        status.success(),
        "sluice-bench {args:?}: {status}\n{report}"
    );
    assert!(
        report.contains(network),
        "the report names the topology:\n{report}"
    );
    for row in ["| 1 x 64 B | direct |", "| 1 x 64 B | sluice-tcpsplice |"] {
        assert!(report.contains(row), "no {row} row:\n{report}");
    }
    let md = files_with(&out, "md");
    assert!(
        md.len() == 1 && md[0].to_string_lossy().ends_with(&format!("{stem}.md")),
        "{md:?}"
    );
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("sluice-bench-{pid}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_killed_run_takes_its_targets_with_it() {
    let out = out_dir("bench-killed");
    let mut child = start_bench(
        &[
            "--targets",
            "sluice-userspace",
            "--workloads",
            "w4",
            "--reps",
            "100",
        ],
        &out,
        Stdio::null(),
    );
    let pid = child.id();
    // The daemon it starts for the row.
    let end = Instant::now() + Duration::from_secs(60);
    let target = loop {
        if let Some(c) = children_of(pid)
            .into_iter()
            .find(|&c| is_daemon(c) && running(c))
        {
            break c;
        }
        if Instant::now() > end || child.try_wait().expect("try_wait").is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sluice-bench started no target within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // SIGKILL: no Drop runs in the harness.
    child.kill().expect("kill sluice-bench");
    let _ = child.wait();
    let end = Instant::now() + Duration::from_secs(10);
    while running(target) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = running(target);
    if left {
        // SAFETY: plain kill(2) of the process this test made the harness start.
        unsafe { libc::kill(target as i32, libc::SIGKILL) };
    }
    assert!(
        !left,
        "the target ({target}) still ran 10 s after its harness was killed"
    );
    println!("the target ({target}) ended with its killed harness");
    for d in target_dirs(pid) {
        let _ = std::fs::remove_dir_all(d);
    }
    let _ = std::fs::remove_dir_all(&out);
}
