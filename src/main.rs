//! The `pgfleet` command: run the pooler, check a config, hash a password.

use clap::{Parser, Subcommand};
use pgfleet::config::{Config, LogFormat};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::signal::unix::SignalKind;

#[derive(Parser)]
#[command(name = "pgfleet", version, about = "PostgreSQL connection pooler and read/write router")]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, global = true, default_value = "config/pgfleet.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pooler (the default).
    Run,
    /// Validate the configuration and exit (status 1 and every problem if invalid).
    Check,
    /// Print a SCRAM-SHA-256 verifier for a password read from stdin (or --password).
    HashPassword {
        #[arg(long)]
        password: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::HashPassword { password } => {
            let pw = match password {
                Some(p) => p,
                None => {
                    let mut line = String::new();
                    if std::io::stdin().lock().read_line(&mut line).is_err() {
                        eprintln!("could not read a password from stdin");
                        return ExitCode::FAILURE;
                    }
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            println!("{}", postgres_protocol::password::scram_sha_256(pw.as_bytes()));
            ExitCode::SUCCESS
        }
        Command::Check => match Config::load(&cli.config) {
            Ok(_) => {
                println!("{}: configuration is valid", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run => match Config::load(&cli.config) {
            Ok(cfg) => run(cfg, cli.config.clone()),
            Err(e) => {
                eprint!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn init_logging(cfg: &Config) {
    use tracing_subscriber::{filter::LevelFilter, prelude::*, EnvFilter};
    let directives = std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| cfg.log.level.clone());
    // A plain level ("info", "warn", ...) filters by level alone: an
    // `EnvFilter` takes a lock on every span enter and exit.
    let (level, env) = match directives.trim().parse::<LevelFilter>() {
        Ok(level) => (Some(level), None),
        Err(_) => (None, Some(EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new(&cfg.log.level)))),
    };
    let fmt = match cfg.log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer().json().boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().boxed(),
    };
    tracing_subscriber::registry().with(fmt).with(level).with(env).init();
}

fn run(cfg: Config, path: PathBuf) -> ExitCode {
    init_logging(&cfg);
    let mut builder = match cfg.runtime.workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Before start: a SIGHUP right after launch (`systemctl reload`)
        // must not meet the default action, which ends the process.
        let signals = Signals::install();
        let listener = match pgfleet::app::bind_reuseport(&cfg.listen.addr) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(addr = %cfg.listen.addr, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        let running = match pgfleet::app::start(cfg, listener) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        *running.app.config_path.lock().unwrap() = Some(path);
        tracing::info!(addr = %running.addr, metrics = ?running.metrics_addr, "pgfleet listening");
        match wait_for_stop(&running, signals).await {
            Stop::Fast => {
                tracing::info!("SIGINT: stopping now");
                running.app.begin_shutdown();
            }
            Stop::Drain => {
                // As configured now: a reload may have changed it.
                let grace = running.app.config().timeouts.shutdown_grace.0;
                tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down: draining clients");
                tokio::select! {
                    _ = running.shutdown(grace) => {}
                    _ = signal(SignalKind::interrupt()) => tracing::warn!("SIGINT while draining: exiting now"),
                }
            }
        }
        tracing::info!(clients_left = running.app.client_count(), "stopped");
        ExitCode::SUCCESS
    })
}

enum Stop {
    /// SIGTERM or admin SHUTDOWN: finish in-flight transactions first.
    Drain,
    /// SIGINT: exit now.
    Fast,
}

async fn signal(kind: tokio::signal::unix::SignalKind) {
    match tokio::signal::unix::signal(kind) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Signals {
        let on = |kind, name| tokio::signal::unix::signal(kind).unwrap_or_else(|e| panic!("install {name} handler: {e}"));
        Signals {
            term: on(SignalKind::terminate(), "SIGTERM"),
            int: on(SignalKind::interrupt(), "SIGINT"),
            hup: on(SignalKind::hangup(), "SIGHUP"),
        }
    }
}

/// Waits for SIGTERM / SIGINT / admin SHUTDOWN; SIGHUP reloads meanwhile.
async fn wait_for_stop(running: &pgfleet::app::Running, signals: Signals) -> Stop {
    let Signals { mut term, mut int, mut hup } = signals;
    let mut shutdown = running.app.shutdown_signal();
    loop {
        tokio::select! {
            _ = term.recv() => return Stop::Drain,
            _ = int.recv() => return Stop::Fast,
            _ = shutdown.changed() => return Stop::Drain,
            _ = hup.recv() => {
                if let Err(e) = running.app.reload() {
                    tracing::error!(error = %e, "SIGHUP: reload failed; the old configuration stays in force");
                }
            }
        }
    }
}
