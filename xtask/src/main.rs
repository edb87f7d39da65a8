//! `cargo xtask`: set-up, build, run, test and bench for Sluice.
//!
//! Every command that needs the toolchain runs `setup` first. Setup is
//! idempotent: it checks each piece and installs only what is missing.

mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Sluice developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (nightly rust-src, bpf-linker,
    /// Debian and Python packages). Skips what is already there.
    Setup,
    /// Build the eBPF object and the workspace (release).
    Build,
    /// Start a demo echo origin and Sluice in front of it on 127.0.0.1:8080.
    Run {
        /// Data path: auto, tcpsplice, sockmap, uring or userspace.
        #[arg(long, default_value = "auto")]
        datapath: String,
        /// Extra arguments passed to `sluice`.
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Run the whole suite: lints, unit tests and end-to-end tests on every data path.
    Test {
        /// Extra arguments passed to `cargo test` (for example a test name filter).
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Run the benchmark harness: direct, Sluice's data paths, nginx,
    /// HAProxy and Caddy side by side (installs the Debian packages).
    Bench {
        /// Extra arguments passed to the harness (for example `--quick`,
        /// `--targets direct,sluice-uring,nginx`, `--reps 5`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        extra: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.cmd {
        Cmd::Setup => setup::all(&root),
        Cmd::Build => {
            setup::all(&root)?;
            cargo(
                &root,
                &["build", "--release", "--workspace", "--all-targets"],
            )
        }
        Cmd::Run { datapath, extra } => {
            setup::all(&root)?;
            cargo(&root, &["build", "--release", "-p", "proxy-user", "--bins"])?;
            run_demo(&root, &datapath, &extra)
        }
        Cmd::Test { extra } => {
            setup::all(&root)?;
            test(&root, &extra)
        }
        Cmd::Bench { extra } => {
            setup::all(&root)?;
            cargo(
                &root,
                &[
                    "build",
                    "--release",
                    "-p",
                    "proxy-user",
                    "-p",
                    "sluice-bench",
                    "--bins",
                ],
            )?;
            let status = Command::new(root.join("target/release/sluice-bench"))
                .arg("--sluice")
                .arg(root.join("target/release/sluice"))
                .arg("--out")
                .arg(root.join("bench/results"))
                .args(&extra)
                .current_dir(&root)
                .status()
                .context("running the benchmark harness")?;
            check(status, "sluice-bench")
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Runs `cargo <args>` in the workspace root with the stable toolchain.
fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    check(status, &format!("cargo {}", args.join(" ")))
}

fn check(status: ExitStatus, what: &str) -> Result<()> {
    if !status.success() {
        bail!("`{what}` failed with {status}");
    }
    Ok(())
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    cargo(root, &["fmt", "--all", "--", "--check"])?;
    cargo(
        root,
        &[
            "clippy",
            "--release",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    cargo(
        root,
        &["build", "--release", "--workspace", "--all-targets"],
    )?;
    let sluice = root.join("target/release/sluice");
    // End-to-end tests share loopback ports and measure host memory, so they
    // run one at a time.
    // --nocapture: the tests print what they measured (throughput, memory).
    let mut args = vec![
        "test",
        "--release",
        "--workspace",
        "--",
        "--test-threads=1",
        "--nocapture",
    ];
    args.extend(extra.iter().map(String::as_str));
    let status = Command::new(env!("CARGO"))
        .args(&args)
        .env("SLUICE_BIN", &sluice)
        .current_dir(root)
        .status()
        .context("running cargo test")?;
    check(status, "cargo test")
}

fn run_demo(root: &Path, datapath: &str, extra: &[String]) -> Result<()> {
    let bin = root.join("target/release");
    let mut origin = Command::new(bin.join("sluice-demo-origin"))
        .args(["--listen", "127.0.0.1:9000"])
        .spawn()
        .context("starting the demo origin")?;
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:8080".into(),
        "--origin".into(),
        "127.0.0.1:9000".into(),
        "--datapath".into(),
        datapath.into(),
    ];
    args.extend(extra.iter().cloned());
    let proxy = Command::new(bin.join("sluice")).args(&args).spawn();
    let mut proxy = match proxy {
        Ok(p) => p,
        Err(e) => {
            let _ = origin.kill();
            return Err(e).context("starting sluice");
        }
    };
    println!();
    println!(
        "Sluice listens on ws://127.0.0.1:8080/ in front of an echo origin on 127.0.0.1:9000."
    );
    println!("Talk to it with a real client, for example:");
    println!("    python3 -m websockets ws://127.0.0.1:8080/");
    println!("Ctrl-C stops both.");
    println!();
    // Ctrl-C reaches the whole foreground process group, so both children get
    // SIGINT and exit on their own; we wait for them.
    let status = proxy.wait()?;
    let _ = origin.kill();
    let _ = origin.wait();
    if !status.success() && status.code() != Some(130) && status.code().is_some() {
        bail!("sluice exited with {status}");
    }
    Ok(())
}
