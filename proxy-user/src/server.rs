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
///
/// Thread per core: each worker thread runs its own single-threaded runtime
/// and accepts on its own handle of every listening socket, so whichever
/// worker is free takes the next connection, and a connection's tasks never
/// move between threads. Every worker is woken for each connection and all
/// but one find nothing to accept. A listener with `reuse_port` instead
/// gives each worker its own `SO_REUSEPORT` socket: the kernel spreads by
/// hash and wakes one worker, but a second daemon could then bind the same
/// port without an error, so it is opt-in. The calling runtime keeps the
/// data paths' monitors.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let cfg = Arc::new(cfg);
    let fds = raise_fd_limit();
    let paths =
        Arc::new(DataPaths::start(cfg.datapath, &cfg.limits).map_err(ServerError::DataPath)?);
    let workers = cfg
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // Accepted sockets inherit the listener's buffer sizes, unless the path
    // wants them set after the handshake.
    let listener_bound =
        (!paths.bound_after_handshake()).then_some(cfg.limits.max_buffer_per_direction);
    // Bind every listener here, so errors surface before the ready line.
    let mut first: Vec<(std::net::TcpListener, Arc<ListenerCtx>)> = Vec::new();
    for l in &cfg.listeners {
        let bind_err = |source| ServerError::Bind {
            addr: l.listen,
            source,
        };
        let tl = bind(l.listen, listener_bound, l.reuse_port).map_err(bind_err)?;
        // Armed before any worker accepts on it (sockmap's safe detach).
        let port = tl.local_addr().map_err(bind_err)?.port();
        paths.serve_port(port).map_err(ServerError::DataPath)?;
        let ctx = Arc::new(ListenerCtx {
            cfg: cfg.clone(),
            origin: l.origin,
            paths: paths.clone(),
        });
        first.push((tl, ctx));
    }
    let mut per_worker: Vec<Vec<(std::net::TcpListener, Arc<ListenerCtx>)>> = vec![first];
    for _ in 1..workers {
        let mut set = Vec::new();
        for ((tl, ctx), l) in per_worker[0].iter().zip(&cfg.listeners) {
            let copy = if l.reuse_port {
                // Its own socket in the same reuseport group: the address is
                // the one the first socket got (port 0 resolved).
                tl.local_addr().and_then(|a| bind(a, listener_bound, true))
            } else {
                tl.try_clone()
            }
            .map_err(|source| ServerError::Bind {
                addr: l.listen,
                source,
            })?;
            set.push((copy, ctx.clone()));
        }
        per_worker.push(set);
    }
    for (tl, ctx) in &per_worker[0] {
        tracing::info!(
            "sluice ready: listening on {} -> origin {}, datapath {} ({}), {workers} worker(s), \
             {fds} fds (two per session)",
            tl.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            ctx.origin,
            paths.primary,
            paths.why
        );
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let uring = paths.uring_on_workers();
    let mut threads = Vec::new();
    for (i, set) in per_worker.into_iter().enumerate() {
        let stop = stop_rx.clone();
        let t = std::thread::Builder::new()
            .name(format!("sluice-w{i}"))
            .spawn(move || run_worker(i, set, stop, uring));
        match t {
            Ok(t) => threads.push(t),
            Err(e) => tracing::error!("cannot start worker {i}: {e}"),
        }
    }
    shutdown.await;
    tracing::info!("sluice stopping");
    let _ = stop_tx.send(true);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit, and returns the
/// limit in force. Each session holds two fds, and the usual soft limit
/// (1,024) would cap the host at about 500 sessions, refused with EMFILE at
/// accept; HAProxy raises its own limit to fit `maxconn` in the same way,
/// and nginx has `worker_rlimit_nofile`. The hard limit is the operator's
/// (`LimitNOFILE=` in a systemd unit, `ulimit -Hn`).
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            return soft;
        }
    }
    hard.max(soft)
}

/// A listening socket; with `bound`, its buffers (which accepted sockets
/// inherit) are sized for that per-direction bound.
fn bind(
    addr: SocketAddr,
    bound: Option<u64>,
    reuse_port: bool,
) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    // Accepted sockets inherit the buffer sizes (and with them the window
    // scale) and TCP_NODELAY: no per-connection setsockopt for either.
    if let Some(bound) = bound {
        crate::sockopt::bound_buffers(s.as_fd(), bound);
    }
    s.set_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    // Inherited too, so the ACK of the upgrade request rides on the 101;
    // after listen(), which resets the ACK state.
    crate::sockopt::delay_acks(s.as_fd());
    crate::sockopt::defer_accept(s.as_fd());
    Ok(s.into())
}

