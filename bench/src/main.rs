//! `sluice-bench`: runs the benchmark matrix (see the library docs).

use std::path::PathBuf;

use clap::Parser;

/// Sluice side by side with a direct connection, nginx, HAProxy and Caddy.
#[derive(Parser)]
struct Cli {
    /// The whole matrix, smaller, in under 3 minutes.
    #[arg(long)]
    quick: bool,
    /// The `sluice` binary to measure.
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    /// Where the report and charts go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Only these targets (comma-separated row names, e.g. direct,sluice-uring,nginx).
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Only these workloads (comma-separated: w1,w2,w3,w4).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Repetitions per measurement (default 5 for W1 and W4 and 3 for W2
    /// and W3, or 1 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Measure in the host's network namespace, under its TCP settings
    /// (default: a namespace of the run's own, with cubic).
    #[arg(long, conflicts_with = "remote")]
    host_network: bool,
    /// Peers on other hosts, as at an edge: the load generator, the targets
    /// and the origin each in a namespace of the run's own, joined by veth
    /// pairs (direct is routed through the targets' namespace). Needs root
    /// and `ip` (iproute2). The report's name ends in `-remote`.
    #[arg(long)]
    remote: bool,
    /// With --remote: the origin on the targets' host instead, listening on
    /// their address (an app behind its edge proxy; the proxies reach it
    /// over `lo`). The report's name ends in `-remote-origin-here`.
    #[arg(long, requires = "remote")]
    origin_here: bool,
    /// W2's connection counts (comma-separated; default 1,100,1000).
    #[arg(long, value_delimiter = ',')]
    echo_conns: Vec<usize>,
    /// W2's message sizes in bytes (comma-separated; default 64,1024,16384).
    #[arg(long, value_delimiter = ',')]
    echo_sizes: Vec<usize>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let opts = sluice_bench::Opts {
        quick: cli.quick,
        sluice: cli.sluice,
        out: cli.out,
        only: cli.targets,
        reps: cli.reps,
        workloads: cli.workloads,
        host_network: cli.host_network,
        remote: cli.remote,
        origin_here: cli.origin_here,
        echo_conns: cli.echo_conns,
        echo_sizes: cli.echo_sizes,
    };
    let md = sluice_bench::run(&opts).map_err(anyhow::Error::msg)?;
    println!("{md}");
    Ok(())
}
