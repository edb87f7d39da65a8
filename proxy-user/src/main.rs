//! The `sluice` daemon: flags and config in, [`sluice::server::run`] out.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use sluice::config::{Config, Listener};
use sluice::datapath::DataPathChoice;

/// A WebSocket edge proxy whose byte path runs in the kernel.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file (without it: the built-in default or the flags).
    #[arg(long, short, conflicts_with_all = ["listen", "origin"])]
    config: Option<PathBuf>,
    /// Address to listen on (with --origin, instead of a config file).
    #[arg(long, requires = "origin")]
    listen: Option<SocketAddr>,
    /// Origin host:port that receives the WebSocket sessions.
    #[arg(long, requires = "listen")]
    origin: Option<SocketAddr>,
    /// With --listen: one SO_REUSEPORT socket per worker (see the config
    /// key `reuse_port`).
    #[arg(long, requires = "listen")]
    reuse_port: bool,
    /// Data path after the 101 (overrides the config file).
    #[arg(long, value_enum)]
    datapath: Option<DataPathChoice>,
    /// On the tcpsplice, sockmap and uring paths, join the chosen path once
    /// a connection is this old and idle; 0 at the 101 (overrides
    /// `limits.promote_after_ms`).
    #[arg(long, alias = "sockmap-promote-after-ms")]
    promote_after_ms: Option<u64>,
    /// Worker threads (overrides `workers`; default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Log filter, as RUST_LOG (default: info).
    #[arg(long)]
    log: Option<String>,
}

fn main() -> Result<()> {
    // glibc gives every thread that allocates its own arena (workers, the
    // uring and log threads); memory freed on one thread stays scattered
    // across them and RSS drifts by megabytes. The byte paths allocate
    // rarely (they reuse their buffers), so one arena costs little and keeps
    // RSS flat.
    // Nor does it hand the heap top back after every burst only to grow it
    // again on the next: keep up to 16 MiB of it.
    // SAFETY: mallopt before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
    spawn_trimmer();
    let cli = Cli::parse();
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    // Log lines (two access lines per session) are written in batches by
    // one thread; nothing is dropped when it falls behind.
    let (writer, _flush_on_exit) =
        sluice::logwriter::start(Box::new(std::io::stderr())).context("starting the log writer")?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(writer.clone())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Access lines skip `tracing`'s formatter (see `accesslog`).
    sluice::accesslog::install(writer);

    let mut cfg = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let (Some(listen), Some(origin)) = (cli.listen, cli.origin) {
        cfg.listeners = vec![Listener {
            listen,
            origin,
            reuse_port: cli.reuse_port,
        }];
    }
    if let Some(d) = cli.datapath {
        cfg.datapath = d;
    }
    if let Some(w) = cli.workers {
        cfg.workers = Some(w);
    }
    if let Some(ms) = cli.promote_after_ms {
        cfg.limits.promote_after_ms = ms;
    }
    let cfg = cfg.validate(std::path::Path::new("<flags>"))?;

    // The control runtime: signals and the data paths' monitors. The
    // workers run their own (see `server::run`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        sluice::server::run(cfg, shutdown_signal()).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(())
}

/// Hands freed heap pages back to the kernel once a second when more than
/// 1 MiB lies free. glibc only returns the top of the heap, and the state of
/// connections that closed lies scattered below live ones. Measured: after
/// 3,000 idle sessions closed, RSS went back from 13.6 to 5.8 MiB with this,
/// and stayed at 13.8 MiB without.
fn spawn_trimmer() {
    let _ = std::thread::Builder::new()
        .name("sluice-trim".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            // SAFETY: mallinfo2 and malloc_trim have no preconditions.
            unsafe {
                if libc::mallinfo2().fordblks > 1 << 20 {
                    libc::malloc_trim(0);
                }
            }
        });
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
