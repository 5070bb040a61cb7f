//! The container files against the repository, without a container engine:
//! what the `Dockerfile` copies out of its builder stage is what the same
//! commands build here, its `ENTRYPOINT`/`CMD` and the compose file's
//! commands are accepted by the real CLI, and `deploy/pipeline.compose.toml`
//! is the shipped pipeline.toml on Kafka and Redis.
//!
//! Cheap by design: no release build. The builder stage's
//! `target/release/segs` is checked as the `segs` binary cargo builds for
//! the tests; the plugins must have been built by `cargo xtask
//! build-plugins` (`cargo xtask test` does it first). `cargo xtask test`
//! also runs `docker-compose config -q` when docker-compose is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use segs::config::{BusKind, DedupeKind, PipelineConfig};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where cargo puts its output here (the builder stage's `/src/target`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

const PLUGINS: [&str; 4] = ["anomaly", "overload", "tariff", "aggregate"];

/// One Dockerfile instruction: its keyword (upper case), the build stage it
/// belongs to (0 = builder) and its arguments, continuation lines joined.
struct Instruction {
    stage: usize,
    keyword: String,
    args: String,
}

fn dockerfile() -> Vec<Instruction> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut stage = 0usize;
    let mut seen_from = false;
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        if let Some(body) = line.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let (keyword, args) = current.split_once(char::is_whitespace).unwrap();
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            if seen_from {
                stage += 1;
            }
            seen_from = true;
        }
        out.push(Instruction {
            stage,
            keyword,
            args: args.trim().to_owned(),
        });
        current.clear();
    }
    out
}

fn json_array(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not an exec-form array: {s}: {e}"))
}

