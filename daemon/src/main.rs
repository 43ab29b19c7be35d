//! `convoyd`: the Convoy daemon, as coordinator or as target.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use convoy_daemon::coordinator::api;
use convoy_daemon::coordinator::operators::{Operators, Refusals};
use convoy_daemon::coordinator::{self, CoordinatorConfig};
use convoy_daemon::durable::write_atomically;
use convoy_daemon::fleet_key;
use convoy_daemon::net::client;
use convoy_daemon::net::serve::Chunks;
use convoy_daemon::net::{self, NetConfig, NetEvent, Security};
use convoy_daemon::pipeline::Pipelines;
use convoy_daemon::protocol::{Labels, MAX_LABELS, MAX_LABEL_BYTES};
use convoy_daemon::store::RocksStore;
use convoy_daemon::target::deliver::{self, Releases};
use convoy_daemon::target::health::{self, Load};
use convoy_daemon::target::{self, TargetConfig};
use convoy_daemon::units::parse_bytes;
use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::info;

/// The Convoy daemon: one coordinator (origin and tracker) and a target on
/// every server of the fleet.
///
/// Settings come from flags, then `CONVOY_*` environment variables, then
/// the TOML file given by --config (keys as the long flags, with `_` for
/// `-`; labels as a table), then defaults.
///
/// Once listening, convoyd prints one JSON line on stdout:
/// {"role", "peer_id", "addrs"}, each address ending in /p2p/PEER_ID as
/// targets and `convoy --coordinator` take it. Logs go to stderr.
///
/// Example:
///   convoyd fleet-key /etc/convoy/fleet.key
///   convoyd coordinator --data-dir /var/lib/convoy --fleet-key-file /etc/convoy/fleet.key
///   convoyd target --coordinator /ip4/10.0.0.1/tcp/7400/p2p/12D3Koo... \
///       --fleet-key-file /etc/convoy/fleet.key --label dc=eu1 --label zone=a
#[derive(Parser)]
#[command(name = "convoyd", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator: holds published releases, tracks the targets,
    /// orders stagings and serves chunks as the origin
    Coordinator {
        #[command(flatten)]
        common: Common,
        /// Push mode: how many targets the origin sends to at once (K)
        #[arg(long, env = "CONVOY_PUSH_PARALLEL", value_name = "K")]
        push_parallel: Option<usize>,
        /// Swarm mode: how many peers each target is told about
        #[arg(long, env = "CONVOY_SWARM_DEGREE", value_name = "N")]
        swarm_degree: Option<usize>,
        /// How often targets report, in milliseconds
        #[arg(long, env = "CONVOY_HEARTBEAT_MS", value_name = "MS")]
        heartbeat_ms: Option<u64>,
        /// Reports per second the whole fleet may send: a fleet larger than
        /// this at --heartbeat-ms is asked to report less often
        /// [default: 1000]
        #[arg(long, env = "CONVOY_MAX_REPORTS_PER_SECOND", value_name = "N")]
        max_reports_per_second: Option<u64>,
        /// Where the operator API (HTTP, JSON, /metrics) listens
        /// [default: 127.0.0.1:7410]
        #[arg(long, env = "CONVOY_API_LISTEN", value_name = "HOST:PORT")]
        api_listen: Option<String>,
        /// File holding the API's bearer token; created with a random token
        /// (mode 0600) if missing [default: DATA_DIR/api-token]
        #[arg(long, env = "CONVOY_API_TOKEN_FILE", value_name = "FILE")]
        api_token_file: Option<PathBuf>,
        /// The operators allowed to publish, upload, stage and list the
        /// fleet: `NAME PEER_ID` a line, the ids `convoy keygen` prints;
        /// read at start. Without this flag, DATA_DIR/operators is used,
        /// created if missing naming a new key, DATA_DIR/operator.key, as
        /// `local` [default: DATA_DIR/operators]
        #[arg(long, env = "CONVOY_OPERATORS", value_name = "FILE")]
        operators: Option<PathBuf>,
        /// Releases the origin's store keeps per app (newest first), besides
        /// every release of a staging or roll-out it remembers [default: 10]
        #[arg(long, env = "CONVOY_RETAIN", value_name = "N")]
        retain: Option<usize>,
        /// After a publish, make binary deltas into the new release from
        /// this many of the app's older releases (and from those the fleet
        /// runs), in the background; 0: none [default: 2]
        #[arg(long, env = "CONVOY_DELTA_BASES", value_name = "N")]
        delta_bases: Option<usize>,
        /// TOML file defining environments and apps with their pipelines
        /// and roll-out defaults (see the README) [default: none: nothing
        /// can be deployed]
        #[arg(long, env = "CONVOY_PIPELINES", value_name = "FILE")]
        pipelines: Option<PathBuf>,
    },
    /// Run a target: registers with the coordinator, stages the releases it
    /// orders and serves chunks to its peers
    Target {
        #[command(flatten)]
        common: Common,
        /// The coordinator's address, ending in /p2p/PEER_ID (as the
        /// coordinator prints it); manifests must be signed by that peer's key
        #[arg(long, env = "CONVOY_COORDINATOR", value_name = "ADDR")]
        coordinator: Option<String>,
        /// Where the health endpoint for load balancers listens
        /// (`GET /health`: 200 in load, 503 drained) [default: 0.0.0.0:7480]
        #[arg(long, env = "CONVOY_HEALTH_LISTEN", value_name = "HOST:PORT")]
        health_listen: Option<String>,
        /// Releases kept per app; the active and the previous one are
        /// never removed [default: 5]
        #[arg(long, env = "CONVOY_RETAIN", value_name = "N")]
        retain: Option<usize>,
        /// How long a hook may run before it is killed (30s, 2m, ...)
        /// [default: 60s]
        #[arg(long, env = "CONVOY_HOOK_TIMEOUT", value_name = "DURATION")]
        hook_timeout: Option<String>,
        /// A variable of convoyd's environment that hooks also get; repeat.
        /// Hooks otherwise see only PATH, HOME, LANG and their CONVOY_*
        /// variables
        #[arg(
            long = "hook-env",
            env = "CONVOY_HOOK_ENV",
            value_delimiter = ',',
            value_name = "NAME"
        )]
        hook_env: Vec<String>,
        /// For testing only: serve every chunk with a byte flipped, to see
        /// peers detect and ban a faulty target
        #[arg(long)]
        fault_corrupt_uploads: bool,
    },
    /// Write a new random fleet key (64 hex digits) to FILE, readable by
    /// its owner only; every member of a fleet needs the same key
    FleetKey {
        /// Where to write it; refused if it exists
        file: PathBuf,
    },
    /// Print the completion script of convoyd for SHELL (bash, zsh, fish,
    /// elvish, powershell)
    ///
    /// Example: convoyd completions bash > /usr/share/bash-completion/completions/convoyd
    Completions {
        /// The shell
        shell: convoy_daemon::manual::Shell,
    },
    /// Write convoyd's man pages (convoyd.1, convoyd-coordinator.1, ...)
    /// into DIR
    Man {
        /// Where to write them (created)
        dir: PathBuf,
    },
}