/// One worker thread: its own single-threaded runtime, and on it an accept
/// loop per listener. With `uring`, the runtime is tokio-uring's, so this
/// thread also relays the connections it accepted (no hand-off to another
/// thread); a worker whose ring cannot be set up relays in user space.
fn run_worker(
    i: usize,
    set: Vec<(std::net::TcpListener, Arc<ListenerCtx>)>,
    stop: tokio::sync::watch::Receiver<bool>,
    uring: bool,
) {
    if uring {
        match crate::datapath::uring::worker_runtime() {
            Ok(rt) => {
                // Dropping the runtime cancels the relays' operations.
                rt.block_on(serve_worker(i, set, stop, true));
                return;
            }
            Err(e) => tracing::warn!(
                "worker {i} cannot set up io_uring ({e}); its connections use the user-space relay"
            ),
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("worker {i} cannot start its runtime: {e}");
            return;
        }
    };
    rt.block_on(serve_worker(i, set, stop, false));
    // Relays still running are cut here; graceful drain comes with reload.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
}

/// Accepts on every listener of this worker until `stop`. `local`: the
/// runtime has a `LocalSet` (tokio-uring's), and connections are spawned
/// into it, where the io_uring relay can run its `!Send` operations.
async fn serve_worker(
    i: usize,
    set: Vec<(std::net::TcpListener, Arc<ListenerCtx>)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    local: bool,
) {
    let mut tasks = tokio::task::JoinSet::new();
    if local {
        tasks.spawn_local(heartbeat());
    } else {
        tasks.spawn(heartbeat());
    }
    for (tl, ctx) in set {
        match TcpListener::from_std(tl) {
            Ok(tl) if local => {
                tasks.spawn_local(accept_loop(tl, ctx, true));
            }
            Ok(tl) => {
                tasks.spawn(accept_loop(tl, ctx, false));
            }
            Err(e) => tracing::error!("worker {i}: listener: {e}"),
        }
    }
    let _ = stop.wait_for(|s| *s).await;
    tasks.abort_all();
}

/// Keeps a timer due within [`HEARTBEAT`] on this worker's runtime. Tokio
/// wakes its own driver (an eventfd write, and one more `epoll_wait` round)
/// whenever a new timer is due before every timer the driver last parked
/// for. Each session sets a 5 s connect timeout while the timers already
/// set are mostly 10 s ones, so without this, about one session in three
/// woke its own worker (`strace` over W4).
async fn heartbeat() {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// See [`heartbeat`]: shorter than every per-session timeout but the
/// sockmap promotion delay, and rare enough to cost nothing when idle.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

async fn accept_loop(tl: TcpListener, ctx: Arc<ListenerCtx>, local: bool) {
    loop {
        match tl.accept().await {
            Ok((stream, peer)) => {
                lifecycle::spawn_on_worker(
                    local,
                    lifecycle::serve_client(stream, peer, ctx.clone(), local),
                );
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bind;

    #[test]
    fn a_second_bind_fails_unless_both_reuse_the_port() {
        let first = bind("127.0.0.1:0".parse().unwrap(), Some(1 << 20), false).unwrap();
        let addr = first.local_addr().unwrap();
        let err = bind(addr, Some(1 << 20), false).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);

        let a = bind("127.0.0.1:0".parse().unwrap(), Some(1 << 20), true).unwrap();
        let addr = a.local_addr().unwrap();
        let b = bind(addr, Some(1 << 20), true).expect("a reuseport group takes a second socket");
        assert_eq!(b.local_addr().unwrap(), addr);
        // One socket of the group still accepts: connect and take it.
        drop(b);
        a.set_nonblocking(false).unwrap();
        let c = std::net::TcpStream::connect(addr).unwrap();
        let (s, peer) = a.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        drop(s);
    }

    #[test]
    fn a_connection_is_accepted_once_its_first_bytes_are_in() {
        use std::io::{Read, Write};
        let l = bind("127.0.0.1:0".parse().unwrap(), None, false).unwrap();
        let addr = l.local_addr().unwrap();
        // Connected from the client's side, but silent: not accepted yet.
        let silent = std::net::TcpStream::connect(addr).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let e = l.accept().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        // The one that speaks is accepted, with its bytes there to read.
        let mut talker = std::net::TcpStream::connect(addr).unwrap();
        talker.write_all(b"GET").unwrap();
        let mut got = None;
        for _ in 0..200 {
            match l.accept() {
                Ok(a) => {
                    got = Some(a);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        let (mut s, peer) = got.expect("the talker is accepted");
        assert_eq!(peer, talker.local_addr().unwrap());
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 3];
        assert_eq!(s.read(&mut b).unwrap(), 3);
        drop(silent);
    }
}
