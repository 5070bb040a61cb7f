//! `cargo xtask`: the project's own build and test driver.
//!
//! - `cargo xtask build-plugins` builds the four rule guests (and the `hostile` and `hostile_anomaly` test fixtures) to WebAssembly
//!   components (wasm32-wasip2) in one cargo call and copies them to
//!   `target/plugins/<name>.wasm`, where `pipeline.toml` looks for them.
//! - `cargo xtask test` starts the services the tests need (PostgreSQL,
//!   Redis, the Tansu Kafka broker; Tansu is installed from crates.io when
//!   missing), validates docker-compose.yml when docker-compose is
//!   installed, builds the plugins, and runs every test of the workspace.
//! - `cargo xtask bench [FILTER]` builds in release and runs the benchmarks
//!   (FILTER: `anomaly`, `hotpath`, `stream`, `http`, `sustained`, `kafka`;
//!   `kafka` needs a broker at `KAFKA_BROKERS`, e.g. the Tansu that
//!   `cargo xtask services start` starts, and is skipped without one).
//! - `cargo xtask check-compose` validates docker-compose.yml alone.
//!
//! It depends on nothing but `anyhow` so that it builds in seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

/// The rule plugins, and two test fixtures never in pipeline.toml or the
/// image: `hostile`, a misbehaving tariff rule (the sandbox and hot swap),
/// and `hostile_anomaly`, an anomaly rule that traps on spikes (the
/// dead-letter policy).
const PLUGINS: [&str; 6] = [
    "anomaly",
    "overload",
    "tariff",
    "aggregate",
    "hostile",
    "hostile_anomaly",
];
const GUEST_TARGET: &str = "wasm32-wasip2";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build-plugins") => build_plugins().map(|_| ()),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("check-compose") => check_compose(),
        Some("services") => match args.get(1).map(String::as_str) {
            Some("start") => ensure_services(),
            _ => check_services(),
        },
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 build-plugins   build the rule plugins to target/plugins/*.wasm\n  \
                 test [ARGS]     check services, build plugins, run every test (ARGS go to the test runner)\n  \
                 bench [FILTER]  run the benchmarks in release mode (FILTER: anomaly, hotpath, stream, http, sustained, kafka, store)\n  \
                 check-compose   validate docker-compose.yml (docker-compose config -q; part of test)\n  \
                 services [start] check (or start) the services the tests need"
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

/// A service the test suite talks to.
struct Service {
    name: &'static str,
    addr: &'static str,
    /// The program that must be installed to run it.
    program: &'static str,
    /// Starts it in the background (`sh -c`).
    start: &'static str,
    /// How to install it when the program is missing, if we can.
    install: Option<&'static [&'static str]>,
}

/// Tansu, the Kafka-protocol broker of the tests: loopback only, in-memory
/// storage (a fresh broker per start).
const TANSU_START: &str = "nohup tansu broker \
    --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/ \
    > /tmp/segs-tansu.log 2>&1 &";

/// Tansu with in-memory storage (the shared test broker) and SQLite storage
/// (the broker-restart test runs its own, whose records must outlive it).
const TANSU_INSTALL: &[&str] = &[
    "install",
    "tansu",
    "--locked",
    "--features",
    "dynostore,libsql",
];

/// Whether the installed Tansu was built with every feature the tests use
/// (cargo records the features of `cargo install` in `.crates2.json`).
fn tansu_has_features() -> bool {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let Some(text) = home.and_then(|h| std::fs::read_to_string(h.join(".crates2.json")).ok())
    else {
        return false;
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    json["installs"].as_object().is_some_and(|installs| {
        installs.iter().any(|(k, v)| {
            k.starts_with("tansu ")
                && ["dynostore", "libsql"].iter().all(|f| {
                    v["features"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == f))
                })
        })
    })
}

const SERVICES: [Service; 3] = [
    Service {
        name: "PostgreSQL",
        addr: "127.0.0.1:5432",
        program: "pg_ctlcluster",
        start: "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
        install: None,
    },
    Service {
        name: "Redis",
        addr: "127.0.0.1:6379",
        program: "redis-server",
        start: "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no",
        install: None,
    },
    Service {
        name: "Kafka (Tansu)",
        addr: "127.0.0.1:9092",
        program: "tansu",
        start: TANSU_START,
        install: Some(TANSU_INSTALL),
    },
];

fn is_up(addr: &str) -> bool {
    addr.parse()
        .ok()
        .and_then(|a| {
            std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).ok()
        })
        .is_some()
}

fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Installs Debian `packages` with apt-get, when this user is root and
/// apt-get is there; whether it went through.
fn apt_install(packages: &[&str], why: &str) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root || !installed("apt-get") {
        return false;
    }
    eprintln!(
        "xtask: installing {} for {why} (apt-get, once)",
        packages.join(" ")
    );
    Command::new("apt-get")
        .args(["install", "-y", "-q"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The headless browser the dashboard test drives: Debian's `chromium` and
/// `chromium-driver` (WebDriver). Installed with apt-get when missing and
/// this user may; otherwise named.
fn ensure_browser(missing: &mut Vec<String>) {
    if installed("chromium") && installed("chromedriver") {
        eprintln!("xtask: chromium and chromedriver are installed (dashboard test)");
        return;
    }
    if apt_install(&["chromium", "chromium-driver"], "the dashboard test")
        && installed("chromium")
        && installed("chromedriver")
    {
        return;
    }
    missing.push(
        "headless browser: `chromium` and `chromedriver` are not installed \
         (Debian: apt-get install chromium chromium-driver)"
            .into(),
    );
}

/// Makes sure every service the tests need is up: starts what is installed
/// but not running, installs what can be installed (Tansu, from crates.io;
/// the browser, from Debian's packages), and fails naming what is missing
/// and how to get it.
fn ensure_services() -> Result<()> {
    let mut missing = Vec::new();
    ensure_browser(&mut missing);
    if installed("tansu") && !tansu_has_features() {
        eprintln!(
            "xtask: the installed Tansu lacks the `libsql` feature (the broker-restart test \
             needs its SQLite storage); reinstalling it (cargo {}; a few minutes, once)",
            TANSU_INSTALL.join(" ")
        );
        let mut cmd = cargo();
        cmd.args(TANSU_INSTALL);
        run(cmd)?;
    }
    for s in &SERVICES {
        if is_up(s.addr) {
            eprintln!("xtask: {} is up at {}", s.name, s.addr);
            continue;
        }
        if !installed(s.program) {
            match s.install {
                Some(args) => {
                    eprintln!(
                        "xtask: {} is not installed; installing it (cargo {}; a few minutes, once)",
                        s.name,
                        args.join(" ")
                    );
                    let mut cmd = cargo();
                    cmd.args(args);
                    run(cmd)?;
                }
                None => {
                    missing.push(format!(
                        "{}: `{}` is not installed (Debian package: see the README)",
                        s.name, s.program
                    ));
                    continue;
                }
            }
        }
        eprintln!(
            "xtask: starting {} ({})",
            s.name,
            s.start
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        );
        std::fs::create_dir_all(target_dir()).ok();
        let status = Command::new("sh")
            .args(["-c", s.start])
            .current_dir(root())
            .status()
            .with_context(|| format!("starting {}", s.name))?;
        if !status.success() {
            missing.push(format!("{}: `{}` failed with {status}", s.name, s.start));
            continue;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !is_up(s.addr) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        if is_up(s.addr) {
            eprintln!("xtask: {} is up at {}", s.name, s.addr);
        } else {
            missing.push(format!(
                "{}: started, but nothing answers at {}",
                s.name, s.addr
            ));
        }
    }
    if !missing.is_empty() {
        bail!(
            "services the tests need are missing:\n  {}",
            missing.join("\n  ")
        );
    }
    Ok(())
}

/// Reports each service without starting anything.
fn check_services() -> Result<()> {
    for s in &SERVICES {
        if is_up(s.addr) {
            eprintln!("xtask: {} is up at {}", s.name, s.addr);
        } else if installed(s.program) {
            eprintln!(
                "xtask: {} is NOT running at {}; start it with: {}",
                s.name, s.addr, s.start
            );
        } else {
            eprintln!("xtask: {} is NOT installed (`{}`)", s.name, s.program);
        }
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    ensure_services()?;
    check_compose()?;
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

/// Validates docker-compose.yml with `docker-compose config -q` (or
/// `docker compose config -q`): syntax, schema and interpolation, no engine
/// needed. When neither is installed, Debian's `docker-compose` is installed
/// (as for the browser); skipped, and said so, when that cannot be done. The Dockerfile
/// is checked against a local build by `host/tests/container.rs`.
fn check_compose() -> Result<()> {
    let compose = root().join("docker-compose.yml");
    let has_docker_compose_v2 = || {
        Command::new("docker")
            .args(["compose", "version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !installed("docker-compose") && !has_docker_compose_v2() {
        apt_install(&["docker-compose"], "validating docker-compose.yml");
    }
    let v1 = installed("docker-compose");
    let v2 = !v1 && has_docker_compose_v2();
    let mut cmd = if v1 {
        Command::new("docker-compose")
    } else if v2 {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    } else {
        eprintln!(
            "xtask: SKIPPED validating docker-compose.yml: neither docker-compose nor `docker compose` is installed (Debian: apt-get install docker-compose)"
        );
        return Ok(());
    };
    cmd.arg("-f").arg(&compose).args(["config", "-q"]);
    cmd.current_dir(root());
    run(cmd).context("docker-compose.yml is not a valid compose file")?;
    eprintln!("xtask: docker-compose.yml is valid");
    Ok(())
}

fn bench(extra: &[String]) -> Result<()> {
    build_plugins()?;
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "segs", "--bench", "pipeline", "--"]);
    cmd.args(extra);
    run(cmd)?;
    // The time a hot swap takes (`cargo xtask bench swap` for it alone).
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "segs", "--bench", "hot_swap", "--"]);
    cmd.args(extra);
    run(cmd)
}