#[derive(Args)]
struct Common {
    /// TOML file with settings (flags and environment take precedence)
    #[arg(short, long, env = "CONVOY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for the store, the identity and unfinished work
    /// [default: /var/lib/convoy]
    #[arg(short, long, env = "CONVOY_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on; repeat for several (TCP and QUIC)
    /// [default: /ip4/0.0.0.0/tcp/7400 and /ip4/0.0.0.0/udp/7400/quic-v1;
    /// targets 7401]
    #[arg(
        long,
        env = "CONVOY_LISTEN",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    listen: Vec<String>,
    /// File holding the fleet key (see `convoyd fleet-key`)
    #[arg(long, env = "CONVOY_FLEET_KEY_FILE", value_name = "FILE")]
    fleet_key_file: Option<PathBuf>,
    /// A label of this daemon, KEY=VALUE (dc, zone, rack, slice, ...); repeat
    #[arg(
        long = "label",
        env = "CONVOY_LABELS",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    labels: Vec<String>,
    /// Upload cap in bytes per second (64MiB, 500kB, ...) [default: none]
    #[arg(long, env = "CONVOY_UPLOAD_RATE", value_name = "RATE")]
    upload_rate: Option<String>,
    /// Download cap in bytes per second [default: none]
    #[arg(long, env = "CONVOY_DOWNLOAD_RATE", value_name = "RATE")]
    download_rate: Option<String>,
    /// Log format on stderr [default: human]
    #[arg(long, env = "CONVOY_LOG_FORMAT", value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Log filter, as RUST_LOG (e.g. `debug`, `info,convoy_daemon=debug`)
    /// [default: info]
    #[arg(long, env = "CONVOY_LOG", value_name = "FILTER")]
    log_level: Option<String>,
    /// How often the store drops releases and chunks nobody keeps (a
    /// target keeps --retain releases per app and every release it stages
    /// or has delivered; the coordinator --retain per app and every release
    /// of a staging or roll-out it remembers); `off` never [default: 10m]
    #[arg(long, env = "CONVOY_GC_INTERVAL", value_name = "DURATION")]
    gc_interval: Option<String>,
    /// Threads that run the network and the protocol (store reads and
    /// writes run on their own threads besides); fewer leave more of a
    /// shared machine to other work [default: one per core]
    #[arg(long, env = "CONVOY_WORKER_THREADS", value_name = "N")]
    worker_threads: Option<usize>,
    /// The handshake offered first on the TCP connections this daemon
    /// dials: `tls` (TLS 1.3, AES-GCM first: cheapest on a CPU with AES
    /// instructions) or `noise` (ChaCha20-Poly1305). Either is accepted
    /// from peers whatever this says [default: tls]
    #[arg(long, env = "CONVOY_SECURITY", value_name = "HANDSHAKE")]
    security: Option<Security>,
}

