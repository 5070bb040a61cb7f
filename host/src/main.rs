//! The `segs` binary: the command line, logging, and the live status line.
//! Everything else lives in the library; this is the only place `anyhow` is
//! used.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};

use segs::app::App;
use segs::config::PipelineConfig;
use segs::simulator::{self, Mode, SendTarget, SimConfig, SimStats};

/// mimalloc: glibc's allocator cost about 5 % of the CPU of a sustained
/// load (small allocations freed on other threads, large request bodies
/// mapped and zeroed anew).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "segs", version, about = "Smart Energy Grid stream host")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline: HTTP ingest, windows, rule plugins, store, read API.
    /// With no arguments: the embedded default with the built-in simulator.
    Run(RunArgs),
    /// Send simulated smart-meter telemetry to a segs server.
    Simulate(SimulateArgs),
    /// Bill a period: per meter, each 15-minute window's energy times the
    /// price in force, into invoices and line items. Billing a period again
    /// replaces its pending invoices, never adds a second one.
    Bill(BillArgs),
    /// List, swap or roll back the rule plugins of a running segs (a
    /// client of its admin API).
    Plugins(PluginsArgs),
    /// Run the anomaly batches parked on `plugin_dead_letter` (plugins with
    /// `on_fault = "dead_letter"`) through the serving version of a running
    /// segs, and raise their alerts (a client of its admin API).
    ReplayDeadLetters(ReplayArgs),
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// Base URL of the segs server.
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "SEGS_URL")]
    url: String,
    /// The admin API's bearer token.
    #[arg(long, env = "SEGS_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
    /// Only say how many batches are parked.
    #[arg(long)]
    count: bool,
}

#[derive(clap::Args)]
struct BillArgs {
    /// The pipeline file (its store and regions' base prices).
    #[arg(long, default_value = "pipeline.toml", env = "SEGS_CONFIG")]
    config: PathBuf,
    /// Start of the period (RFC 3339, e.g. 2025-11-01T00:00:00Z), inclusive.
    #[arg(long, value_parser = parse_instant)]
    from: i64,
    /// End of the period (RFC 3339), exclusive.
    #[arg(long, value_parser = parse_instant)]
    to: i64,
}

/// An RFC 3339 instant as epoch ms, for `--from` / `--to`.
fn parse_instant(s: &str) -> Result<i64, String> {
    segs::time::parse_rfc3339_ms(s)
        .ok_or_else(|| format!("{s:?} is not an RFC 3339 instant (e.g. 2025-11-01T00:00:00Z)"))
}

#[derive(clap::Args)]
struct PluginsArgs {
    /// Base URL of the segs server.
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "SEGS_URL")]
    url: String,
    /// The admin API's bearer token.
    #[arg(long, env = "SEGS_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
    #[command(subcommand)]
    action: PluginsAction,
}

