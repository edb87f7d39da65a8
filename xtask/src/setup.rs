//! Idempotent installation of the toolchain pieces and packages.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::check;

/// Python packages the end-to-end tests use as independent peers.
const PY_PACKAGES: &[(&str, &str)] = &[("websockets", "websockets>=12")];
/// Debian packages the tests use: `setpriv` for the unprivileged run,
/// `nsenter` and `ip` (network namespaces, veth pairs) and `ss` for
/// `remote_peers`, and `ip` for the bench's `--remote` topology.
const APT_TEST: &[(&str, &str)] = &[
    ("setpriv", "util-linux"),
    ("nsenter", "util-linux"),
    ("ip", "iproute2"),
    ("ss", "iproute2"),
];

/// Everything `build`, `run` and `test` need.
pub fn all(root: &Path) -> Result<()> {
    rust_src()?;
    bpf_linker(root)?;
    apt(APT_TEST)?;
    python()?;
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context("the nightly toolchain is needed to build the eBPF programs")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: installing the nightly rust-src component");
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .status()?;
    check(status, "rustup component add rust-src --toolchain nightly")
}

fn bpf_linker(root: &Path) -> Result<()> {
    let present = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    // bpf-linker must link against the same LLVM major as rustc. Debian does
    // not package that LLVM, but the nightly toolchain ships its own libLLVM:
    // point bpf-linker's build at it through a small prefix of symlinks.
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV does not name its LLVM version")?
        .trim()
        .to_string();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let lib = std::fs::read_dir(&libdir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| {
            n.starts_with(&format!("libLLVM.so.{major}"))
                || n.starts_with(&format!("libLLVM-{major}"))
        })
        .with_context(|| format!("no libLLVM {major} in {}", libdir.display()))?;
    let prefix = root.join("target/llvm-prefix");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for name in ["libLLVM.so", lib.as_str()] {
        let link = plib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(&lib), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!("setup: building bpf-linker against the nightly toolchain's LLVM {major} ({lib})");
    let status = Command::new(env!("CARGO"))
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()?;
    check(status, "cargo install bpf-linker")
}

fn apt(pkgs: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = pkgs
        .iter()
        .filter(|(bin, _)| !has_command(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {missing:?}");
    let status = Command::new("apt-get").arg("update").arg("-q").status()?;
    check(status, "apt-get update")?;
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    check(status, "apt-get install")
}

fn has_command(bin: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"]
        .iter()
        .any(|d| Path::new(d).join(bin).exists())
}

fn python() -> Result<()> {
    for (module, spec) in PY_PACKAGES {
        let ok = Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            continue;
        }
        eprintln!("setup: installing the Python package {spec}");
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", spec])
            .status()?;
        check(status, "pip install")?;
    }
    Ok(())
}