#[derive(Clone, Copy, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    Human,
    Json,
}

/// The TOML file's keys.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<Vec<String>>,
    fleet_key_file: Option<PathBuf>,
    labels: Option<BTreeMap<String, String>>,
    upload_rate: Option<String>,
    download_rate: Option<String>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    worker_threads: Option<usize>,
    security: Option<Security>,
    gc_interval: Option<String>,
    coordinator: Option<String>,
    push_parallel: Option<usize>,
    swarm_degree: Option<usize>,
    heartbeat_ms: Option<u64>,
    max_reports_per_second: Option<u64>,
    health_listen: Option<String>,
    api_listen: Option<String>,
    api_token_file: Option<PathBuf>,
    operators: Option<PathBuf>,
    pipelines: Option<PathBuf>,
    retain: Option<usize>,
    delta_bases: Option<usize>,
    hook_timeout: Option<String>,
    hook_env: Option<Vec<String>>,
}

/// Settings after flags, environment, file and defaults.
struct Settings {
    data_dir: PathBuf,
    listen: Vec<Multiaddr>,
    fleet_key: [u8; 32],
    labels: Labels,
    upload_rate: Option<u64>,
    download_rate: Option<u64>,
    worker_threads: Option<usize>,
    security: Security,
    /// `None`: never.
    gc_every: Option<Duration>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("convoyd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_file(path: Option<&Path>) -> Result<FileConfig> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text)
        .with_context(|| format!("{} is not a valid convoyd config", path.display()))
}

fn parse_labels(flags: &[String], file: Option<BTreeMap<String, String>>) -> Result<Labels> {
    let mut labels = file.unwrap_or_default();
    for l in flags {
        let Some((k, v)) = l.split_once('=') else {
            bail!("label {l:?} is not KEY=VALUE");
        };
        labels.insert(k.to_string(), v.to_string());
    }
    if labels.len() > MAX_LABELS {
        bail!("at most {MAX_LABELS} labels");
    }
    for (k, v) in &labels {
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= MAX_LABEL_BYTES
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !ok(k) || !ok(v) {
            bail!("label {k}={v}: keys and values are 1-{MAX_LABEL_BYTES} of letters, digits, '-', '_', '.'");
        }
    }
    Ok(labels)
}

fn settings(common: &Common, file: &FileConfig, default_port: u16) -> Result<Settings> {
    let data_dir = common
        .data_dir
        .clone()
        .or(file.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from("/var/lib/convoy"));
    let listen_text: Vec<String> = if !common.listen.is_empty() {
        common.listen.clone()
    } else if let Some(l) = &file.listen {
        l.clone()
    } else {
        vec![
            format!("/ip4/0.0.0.0/tcp/{default_port}"),
            format!("/ip4/0.0.0.0/udp/{default_port}/quic-v1"),
        ]
    };
    let listen = listen_text
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>().with_context(|| {
                format!("--listen {a:?} is not a multiaddr (e.g. /ip4/0.0.0.0/tcp/7400)")
            })
        })
        .collect::<Result<_>>()?;
    let key_file = common
        .fleet_key_file
        .clone()
        .or(file.fleet_key_file.clone())
        .context(
            "no fleet key: pass --fleet-key-file FILE (make one with `convoyd fleet-key FILE`)",
        )?;
    let fleet_key = fleet_key::read(&key_file)?;
    let rate = |flag: &Option<String>, file: &Option<String>, what: &str| -> Result<Option<u64>> {
        match flag.clone().or(file.clone()) {
            None => Ok(None),
            Some(t) => {
                let r = parse_bytes(&t)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("--{what}"))?;
                if r == 0 {
                    bail!("--{what} must be more than 0");
                }
                Ok(Some(r))
            }
        }
    };
    Ok(Settings {
        data_dir,
        listen,
        fleet_key,
        labels: parse_labels(&common.labels, file.labels.clone())?,
        upload_rate: rate(&common.upload_rate, &file.upload_rate, "upload-rate")?,
        download_rate: rate(&common.download_rate, &file.download_rate, "download-rate")?,
        worker_threads: match common.worker_threads.or(file.worker_threads) {
            Some(0) => bail!("--worker-threads must be at least 1"),
            n => n,
        },
        security: common.security.or(file.security).unwrap_or_default(),
        gc_every: match common.gc_interval.clone().or(file.gc_interval.clone()) {
            Some(off) if off == "off" => None,
            Some(text) => match parse_duration("--gc-interval", &text)? {
                d if d.is_zero() => bail!("--gc-interval must be more than 0 (or off)"),
                d => Some(d),
            },
            None => Some(Duration::from_secs(600)),
        },
    })
}

