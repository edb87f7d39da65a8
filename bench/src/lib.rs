//! The benchmark harness (`cargo xtask bench`), issue #3: not built yet.
//! It will run a direct connection, Sluice's three data paths, nginx and
//! HAProxy side by side against one origin and one load generator.