#[derive(Subcommand)]
enum PluginsAction {
    /// Every plugin: the serving version and the earlier ones, with calls,
    /// faults and mean time per record.
    List {
        /// Print the admin API's JSON as it is.
        #[arg(long)]
        json: bool,
    },
    /// Swap in a new component (and/or config) for plugin NAME. It is
    /// checked first (compile, world, instantiate, configure, sample); a
    /// refusal names the step and changes nothing.
    Push {
        /// anomaly, overload, tariff or aggregate.
        name: String,
        /// The component (`.wasm`); without it, the serving component gets
        /// the new --config.
        file: Option<PathBuf>,
        /// The plugin's config as a JSON object (default: the serving one).
        #[arg(long)]
        config: Option<String>,
    },
    /// Go back to the version before the serving one.
    Rollback {
        /// anomaly, overload, tariff or aggregate.
        name: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The pipeline file.
    #[arg(long, default_value = "pipeline.toml", env = "SEGS_CONFIG")]
    config: PathBuf,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080", env = "SEGS_LISTEN")]
    listen: SocketAddr,
    /// Serve only: do not start the built-in simulator.
    #[arg(long)]
    no_simulator: bool,
    /// What this process runs: all, ingest (HTTP ingest and the read API)
    /// or process (the stages and the read API). Overrides `role` in the
    /// config and SEGS_ROLE.
    #[arg(long)]
    role: Option<segs::config::Role>,
    #[command(flatten)]
    sim: SimArgs,
    /// Simulated seconds per real second for the built-in simulator
    /// (1 = real time, starting now). Faster runs start an hour back and go
    /// on in real time once they catch up with the clock: readings are
    /// never dated in the future.
    #[arg(long, default_value_t = 10.0)]
    speedup: f64,
}

#[derive(clap::Args)]
struct SimArgs {
    /// Virtual meters.
    #[arg(long, default_value_t = 200)]
    meters: u32,
    /// Seconds of simulated time between two readings of a meter.
    #[arg(long, default_value_t = 10)]
    interval: u32,
    /// Simulation mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Normal)]
    mode: ModeArg,
    /// Seed of the generated stream (same seed, same readings).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// No scripted spike / outage / regional surge.
    #[arg(long)]
    no_phases: bool,
    /// Share of readings sent twice, to exercise dedupe (0..1).
    #[arg(long, default_value_t = 0.01)]
    duplicates: f64,
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// Base URL of the segs server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[command(flatten)]
    sim: SimArgs,
    /// Readings per second (default: as fast as the server answers, or real
    /// time with --realtime).
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<u64>,
    /// Stop after this many ticks (one reading per meter each).
    #[arg(long)]
    ticks: Option<u64>,
    /// Readings per request.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Send tick k at k × interval after the start (live, starting now),
    /// not as fast as possible. Without it the stream starts an hour back
    /// and goes on in real time once it catches up with the clock: readings
    /// are never dated in the future.
    #[arg(long)]
    realtime: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Normal,
    Peak,
    Outage,
}

impl SimArgs {
    /// The simulator config; `live`: simulated time starts now and runs
    /// with the clock, else it starts an hour back
    /// ([`simulator::demo_start_ms`]) so an accelerated run has an hour of
    /// simulated grid before it catches up with the clock (the sender never
    /// sends a reading dated in the future).
    fn config(&self, live: bool) -> SimConfig {
        let mut cfg = SimConfig {
            meters: self.meters,
            interval_s: self.interval,
            mode: match self.mode {
                ModeArg::Normal => Mode::Normal,
                ModeArg::Peak => Mode::Peak,
                ModeArg::Outage => Mode::Outage,
            },
            seed: self.seed,
            duplicate_ratio: self.duplicates,
            ..SimConfig::default()
        };
        let now = segs::time::now_ms();
        cfg.start_ms = if live {
            segs::time::window_start(now, i64::from(self.interval) * 1000)
        } else {
            simulator::demo_start_ms(now)
        };
        if !self.no_phases {
            cfg.phases = simulator::default_phases(cfg.meters, &cfg.regions, cfg.interval_s);
        }
        cfg
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEGS_LOG")
                .unwrap_or_else(|_| "warn,segs=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Simulate(args) => simulate(args).await,
            Command::Bill(args) => bill(args).await,
            Command::Plugins(args) => plugins(args).await,
            Command::ReplayDeadLetters(args) => replay_dead_letters(args).await,
        }
    })
}