fn init_logging(common: &Common, file: &FileConfig) {
    let filter = common
        .log_level
        .clone()
        .or(file.log_level.clone())
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours for a terminal only: a log file or journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match common
        .log_format
        .or(file.log_format)
        .unwrap_or(LogFormat::Human)
    {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Loads this daemon's identity, or makes and keeps a new one.
fn identity(data_dir: &Path) -> Result<Keypair> {
    let path = data_dir.join("identity.key");
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .with_context(|| format!("{} is not a convoyd identity", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().expect("ed25519 encodes");
            write_atomically(&path, &bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
            set_private(&path)?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn set_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::FleetKey { file } => {
            fleet_key::generate(&file)?;
            eprintln!("wrote a new fleet key to {}", file.display());
            Ok(())
        }
        Command::Completions { shell } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            convoy_daemon::manual::completions(cmd, shell, &mut std::io::stdout())
                .context("cannot write the completion script")
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let cmd = <Cli as clap::CommandFactory>::command();
            for page in convoy_daemon::manual::man_pages(cmd, &dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?
            {
                println!("{}", page.display());
            }
            Ok(())
        }
        Command::Coordinator {
            common,
            push_parallel,
            swarm_degree,
            heartbeat_ms,
            max_reports_per_second,
            api_listen,
            api_token_file,
            operators,
            retain,
            delta_bases,
            pipelines,
        } => {
            let file = load_file(common.config.as_deref())?;
            init_logging(&common, &file);
            let open_files = convoy_daemon::net::raise_open_files_limit();
            tracing::debug!(open_files, "open files limit");
            let s = settings(&common, &file, 7400)?;
            let push_parallel = push_parallel.or(file.push_parallel).unwrap_or(4);
            let swarm_degree = swarm_degree.or(file.swarm_degree).unwrap_or(8);
            let heartbeat = heartbeat_ms.or(file.heartbeat_ms).unwrap_or(1000);
            let max_reports_per_second = max_reports_per_second
                .or(file.max_reports_per_second)
                .unwrap_or(1000);
            if push_parallel == 0
                || swarm_degree == 0
                || heartbeat < 100
                || max_reports_per_second == 0
            {
                bail!("--push-parallel, --swarm-degree and --max-reports-per-second must be at least 1, --heartbeat-ms at least 100");
            }
            let pipelines = match pipelines.or(file.pipelines.clone()) {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    Pipelines::parse(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
                }
                None => Pipelines::default(),
            };
            let api_listen = api_listen
                .or(file.api_listen.clone())
                .unwrap_or_else(|| "127.0.0.1:7410".into());
            let token_file = api_token_file
                .or(file.api_token_file.clone())
                .unwrap_or_else(|| s.data_dir.join("api-token"));
            convoy_daemon::durable::create_dir_all(&s.data_dir)
                .with_context(|| format!("cannot create {}", s.data_dir.display()))?;
            let tokens = api::load_or_create_tokens(&token_file)
                .with_context(|| format!("cannot read or create {}", token_file.display()))?;
            // A file named on purpose must exist; the default one is made
            // with a key for this host, as the API token is.
            let local_operator_key = s.data_dir.join("operator.key");
            let (operators_file, operators) = match operators.or(file.operators.clone()) {
                Some(named) => {
                    let ops = Operators::read(&named)?;
                    (named, ops)
                }
                None => {
                    let default = s.data_dir.join("operators");
                    let ops = Operators::read_or_create(&default, &local_operator_key)?;
                    (default, ops)
                }
            };
            if operators.is_empty() {
                tracing::warn!(file = %operators_file.display(), "no operators are listed: nobody can publish or stage");
            }
            let refusals = Arc::new(Refusals::default());
            on_runtime(s.worker_threads, async move {
                let listener = tokio::net::TcpListener::bind(&api_listen)
                    .await
                    .with_context(|| format!("cannot listen for the API on {api_listen}"))?;
                let api_addr = listener.local_addr()?.to_string();
                info!(addr = %api_addr, token_file = %token_file.display(), "operator API listening");
                let (calls_tx, calls) = mpsc::channel(256);
                tokio::spawn(api::serve(listener, calls_tx, tokens, refusals.clone()));
                let mut ready = serde_json::json!({
                    "api": format!("http://{api_addr}"),
                    "api_token_file": token_file,
                    "operators_file": operators_file,
                });
                if local_operator_key.exists() {
                    ready["operator_key_file"] = serde_json::json!(local_operator_key);
                }
                let shutdown = shutdown_signal()?;
                let (keypair, chunks, net, events, _) = start(&s, "coordinator", ready).await?;
                let config = CoordinatorConfig {
                    keypair,
                    data_dir: s.data_dir.clone(),
                    labels: s.labels.clone(),
                    push_parallel,
                    swarm_degree,
                    heartbeat: Duration::from_millis(heartbeat),
                    max_reports_per_second,
                    pipelines,
                    operators,
                    refusals,
                    retain: match retain.or(file.retain).unwrap_or(10) {
                        0 => bail!("--retain must be at least 1"),
                        n => n,
                    },
                    gc_every: s.gc_every,
                    delta_bases: delta_bases.or(file.delta_bases).unwrap_or(2),
                };
                coordinator::run(config, chunks, net, events, calls, shutdown).await
            })
        }
        Command::Target {
            common,
            coordinator,
            health_listen,
            retain,
            hook_timeout,
            hook_env,
            fault_corrupt_uploads,
        } => {
            let file = load_file(common.config.as_deref())?;
            init_logging(&common, &file);
            let s = settings(&common, &file, 7401)?;
            let addr = coordinator.or(file.coordinator.clone()).context(
                "no coordinator: pass --coordinator ADDR (the address convoyd coordinator prints)",
            )?;
            let (peer, addr) = client::parse_peer_addr(&addr).map_err(anyhow::Error::msg)?;
            let health_listen = health_listen
                .or(file.health_listen.clone())
                .unwrap_or_else(|| "0.0.0.0:7480".into());
            let retain = retain.or(file.retain).unwrap_or(5);
            if retain < 2 {
                bail!("--retain must be at least 2: the active and the previous release are kept");
            }
            let hook_timeout = hook_timeout
                .or(file.hook_timeout.clone())
                .map(|t| parse_duration("--hook-timeout", &t))
                .transpose()?
                .unwrap_or(Duration::from_secs(60));
            let hook_env = if hook_env.is_empty() {
                file.hook_env.clone().unwrap_or_default()
            } else {
                hook_env
            };
            if let Some(bad) = hook_env.iter().find(|n| !deliver::valid_hook_env_name(n)) {
                bail!("--hook-env {bad:?}: a variable name of letters, digits and '_', not one of the hooks' own CONVOY_* variables");
            }
            let releases = Arc::new(
                Releases::open(&s.data_dir.join("releases"), retain, hook_timeout)
                    .context("cannot open the releases directory")?
                    .with_hook_env(hook_env),
            );
            let load = Arc::new(
                Load::open(&s.data_dir.join("load")).context("cannot read the load state")?,
            );
            on_runtime(s.worker_threads, async move {
                let health = tokio::net::TcpListener::bind(&health_listen)
                    .await
                    .with_context(|| {
                        format!("cannot listen for health checks on {health_listen}")
                    })?;
                let health_addr = health.local_addr()?.to_string();
                let ready = serde_json::json!({"health": health_addr});
                let shutdown = shutdown_signal()?;
                let (_, chunks, net, events, listening) = start(&s, "target", ready).await?;
                // Bound before the ready line named it: a check that
                // comes before this waits in the listener's backlog.
                info!(addr = %health_addr, "health endpoint listening");
                tokio::spawn(health::serve(
                    health,
                    load.clone(),
                    releases.clone(),
                    health::Counters {
                        chunks: chunks.clone(),
                        wire: net.wire_counters(),
                    },
                    std::future::pending(),
                ));
                chunks
                    .corrupt_uploads
                    .store(fault_corrupt_uploads, std::sync::atomic::Ordering::Relaxed);
                let config = TargetConfig {
                    coordinator: peer,
                    coordinator_addrs: vec![addr],
                    listening,
                    labels: s.labels.clone(),
                    data_dir: s.data_dir.clone(),
                    releases,
                    load,
                    health_addr: Some(health_addr),
                    gc_every: s.gc_every,
                };
                target::run(config, chunks, net, events, shutdown).await
            })
        }
    }
}

/// Runs the daemon's main future on the runtime's worker threads, beside
/// the network's tasks. Not on this thread (`block_on` would): every
/// message between the role's loop and the network would then wake one
/// thread from another, a third of a bench fleet's context switches.
fn on_runtime<F>(worker_threads: Option<usize>, main: F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match tokio::spawn(main).await {
            Ok(result) => result,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    })
}

type Started = (
    Keypair,
    Arc<Chunks>,
    net::NetHandle,
    mpsc::Receiver<NetEvent>,
    Vec<Multiaddr>,
);

/// Opens the store, starts the network, waits until every listener is up
/// and prints the ready line.
async fn start(s: &Settings, role: &str, extra: serde_json::Value) -> Result<Started> {
    convoy_daemon::durable::create_dir_all(&s.data_dir)
        .with_context(|| format!("cannot create {}", s.data_dir.display()))?;
    let keypair = identity(&s.data_dir)?;
    let store = RocksStore::open(&s.data_dir.join("store"))?;
    let chunks = match role {
        "coordinator" => Chunks::origin(Arc::new(store), s.upload_rate, s.download_rate),
        _ => Chunks::new(Arc::new(store), s.upload_rate, s.download_rate),
    };
    let (handle, mut events) = net::start(NetConfig {
        keypair: keypair.clone(),
        listen: s.listen.clone(),
        fleet_key: s.fleet_key,
        request_timeout: Duration::from_secs(60),
        admission_timeout: net::ADMISSION_TIMEOUT,
        security: s.security,
    })?;
    let peer_id = handle.peer_id();
    let mut listening = Vec::new();
    let mut early = Vec::new();
    let mut pending: Vec<Vec<String>> = s.listen.iter().map(stack).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !pending.is_empty() {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .context("listeners did not come up within 10 s")?
            .context("the network stopped")?;
        match ev {
            NetEvent::Listening(a) => {
                let st = stack(&a);
                pending.retain(|p| *p != st);
                listening.push(a);
            }
            other => early.push(other),
        }
    }
    let addrs: Vec<String> = listening
        .iter()
        .map(|a| format!("{a}/p2p/{peer_id}"))
        .collect();
    info!(%peer_id, role, data_dir = %s.data_dir.display(), "convoyd ready");
    let mut ready =
        serde_json::json!({"role": role, "peer_id": peer_id.to_string(), "addrs": addrs});
    if let (Some(r), serde_json::Value::Object(extra)) = (ready.as_object_mut(), extra) {
        r.extend(extra);
    }
    println!("{ready}");
    // Under systemd (Type=notify): started. Elsewhere a no-op.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot tell the service manager that convoyd is ready: {e}");
    }
    // Hand the events seen while waiting to the role, then the rest.
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(async move {
        for ev in early {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        while let Some(ev) = events.recv().await {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    Ok((keypair, chunks, handle, rx, listening))
}

/// Parses `30s`, `2m`, `1500ms`.
fn parse_duration(flag: &str, text: &str) -> Result<Duration> {
    humantime::parse_duration(text).with_context(|| {
        format!("{flag}: {text:?} is not a duration (write it like 30s, 2m or 1500ms)")
    })
}

/// The protocol names of an address, without their values: /ip4/tcp.
fn stack(a: &Multiaddr) -> Vec<String> {
    a.iter()
        .map(|p| p.tag().to_string())
        .filter(|t| t != "p2p")
        .collect()
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled: called before convoyd says
/// it is ready, so that a service manager's SIGTERM right after READY=1
/// is not lost (it was, when the role's loop had not started yet).
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        info!("shutting down");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    })
}
