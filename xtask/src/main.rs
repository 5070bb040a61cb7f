//! `cargo xtask`: the project's own build and test driver.
//!
//! - `cargo xtask build-plugins` builds the four rule guests to WebAssembly
//!   components (wasm32-wasip2) in one cargo call and copies them to
//!   `target/plugins/<name>.wasm`, where `pipeline.toml` looks for them.
//! - `cargo xtask test` checks the services the tests need, builds the
//!   plugins, and runs every test of the workspace.
//! - `cargo xtask bench` builds in release and runs the benchmarks.
//!
//! It depends on nothing but `anyhow` so that it builds in seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

const PLUGINS: [&str; 4] = ["anomaly", "overload", "tariff", "aggregate"];
const GUEST_TARGET: &str = "wasm32-wasip2";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build-plugins") => build_plugins().map(|_| ()),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("services") => check_services().map(|_| ()),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 build-plugins   build the rule plugins to target/plugins/*.wasm\n  \
                 test [ARGS]     check services, build plugins, run every test (ARGS go to the test runner)\n  \
                 bench [FILTER]  run the benchmarks in release mode\n  \
                 services        check the services the tests need"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one folder below the workspace root")
        .to_owned()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(mut cmd: Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Adds the guest target with rustup when it is missing.
fn ensure_guest_target() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let installed = String::from_utf8_lossy(&out.stdout);
            if installed.lines().any(|l| l.trim() == GUEST_TARGET) {
                return Ok(());
            }
            eprintln!("xtask: the {GUEST_TARGET} target is missing; adding it with rustup");
            let mut add = Command::new("rustup");
            add.args(["target", "add", GUEST_TARGET]);
            run(add)
        }
        _ => {
            eprintln!("xtask: rustup not found; assuming the {GUEST_TARGET} target is installed");
            Ok(())
        }
    }
}

/// Builds every guest in one cargo invocation (shared dependencies compile
/// once) and copies the components to `target/plugins/`.
fn build_plugins() -> Result<Vec<PathBuf>> {
    ensure_guest_target()?;
    let mut cmd = cargo();
    cmd.args(["build", "--target", GUEST_TARGET, "--profile", "plugin"]);
    for p in PLUGINS {
        cmd.args(["-p", p]);
    }
    run(cmd)?;
    let target_dir = target_dir();
    let built = target_dir.join(GUEST_TARGET).join("plugin");
    let out_dir = target_dir.join("plugins");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut outputs = Vec::new();
    for p in PLUGINS {
        let from = built.join(format!("{p}.wasm"));
        let to = out_dir.join(format!("{p}.wasm"));
        let bytes = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
        // A component has layer 1 in bytes 6..8; a core module has layer 0.
        if bytes.len() < 8 || bytes[0..4] != *b"\0asm" || bytes[6..8] != [1, 0] {
            bail!(
                "{} is not a WebAssembly component (is the {GUEST_TARGET} target's linker in use?)",
                from.display()
            );
        }
        std::fs::write(&to, &bytes).with_context(|| format!("writing {}", to.display()))?;
        println!("{:>10}  {} ({} KiB)", p, to.display(), bytes.len() / 1024);
        outputs.push(to);
    }
    println!(
        "plugins: {} components in {}",
        outputs.len(),
        out_dir.display()
    );
    Ok(outputs)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// The services the test suite talks to. Each is checked with a TCP connect;
/// what is missing is named together with the command that starts it.
fn check_services() -> Result<Vec<&'static str>> {
    let services: [(&str, &str, &str); 2] = [
        (
            "PostgreSQL",
            "127.0.0.1:5432",
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
        ),
        (
            "Redis",
            "127.0.0.1:6379",
            "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no",
        ),
    ];
    let mut missing = Vec::new();
    for (name, addr, start) in services {
        let up = addr
            .parse()
            .ok()
            .and_then(|a| {
                std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).ok()
            })
            .is_some();
        if up {
            eprintln!("xtask: {name} is up at {addr}");
        } else {
            eprintln!("xtask: {name} is NOT reachable at {addr}; start it with: {start}");
            missing.push(name);
        }
    }
    Ok(missing)
}

/// The store suite's `::postgres` tests need PostgreSQL at 127.0.0.1:5432:
/// when nothing listens there, try to start the local cluster.
fn check_postgres() {
    let addr = "127.0.0.1:5432".parse().expect("a socket address");
    let up =
        || std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).is_ok();
    if up() {
        return;
    }
    eprintln!("xtask: starting PostgreSQL");
    let started = Command::new("sh")
        .args([
            "-c",
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !started || !up() {
        eprintln!("xtask: could not start PostgreSQL; the ::postgres store tests will fail");
    }
}

fn test(extra: &[String]) -> Result<()> {
    check_postgres();
    // Report what is (still) missing.
    let _ = check_services()?;
    build_plugins()?;
    let nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let mut cmd = cargo();
    if nextest {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
    }
    cmd.args(extra);
    run(cmd)?;
    if nextest {
        // nextest does not run doctests.
        let mut doc = cargo();
        doc.args(["test", "--workspace", "--doc"]);
        run(doc)?;
    }
    Ok(())
}

fn bench(extra: &[String]) -> Result<()> {
    build_plugins()?;
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "segs", "--bench", "pipeline", "--"]);
    cmd.args(extra);
    run(cmd)
}
