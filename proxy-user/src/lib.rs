//! Sluice: a WebSocket edge proxy whose byte path runs in the kernel.
//!
//! User space accepts the client, checks the RFC 6455 handshake, connects to
//! the origin and relays the 101 ([`lifecycle`]). Then a data path
//! ([`datapath`]) carries the bytes: an eBPF sockmap program, an io_uring
//! relay, or a plain user-space relay.

pub mod accesslog;
pub mod accounting;
pub mod config;
pub mod datapath;
pub mod error;
pub mod handshake;
pub mod lifecycle;
pub mod logwriter;
pub mod response_body;
pub mod server;
pub mod sockopt;