async fn bill(args: BillArgs) -> Result<()> {
    let config = PipelineConfig::load(&args.config)?;
    let store = segs::store::open(&config.store.url).await?;
    let invoices = segs::billing::run(
        &*store,
        &|r| config.region(r).base_price_per_kwh,
        args.from,
        args.to,
    )
    .await?;
    let (kwh, amount) = invoices.iter().fold((0.0, 0.0), |(k, a), i| {
        (k + i.total_kwh, a + i.total_amount)
    });
    for i in &invoices {
        println!(
            "{}  {}  {:>10.3} kWh  {:>10.2} {}  {} line(s)  {}",
            i.invoice_id,
            i.user_id.as_deref().unwrap_or("-"),
            i.total_kwh,
            i.total_amount,
            i.currency,
            i.line_items.len(),
            i.status
        );
    }
    println!(
        "{} invoice(s), {kwh:.3} kWh, {amount:.2} {}",
        invoices.len(),
        segs::billing::CURRENCY
    );
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    let mut config = PipelineConfig::load(&args.config)?;
    config.apply_env()?;
    if let Some(role) = args.role {
        config.role = role;
    }
    let store_url = segs::store::redact_url(&config.store.url);
    let app = App::start(config, args.listen)
        .await
        .context("segs could not start")?;
    let base = format!("http://{}", app.addr);
    println!("segs is running: HTTP API on {base}, store {store_url}");
    for p in &app.plugins {
        println!(
            "  plugin {:<9} v{} {} (sha256 {})",
            p.name,
            p.version,
            p.source,
            &p.sha256[..12]
        );
    }
    println!(
        "try:\n  curl -s {base}/alerts | jq\n  curl -s {base}/tariffs/current | jq\n  \
         curl -s '{base}/aggregates/regional?limit=8' | jq\n  curl -s {base}/healthz | jq\n  \
         sqlite3 segs.db 'select type, severity, meter_id, region, message from alerts'"
    );

    let sim_stats = SimStats::new();
    let sim = if args.no_simulator {
        None
    } else {
        let realtime = args.speedup == 1.0;
        let cfg = args.sim.config(realtime);
        let per_second = f64::from(cfg.meters) / f64::from(cfg.interval_s) * args.speedup.max(0.01);
        println!(
            "simulator: {} meters every {} s (simulated), {}, seed {}{}",
            cfg.meters,
            cfg.interval_s,
            if realtime {
                "real time".to_owned()
            } else {
                format!(
                    "{:.0}x real time from {} until it reaches the clock",
                    args.speedup,
                    segs::time::format_rfc3339_ms(cfg.start_ms)
                )
            },
            cfg.seed,
            if cfg.phases.is_empty() {
                String::new()
            } else {
                ", with a scripted spike, outage and regional surge".to_owned()
            }
        );
        let target = SendTarget {
            url: base.clone(),
            batch_size: 1000,
            rate: Some(per_second),
            realtime,
            ..SendTarget::default()
        };
        let stats = sim_stats.clone();
        Some(tokio::spawn(async move {
            simulator::run(cfg, target, stats).await
        }))
    };

    let status = tokio::spawn(status_line(app.ctx.clone(), sim_stats.clone()));
    shutdown_signal().await?;
    println!("\nstopping: closing open windows and storing them…");
    sim_stats.request_stop();
    if let Some(sim) = sim {
        let _ = sim.await;
    }
    status.abort();
    let unfinished = app.shutdown().await;
    if unfinished.is_empty() {
        println!("stopped.");
    } else {
        for u in &unfinished {
            println!(
                "  {} did not finish{}{}",
                u.stage,
                u.retrying
                    .map(|r| format!(": retrying `{r}` ({} attempts)", u.attempts))
                    .unwrap_or_default(),
                u.last_error
                    .as_deref()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            );
        }
        println!("stopped after shutdown.grace_s (the log says what becomes of what they held).");
    }
    Ok(())
}

/// Ctrl-C, or SIGTERM (what `docker stop` and systemd send).
async fn shutdown_signal() -> Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

/// Prints one status line every two seconds.
async fn status_line(ctx: segs::pipeline::Context, sim: Arc<SimStats>) {
    let mut last = (Instant::now(), 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let m = &ctx.metrics;
        let accepted = m.accepted.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (accepted - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, accepted);
        let tariffs = match ctx.store.current_tariffs().await {
            Ok(t) => t
                .iter()
                .map(|t| format!("{} {:.2}", t.region, t.price_per_kwh))
                .collect::<Vec<_>>()
                .join(", "),
            Err(_) => "?".into(),
        };
        println!(
            "{:>7.0} readings/s | accepted {} dup {} | windows {} | alerts {} (deduped {}) | tariffs: {} | sim sent {}",
            rate,
            accepted,
            m.duplicates.load(Ordering::Relaxed),
            m.windows_closed.load(Ordering::Relaxed),
            m.alerts_stored.load(Ordering::Relaxed),
            m.alerts_deduplicated.load(Ordering::Relaxed),
            if tariffs.is_empty() {
                "base".to_owned()
            } else {
                tariffs
            },
            sim.sent.load(Ordering::Relaxed),
        );
    }
}

async fn simulate(args: SimulateArgs) -> Result<()> {
    let cfg = args.sim.config(args.realtime);
    let target = SendTarget {
        url: args.url,
        batch_size: args.batch_size,
        rate: args.rate,
        duration: args.duration.map(Duration::from_secs),
        ticks: args.ticks,
        realtime: args.realtime,
    };
    let stats = SimStats::new();
    let stopper = stats.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stopper.request_stop();
        }
    });
    let summary = simulator::run(cfg, target, stats).await?;
    println!("{summary:?}");
    Ok(())
}

