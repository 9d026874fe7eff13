//! The `reach` command: run the component, check a configuration file, or run an admin command
//! (`stats`, `export`, `purge`; their logic is in `reach::admin`).

use std::process::ExitCode;

use reach::config::{Config, LogFormat};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "usage:
  reach --config FILE [--log-format text|json]
                                run Reach with this configuration; SIGTERM or Ctrl-C stops it
                                gracefully (a second signal stops it at once)
  reach check-config FILE       check a configuration file and say what it would run
  reach stats --config FILE     users, sessions, held messages and queue lengths (from the
                                store, or from the running Reach's [metrics] endpoint)
  reach export --config FILE USER_JID
                                print everything Reach holds about a user, as JSON
  reach purge --config FILE USER_JID
                                delete a user and everything held about them, as XEP-0077
                                <remove/> does (only while Reach is stopped; the unsubscriptions
                                are sent when it next starts)
  reach migrate --config FILE --to URL [--to-password-file FILE]
                                copy everything the configured store holds into a new, empty
                                store (postgres://... or sled:///folder), then check the copy;
                                only while Reach is stopped
  reach dead-letters --config FILE [show ID | redrive ID | drop ID]
                                list the inputs set aside because handling them failed; print
                                one (it may hold message text), have it handled again when Reach
                                next starts, or delete it (only while Reach is stopped)
  reach --version
  reach --help

Logging: [log] level in the config file is a filter such as \"info,reach::xmpp=debug\"
(RUST_LOG overrides it); [log] format = \"json\" or --log-format json writes JSON lines.";

/// The command line, parsed.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Run {
        config: String,
        log_format: Option<LogFormat>,
    },
    CheckConfig(String),
    Stats(String),
    Export {
        config: String,
        jid: String,
    },
    Purge {
        config: String,
        jid: String,
    },
    DeadLetters {
        config: String,
        command: reach::admin::DeadLetterCommand,
    },
    Migrate {
        config: String,
        to: String,
        to_password_file: Option<String>,
    },
    Version,
    Help,
}