/// Runs the real `segs` with `args` and `--help` appended: clap refuses an
/// unknown subcommand or flag before it gets to `--help`.
fn cli_accepts(args: &[String]) {
    let out = Command::new(env!("CARGO_BIN_EXE_segs"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "segs {args:?} is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dockerfile_builds_and_copies_what_the_repository_builds() {
    let all = dockerfile();
    let stages = all.iter().map(|i| i.stage).max().unwrap() + 1;
    assert_eq!(stages, 2, "a builder and a runtime stage");
    let from: Vec<&str> = all
        .iter()
        .filter(|i| i.keyword == "FROM")
        .map(|i| i.args.as_str())
        .collect();
    assert!(from[0].starts_with("rust:") && from[0].ends_with(" AS builder"));
    assert!(from[1].starts_with("debian:bookworm-slim"), "{}", from[1]);

    // The builder runs the README's build commands.
    let runs: Vec<&str> = all
        .iter()
        .filter(|i| i.stage == 0 && i.keyword == "RUN")
        .map(|i| i.args.as_str())
        .collect();
    for cmd in [
        "rustup target add wasm32-wasip2",
        "cargo xtask build-plugins",
        "cargo build --release --locked -p segs",
    ] {
        assert!(runs.contains(&cmd), "builder stage misses `RUN {cmd}`");
    }

    // Everything the runtime copies from the builder exists after the same
    // commands here; the plugins land where the shipped config finds them.
    let mut plugins_in_image = Vec::new();
    let mut binary_in_image = None;
    for copy in all.iter().filter(|i| i.stage == 1 && i.keyword == "COPY") {
        let mut parts: Vec<&str> = copy.args.split_whitespace().collect();
        let dest = parts.pop().unwrap();
        match parts.first() {
            Some(&"--from=builder") => {
                for src in &parts[1..] {
                    let rel = src
                        .strip_prefix("/src/target/")
                        .unwrap_or_else(|| panic!("{src}: expected under /src/target"));
                    if rel == "release/segs" {
                        let bin = Path::new(env!("CARGO_BIN_EXE_segs"));
                        assert_eq!(bin.file_name().unwrap(), "segs");
                        binary_in_image = Some(dest.to_owned());
                        continue;
                    }
                    let local = target_dir().join(rel);
                    assert!(
                        local.exists(),
                        "{} is missing: run `cargo xtask build-plugins` (or `cargo xtask test`)",
                        local.display()
                    );
                    let name = Path::new(rel).file_name().unwrap().to_str().unwrap();
                    assert!(dest.ends_with('/'), "{dest}: a folder");
                    plugins_in_image.push(PathBuf::from(format!("{dest}{name}")));
                }
            }
            _ => {
                for src in &parts {
                    assert!(root().join(src).exists(), "COPY {src}: not in the repo");
                }
            }
        }
    }
    assert_eq!(binary_in_image.as_deref(), Some("/usr/local/bin/segs"));

    // The shipped pipeline.toml, where the image puts it, names exactly
    // those plugin files.
    let cfg_copy = all
        .iter()
        .find(|i| i.stage == 1 && i.keyword == "COPY" && i.args.starts_with("pipeline.toml "))
        .expect("the runtime stage copies pipeline.toml");
    let cfg_dest = Path::new(cfg_copy.args.split_whitespace().nth(1).unwrap());
    let text = std::fs::read_to_string(root().join("pipeline.toml")).unwrap();
    let cfg =
        PipelineConfig::parse(&text, cfg_dest, cfg_dest.parent().unwrap().to_owned()).unwrap();
    let mut named: Vec<PathBuf> = PLUGINS
        .iter()
        .map(|p| cfg.component_path(p).unwrap())
        .collect();
    named.sort();
    plugins_in_image.sort();
    assert_eq!(named, plugins_in_image);

    // SEGS_CONFIG names that file; the health check, EXPOSE and SEGS_LISTEN
    // agree on the port.
    let env = all
        .iter()
        .filter(|i| i.stage == 1 && i.keyword == "ENV")
        .map(|i| i.args.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        env.contains(&format!("SEGS_CONFIG={}", cfg_dest.display())),
        "{env}"
    );
    assert!(env.contains("SEGS_LISTEN=0.0.0.0:8080"), "{env}");
    let expose = all.iter().find(|i| i.keyword == "EXPOSE").unwrap();
    assert_eq!(expose.args, "8080");
    let health = all.iter().find(|i| i.keyword == "HEALTHCHECK").unwrap();
    assert!(
        health.args.contains("http://127.0.0.1:8080/healthz"),
        "{}",
        health.args
    );
    let user = all.iter().rfind(|i| i.keyword == "USER").unwrap();
    assert!(!user.args.starts_with("root") && !user.args.starts_with('0'));

    // ENTRYPOINT + CMD is a command line the real binary accepts.
    let entry = all.iter().find(|i| i.keyword == "ENTRYPOINT").unwrap();
    assert_eq!(json_array(&entry.args), ["segs"]);
    let cmd = all.iter().find(|i| i.keyword == "CMD").unwrap();
    cli_accepts(&json_array(&cmd.args));
    let out = Command::new(env!("CARGO_BIN_EXE_segs"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("segs "));
}

#[test]
fn the_compose_config_is_the_shipped_one_on_kafka_and_redis() {
    let compose_cfg = root().join("deploy/pipeline.compose.toml");
    let cfg = PipelineConfig::load(&compose_cfg).unwrap();
    assert_eq!(cfg.bus.kind, BusKind::Kafka);
    assert_eq!(cfg.dedupe.kind, DedupeKind::Redis);

    let table =
        |p: &Path| -> toml::Table { toml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let mut shipped = table(&root().join("pipeline.toml"));
    shipped["bus"]["kind"] = "kafka".into();
    shipped["dedupe"]["kind"] = "redis".into();
    assert!(
        table(&compose_cfg) == shipped,
        "deploy/pipeline.compose.toml must be pipeline.toml with bus.kind = \"kafka\" and \
         dedupe.kind = \"redis\", nothing else"
    );
}

#[test]
fn the_compose_file_wires_what_segs_reads() {
    let compose = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    for needed in [
        "KAFKA_BROKERS: kafka:9092",
        "REDIS_URL: redis://redis:6379",
        "DATABASE_URL: postgres://",
        "SEGS_CONFIG: /opt/segs/pipeline.compose.toml",
        "./deploy/pipeline.compose.toml:/opt/segs/pipeline.compose.toml:ro",
        "condition: service_healthy",
    ] {
        assert!(
            compose.contains(needed),
            "docker-compose.yml lacks {needed:?}"
        );
    }
    // The config is mounted in the folder that holds the image's plugins,
    // so its relative plugin paths resolve to them.
    let cfg = PipelineConfig::parse(
        &std::fs::read_to_string(root().join("deploy/pipeline.compose.toml")).unwrap(),
        Path::new("/opt/segs/pipeline.compose.toml"),
        PathBuf::from("/opt/segs"),
    )
    .unwrap();
    assert_eq!(
        cfg.component_path("anomaly").unwrap(),
        PathBuf::from("/opt/segs/target/plugins/anomaly.wasm")
    );
    // Every command it runs is one the real binary accepts.
    let mut commands = 0;
    for line in compose.lines() {
        if let Some(cmd) = line.trim().strip_prefix("command: [\"") {
            let args = json_array(&format!("[\"{cmd}"));
            if args[0] == "redis-server" {
                continue;
            }
            cli_accepts(&args);
            commands += 1;
        }
    }
    assert_eq!(commands, 2, "segs and the simulator");
}
