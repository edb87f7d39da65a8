//! Builds the eBPF object with the nightly toolchain, as aya's template does,
//! and tells the crate where the objects are: `SLUICE_EBPF_OBJ` (sockmap)
//! and `SLUICE_TCPSPLICE_OBJ` (tcpsplice).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let ebpf = root.join("proxy-ebpf");
    for p in ["src", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf.join(p).display());
    }
    for p in ["src", "Cargo.toml"] {
        println!(
            "cargo:rerun-if-changed={}",
            root.join("proxy-common").join(p).display()
        );
    }
    // Share one target dir across profiles: OUT_DIR is target/<profile>/build/<pkg>/out.
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_dir = out
        .ancestors()
        .nth(4)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out.clone())
        .join("ebpf");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--release",
        "--target-dir",
    ])
    .arg(&target_dir)
    .current_dir(&ebpf);
    // Do not leak the outer (stable) build's settings into the nightly build.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO")
            || k.starts_with("RUSTC")
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTFLAGS"
        {
            cmd.env_remove(k);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run rustup to build the eBPF programs ({e}); run `cargo xtask setup`")
    });
    assert!(
        status.success(),
        "building proxy-ebpf failed; `cargo xtask setup` installs rust-src and bpf-linker"
    );
    let bins = target_dir.join("bpfel-unknown-none/release");
    for (var, bin) in [
        ("SLUICE_EBPF_OBJ", "sluice-ebpf"),
        ("SLUICE_TCPSPLICE_OBJ", "sluice-tcpsplice"),
    ] {
        println!("cargo:rustc-env={var}={}", bins.join(bin).display());
    }
}