/// Sends one admin API request with the bearer token; its JSON answer, or
/// an error carrying the answer's message when it is not a success.
async fn admin_call(
    request: reqwest::RequestBuilder,
    token: &str,
    base: &str,
) -> Result<serde_json::Value> {
    let response = request
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("segs at {base} did not answer"))?;
    let status = response.status();
    let body = response.bytes().await.context("reading the answer")?;
    let json: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::json!({ "message": String::from_utf8_lossy(&body) }));
    if !status.is_success() {
        anyhow::bail!(
            "{status}: {}",
            json["message"].as_str().unwrap_or(&json.to_string())
        );
    }
    Ok(json)
}

/// `segs plugins …`: one admin API call, its answer printed.
async fn plugins(args: PluginsArgs) -> Result<()> {
    let client = reqwest::Client::new();
    let base = args.url.trim_end_matches('/');
    let request = match &args.action {
        PluginsAction::List { .. } => client.get(format!("{base}/admin/plugins")),
        PluginsAction::Push { name, file, config } => {
            let url = format!("{base}/admin/plugins/{name}");
            match (file, config) {
                (Some(file), config) => {
                    let bytes = std::fs::read(file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    let mut url = reqwest::Url::parse(&url).context("--url")?;
                    if let Some(c) = config {
                        url.query_pairs_mut().append_pair("config", c);
                    }
                    client
                        .put(url)
                        .header("content-type", "application/wasm")
                        .body(bytes)
                }
                (None, Some(c)) => {
                    let config: serde_json::Value =
                        serde_json::from_str(c).context("--config is not JSON")?;
                    client
                        .put(url)
                        .header("content-type", "application/json")
                        .body(serde_json::to_vec(
                            &serde_json::json!({ "config": config }),
                        )?)
                }
                (None, None) => anyhow::bail!("push needs a component FILE, a --config, or both"),
            }
        }
        PluginsAction::Rollback { name } => {
            client.post(format!("{base}/admin/plugins/{name}/rollback"))
        }
    };
    let json = admin_call(request, &args.token, base).await?;
    match &args.action {
        PluginsAction::List { json: true } => println!("{}", serde_json::to_string_pretty(&json)?),
        PluginsAction::List { json: false } => {
            let listings: Vec<segs::plugins::SlotListing> =
                serde_json::from_value(json["plugins"].clone())
                    .context("the answer is not a plugin listing")?;
            println!(
                "{:<10} {:>7} {:<14} {:<24} {:>9} {:>7} {:>10}  source",
                "plugin", "version", "sha256", "loaded at", "calls", "faults", "ns/record"
            );
            for l in listings {
                for (i, v) in std::iter::once(&l.serving).chain(&l.previous).enumerate() {
                    println!(
                        "{:<10} {:>7} {:<14} {:<24} {:>9} {:>7} {:>10}  {}{}",
                        if i == 0 { v.name.as_str() } else { "" },
                        format!("v{}", v.version),
                        &v.sha256[..v.sha256.len().min(12)],
                        v.loaded_at,
                        v.calls,
                        v.faults,
                        v.mean_ns_per_record
                            .map_or("-".to_owned(), |ns| format!("{ns:.0}")),
                        v.source,
                        if i == 0 { " (serving)" } else { "" },
                    );
                }
            }
        }
        PluginsAction::Push { .. } | PluginsAction::Rollback { .. } => {
            let v = &json["plugin"];
            println!(
                "{} v{} (sha256 {}) is serving",
                v["name"].as_str().unwrap_or("?"),
                v["version"],
                v["sha256"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}

/// `segs replay-dead-letters`: one admin API call, its answer printed.
async fn replay_dead_letters(args: ReplayArgs) -> Result<()> {
    let client = reqwest::Client::new();
    let base = args.url.trim_end_matches('/');
    let request = if args.count {
        client.get(format!("{base}/admin/dead-letters"))
    } else {
        client.post(format!("{base}/admin/dead-letters/replay"))
    };
    let json = admin_call(request, &args.token, base).await?;
    if args.count {
        println!("{} parked", json["parked"]);
        return Ok(());
    }
    println!(
        "{} replayed ({} alerts raised), {} unreadable skipped, {} still parked",
        json["replayed"], json["alerts"], json["unreadable"], json["parked"]
    );
    if let Some(why) = json["stopped"].as_str() {
        anyhow::bail!("the replay stopped: {why}");
    }
    Ok(())
}