/// Reads the arguments (without the program name); `Err` carries what is wrong.
fn parse_args(args: &[String]) -> Result<Command, String> {
    let mut config = None;
    let mut to = None;
    let mut to_password_file = None;
    let mut log_format = None;
    let mut words = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                let value = rest.next().ok_or("--config needs a FILE")?;
                if config.replace(value.clone()).is_some() {
                    return Err("--config is given twice".to_owned());
                }
            }
            "--to" => {
                let value = rest.next().ok_or("--to needs a URL")?;
                if to.replace(value.clone()).is_some() {
                    return Err("--to is given twice".to_owned());
                }
            }
            "--to-password-file" => {
                let value = rest.next().ok_or("--to-password-file needs a FILE")?;
                to_password_file = Some(value.clone());
            }
            "--log-format" => {
                let value = rest.next().ok_or("--log-format needs text or json")?;
                log_format = Some(value.parse::<LogFormat>()?);
            }
            "--version" | "-V" => return Ok(Command::Version),
            "--help" | "-h" => return Ok(Command::Help),
            other if other.starts_with('-') => return Err(format!("unknown option {other}")),
            word => words.push(word.to_owned()),
        }
    }
    let need_config = |what: &str| config.clone().ok_or(format!("{what} needs --config FILE"));
    match words
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => Ok(Command::Run {
            config: need_config("reach")?,
            log_format,
        }),
        ["check-config", file] if config.is_none() => Ok(Command::CheckConfig((*file).to_owned())),
        ["check-config"] => Ok(Command::CheckConfig(need_config("check-config")?)),
        ["stats"] => Ok(Command::Stats(need_config("stats")?)),
        ["export", jid] => Ok(Command::Export {
            config: need_config("export")?,
            jid: (*jid).to_owned(),
        }),
        ["purge", jid] => Ok(Command::Purge {
            config: need_config("purge")?,
            jid: (*jid).to_owned(),
        }),
        ["export" | "purge"] => Err(format!("{} needs a USER_JID", words[0])),
        ["migrate"] => Ok(Command::Migrate {
            config: need_config("migrate")?,
            to: to
                .clone()
                .ok_or("migrate needs --to URL (where to copy the store)")?,
            to_password_file: to_password_file.clone(),
        }),
        ["dead-letters", rest @ ..] => {
            use reach::admin::DeadLetterCommand as D;
            let id = |s: &str| {
                s.parse::<u64>()
                    .map_err(|_| format!("'{s}' is not a dead letter id (a number)"))
            };
            let command = match rest {
                [] | ["list"] => D::List,
                ["show", n] => D::Show(id(n)?),
                ["redrive", n] => D::Redrive(id(n)?),
                ["drop", n] => D::Drop(id(n)?),
                _ => return Err("dead-letters takes: show ID, redrive ID or drop ID".to_owned()),
            };
            Ok(Command::DeadLetters {
                config: need_config("dead-letters")?,
                command,
            })
        }
        _ => Err(format!("unexpected arguments: {}", words.join(" "))),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse_args(&args) {
        Ok(command) => command,
        Err(why) => {
            eprintln!("reach: {why}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Run { config, log_format } => run(&config, log_format),
        Command::CheckConfig(path) => check_config(&path),
        Command::Migrate {
            config,
            to,
            to_password_file,
        } => admin(&config, |config| {
            let password = match &to_password_file {
                Some(file) => Some(
                    std::fs::read_to_string(file)
                        .map_err(|e| anyhow::anyhow!("cannot read {file}: {e}"))?
                        .trim_end_matches(['\r', '\n'])
                        .to_owned(),
                ),
                None => None,
            };
            let mut last = String::new();
            let migrated = reach::admin::migrate(config, &to, password, |tree, n| {
                if tree != last {
                    eprintln!("copying {tree}");
                    last = tree.to_owned();
                }
                if n % 100_000 == 0 {
                    eprintln!("  {n} records");
                }
            })?;
            for (tree, n) in &migrated.copied.trees {
                if *n > 0 {
                    println!("{tree:28} {n}");
                }
            }
            println!(
                "{} records copied into {}, every tree checked. Point [store] url at it and \
                 start Reach.",
                migrated.copied.total(),
                migrated.to
            );
            Ok(())
        }),
        Command::Stats(config) => admin(&config, |config| {
            let (counts, source) = block_on(reach::admin::stats(config))??;
            match source {
                reach::admin::CountsSource::Store => println!("{counts}"),
                reach::admin::CountsSource::Running(listen) => {
                    println!("{counts}\n(from the running Reach at http://{listen}/stats)")
                }
            }
            Ok(())
        }),
        Command::Export { config, jid } => admin(&config, |config| {
            let jid = reach::admin::user_jid(&jid)?;
            let store = reach::admin::open_store(
                config,
                "Stop Reach to export (the store can be read by one process at a time).",
            )?;
            let export = reach::admin::export(&store, &jid)?;
            if !export.registered {
                eprintln!("{jid} is not registered; showing whatever is still held about it");
            }
            println!("{}", serde_json::to_string_pretty(&export)?);
            Ok(())
        }),
        Command::Purge { config, jid } => admin(&config, |config| {
            let jid = reach::admin::user_jid(&jid)?;
            let store = reach::admin::open_store(
                config,
                "Stop Reach first, or let the user send XEP-0077 <remove/> to the service.",
            )?;
            let purged = reach::admin::purge(config, &store, &jid)?;
            println!(
                "{} deleted; {} unsubscription stanzas are queued and go out when Reach next \
                 connects to the XMPP server",
                purged.jid, purged.queued_stanzas
            );
            Ok(())
        }),
        Command::DeadLetters { config, command } => admin(&config, |config| {
            let store = reach::admin::open_store(
                config,
                "Stop Reach first (the store can be used by one process at a time).",
            )?;
            let lines = reach::admin::dead_letters(&store, command)?;
            if lines.is_empty() {
                eprintln!("no dead letters");
            }
            for line in lines {
                println!("{line}");
            }
            Ok(())
        }),
        Command::Version => {
            println!("reach {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Help => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
    }
}

/// `reach check-config`: the summary, and for a PostgreSQL store whether it can be reached.
fn check_config(path: &str) -> ExitCode {
    let config = match reach::config::load(std::path::Path::new(path)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", config.summary());
    if let reach::store::Location::Postgres { url, password } = config.store.location() {
        match reach::store::postgres::check(url, password.as_deref()) {
            Ok(found) => println!("The database answers: {found}."),
            Err(e) => {
                eprintln!("The database cannot be used: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

/// Loads the config and runs an admin command; errors go to stderr with exit status 1.
fn admin(path: &str, command: impl FnOnce(&Config) -> anyhow::Result<()>) -> ExitCode {
    let config = match reach::config::load(std::path::Path::new(path)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match command(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reach: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one future on a small runtime (for the admin commands' HTTP call).
fn block_on<F: std::future::Future>(future: F) -> anyhow::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(future))
}

fn run(path: &str, log_format: Option<LogFormat>) -> ExitCode {
    let config = match reach::config::load(std::path::Path::new(path)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    match log_format.unwrap_or(config.log.format) {
        // Colours only for a terminal, not in a file or the journal.
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_current_span(false)
            .with_env_filter(filter)
            .init(),
    }
    // A panic's message can quote the data it choked on (a slice of a message body, say): it
    // goes to the log at debug only; the error line says where. The item is then set aside by
    // the runtime's guard (see docs/limits.md).
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(%location, "a bug: Reach panicked");
        let message = reach::runtime::panic_message(info.payload());
        tracing::debug!(%location, message, "the panic's message");
    }));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Installed before anything starts, so that an early SIGTERM also stops gracefully.
        let mut signals = StopSignals::install();
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            signals.wait().await;
            tracing::info!(
                "stop signal received; stopping gracefully (signal again to stop at once)"
            );
            let _ = stop_tx.send(true);
            signals.wait().await;
            tracing::warn!("second stop signal: stopping at once");
            std::process::exit(1);
        });
        reach::runtime::run(config, stop_rx).await
    });
    // Tasks left behind (a connection that ignored the shutdown) must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("reach: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM and SIGINT (Ctrl-C), both of which ask Reach to stop.
struct StopSignals {
    term: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn install() -> StopSignals {
        use tokio::signal::unix::{signal, SignalKind};
        StopSignals {
            term: signal(SignalKind::terminate()).ok(),
            interrupt: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Resolves at the next SIGTERM or SIGINT.
    async fn wait(&mut self) {
        async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.term) => {}
            _ = next(&mut self.interrupt) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Command, String> {
        let args: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        parse_args(&args)
    }

    #[test]
    fn commands_parse() {
        assert_eq!(
            parse("--config r.toml"),
            Ok(Command::Run {
                config: "r.toml".into(),
                log_format: None
            })
        );
        assert_eq!(
            parse("-c r.toml --log-format json"),
            Ok(Command::Run {
                config: "r.toml".into(),
                log_format: Some(LogFormat::Json)
            })
        );
        assert_eq!(
            parse("check-config r.toml"),
            Ok(Command::CheckConfig("r.toml".into()))
        );
        assert_eq!(
            parse("stats --config r.toml"),
            Ok(Command::Stats("r.toml".into()))
        );
        assert_eq!(
            parse("export --config r.toml alice@example.org"),
            Ok(Command::Export {
                config: "r.toml".into(),
                jid: "alice@example.org".into()
            })
        );
        assert_eq!(
            parse("purge alice@example.org --config r.toml"),
            Ok(Command::Purge {
                config: "r.toml".into(),
                jid: "alice@example.org".into()
            })
        );
        assert_eq!(
            parse("migrate --config r.toml --to postgres://reach@db/reach"),
            Ok(Command::Migrate {
                config: "r.toml".into(),
                to: "postgres://reach@db/reach".into(),
                to_password_file: None,
            })
        );
        assert_eq!(parse("--help"), Ok(Command::Help));
        assert_eq!(parse("--version"), Ok(Command::Version));
    }

    #[test]
    fn mistakes_are_named() {
        assert!(parse("").unwrap_err().contains("--config"));
        assert!(parse("stats").unwrap_err().contains("--config"));
        assert!(parse("purge --config r.toml")
            .unwrap_err()
            .contains("USER_JID"));
        assert!(parse("--config r.toml --log-format xml")
            .unwrap_err()
            .contains("text"));
        assert!(parse("--frob").unwrap_err().contains("--frob"));
        assert!(parse("migrate --config r.toml")
            .unwrap_err()
            .contains("--to"));
        assert!(parse("frobnicate").unwrap_err().contains("frobnicate"));
    }
}
