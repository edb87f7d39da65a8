//! Listeners and the accept loop; start-up and shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::datapath::DataPaths;
use crate::lifecycle::{self, ListenerCtx};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configured data path is not available.
    #[error("{0}")]
    DataPath(String),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Binds every listener and serves until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let cfg = Arc::new(cfg);
    let paths =
        Arc::new(DataPaths::start(cfg.datapath, &cfg.limits).map_err(ServerError::DataPath)?);
    let mut listeners = Vec::new();
    for l in &cfg.listeners {
        let tl = bind(l.listen, cfg.limits.max_buffer_per_direction).map_err(|source| {
            ServerError::Bind {
                addr: l.listen,
                source,
            }
        })?;
        let ctx = Arc::new(ListenerCtx {
            cfg: cfg.clone(),
            origin: l.origin,
            paths: paths.clone(),
        });
        listeners.push((tl, ctx));
    }
    for (tl, ctx) in &listeners {
        tracing::info!(
            "sluice ready: listening on {} -> origin {}, datapath {} ({})",
            tl.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            ctx.origin,
            paths.primary,
            paths.why
        );
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (tl, ctx) in listeners {
        tasks.spawn(accept_loop(tl, ctx));
    }
    shutdown.await;
    tracing::info!("sluice stopping");
    tasks.abort_all();
    Ok(())
}

fn bind(addr: SocketAddr, bound: u64) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    // Accepted sockets inherit the buffer sizes, and with them the window scale.
    crate::sockopt::bound_buffers(s.as_fd(), bound);
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

async fn accept_loop(tl: TcpListener, ctx: Arc<ListenerCtx>) {
    loop {
        match tl.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(lifecycle::serve_client(stream, peer, ctx.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
