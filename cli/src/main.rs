//! `convoy`: the operator's command line for Convoy.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use convoy_chunker::{materialise, pack, Diff, EntryKind, Manifest, ReleaseId};
use convoy_daemon::protocol::DistributionMode;
use convoy_daemon::store::{gc, verify, Ingest, IngestStats, RocksStore, Store, StoreSource};
use indicatif::BinaryBytes;
use serde_json::json;

mod bench;
mod deltas;
mod demo;
mod load;
mod operate;
mod plot;
mod progress;
mod remote;
mod sim;

use progress::Bar;

/// Convoy moves release packages to fleets as content-defined chunks and
/// rolls them out.
///
/// Local commands work on a chunk store (pack, inspect, diff, unpack,
/// verify, gc, list). publish, stage, staging and fleet talk to a
/// coordinator over libp2p (--coordinator, --fleet-key-file); promote,
/// deploy, status, pause, resume, abort, rollback and history use its
/// HTTP API (--api, --api-token-file). bench and demo run a local fleet.
///
/// Exit codes: 0 success, 1 error; deploy --follow: 2 rolled back,
/// 3 failed, 4 aborted.
#[derive(Parser)]
#[command(name = "convoy", version)]
struct Cli {
    /// Chunk store directory [default: $XDG_DATA_HOME/convoy, else ~/.local/share/convoy]
    #[arg(long, global = true, env = "CONVOY_STORE", value_name = "DIR")]
    store: Option<PathBuf>,

    /// Print results as JSON on stdout (progress and messages stay on stderr)
    #[arg(long, global = true)]
    json: bool,

    /// Worker threads for chunking, hashing and writing [default: all cores]
    #[arg(long, global = true, env = "CONVOY_THREADS", value_name = "N")]
    threads: Option<usize>,

    /// The coordinator, for publish, stage and fleet: the address
    /// `convoyd coordinator` prints, ending in /p2p/PEER_ID
    #[arg(long, global = true, env = "CONVOY_COORDINATOR", value_name = "ADDR")]
    coordinator: Option<String>,

    /// The fleet key file, for publish, stage and fleet
    #[arg(
        long,
        global = true,
        env = "CONVOY_FLEET_KEY_FILE",
        value_name = "FILE"
    )]
    fleet_key_file: Option<PathBuf>,

    /// The operator key, for publish, stage, staging and fleet: the
    /// coordinator acts only for keys its operators file lists (make one
    /// with `convoy keygen`; a coordinator makes DATA_DIR/operator.key for
    /// its own host)
    #[arg(
        long,
        global = true,
        env = "CONVOY_OPERATOR_KEY_FILE",
        value_name = "FILE"
    )]
    operator_key_file: Option<PathBuf>,

    /// The coordinator's operator API, for promote, deploy, status, pause,
    /// resume, abort, rollback and history [default: http://127.0.0.1:7410]
    #[arg(long, global = true, env = "CONVOY_API", value_name = "URL")]
    api: Option<String>,

    /// File holding the API's bearer token (the coordinator writes
    /// DATA_DIR/api-token); CONVOY_API_TOKEN, if set, is used instead
    #[arg(
        long,
        global = true,
        env = "CONVOY_API_TOKEN_FILE",
        value_name = "FILE"
    )]
    api_token_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chunk a directory into the store as release APP@VERSION and print its id
    ///
    /// Files are split into content-defined chunks (FastCDC, 16/64/256 KiB),
    /// named by BLAKE3 and stored zstd-compressed when that saves a tenth.
    /// Chunks the store already holds are not written again. The same tree
    /// always gives the same release id: timestamps and owners are not recorded.
    ///
    /// Example: convoy pack ./build --app web --version 1.4.2
    #[command(disable_version_flag = true)]
    Pack {
        /// The build directory to package
        dir: PathBuf,
        /// App name (letters, digits, '.', '_', '-')
        #[arg(long)]
        app: String,
        /// Version (letters, digits, '.', '_', '-', '+'); a version names one release forever
        #[arg(long = "version", value_name = "VERSION")]
        release_version: String,
        /// Make binary deltas into the new release from this many of the
        /// app's newest releases in the store (0: none)
        #[arg(long, value_name = "N", default_value_t = 2)]
        delta_bases: usize,
    },
    /// Show a release: its entries, sizes and chunk statistics
    ///
    /// RELEASE is APP@VERSION, a release id, or a unique prefix of an id.
    ///
    /// Example: convoy inspect web@1.4.2
    Inspect {
        /// The release to show
        release: String,
        /// Only the summary, not every entry
        #[arg(long)]
        summary: bool,
    },
    /// Show what upgrading a holder of FROM to TO must move
    ///
    /// Counts the distinct chunks of TO that FROM lacks, their bytes, and
    /// their bytes as they cross the network (compressed); then the bytes
    /// with binary deltas (each file's delta or its chunks, whichever is
    /// smaller) and the files that use them. Makes and stores the deltas
    /// from FROM to TO when the store holds none yet.
    ///
    /// Example: convoy diff web@1.4.1 web@1.4.2
    Diff {
        /// The release a target has
        from: String,
        /// The release it moves to
        to: String,
    },
    /// Write a release's tree into DEST, verifying every chunk
    ///
    /// The tree is built beside DEST and renamed into place at the end, so
    /// DEST never holds half a release. Modes and symlinks are reproduced.
    ///
    /// Example: convoy unpack web@1.4.2 /srv/web/releases/1.4.2
    Unpack {
        /// The release to write
        release: String,
        /// Destination directory; must be absent or empty unless --force
        dest: PathBuf,
        /// Replace a non-empty DEST
        #[arg(long)]
        force: bool,
    },
    /// Re-hash every chunk and check every release's chunks are present
    ///
    /// Exits 1 and names each corrupt or missing chunk if any.
    ///
    /// Example: convoy verify
    Verify,
    /// Drop old releases and the chunks no kept release uses
    ///
    /// Keeps the newest N releases of each app (newest by when they entered
    /// this store).
    ///
    /// Example: convoy gc --keep 3
    Gc {
        /// Releases to keep per app
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
        keep: u64,
    },
    /// List the releases in the store, oldest first
    ///
    /// Example: convoy list
    List,
    /// Pack a directory as APP@VERSION and upload it to the coordinator
    ///
    /// Chunks locally into the store (as `convoy pack`), asks the
    /// coordinator which chunks it lacks, uploads only those, then the
    /// manifest. Prints the release id. The release can be staged at
    /// once; the origin then makes its binary deltas from older releases
    /// in the background, and stagings that start after they are made
    /// send them to targets holding a base.
    ///
    /// Example: convoy publish ./build web@1.4.2 --wait-deltas --coordinator /ip4/10.0.0.1/tcp/7400/p2p/12D3Koo...
    Publish {
        /// The build directory to publish
        dir: PathBuf,
        /// APP@VERSION
        release: String,
        /// Wait until the origin has made the release's deltas, and say
        /// how long they took and how large they are
        #[arg(long)]
        wait_deltas: bool,
        /// With --wait-deltas: give up waiting after this many seconds
        /// (the release stays published)
        #[arg(long, default_value_t = 600, value_name = "SECONDS")]
        timeout: u64,
    },
    /// Order targets to stage a published release
    ///
    /// Every target whose labels match the selector gets every chunk of the
    /// release into its store, in the chosen mode. Nothing that serves
    /// traffic changes. With --wait, shows progress and prints per-target
    /// completion times, bytes moved and origin egress; exits 1 if any
    /// target failed.
    ///
    /// Example: convoy stage web@1.4.2 --targets dc=eu1 --mode swarm --wait
    Stage {
        /// APP@VERSION
        release: String,
        /// Label selector: KEY=VALUE[,KEY=VALUE...], all of which must
        /// match, or `all`
        #[arg(long, default_value = "all", value_name = "SELECTOR")]
        targets: String,
        /// swarm (targets fetch from each other and the origin), push (the
        /// origin sends each target what it lacks, K at a time) or pull
        /// (each target fetches from the origin only)
        #[arg(long, default_value = "swarm")]
        mode: DistributionMode,
        /// Wait until every target staged or failed
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (exit 1)
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
    },
    /// Show how far a staging has got (the id `convoy stage` printed)
    ///
    /// Example: convoy staging 3 --json
    Staging {
        /// The staging's id
        id: u64,
    },
    /// List the targets the coordinator knows: labels, liveness, releases held, bytes
    ///
    /// Example: convoy fleet --json
    Fleet,
    /// Make a new operator key and print the operator id it proves
    ///
    /// The key (an ed25519 secret, 64 hex digits) is written to FILE,
    /// readable by its owner only; an existing file is never overwritten.
    /// Add the printed `NAME ID` line, with a name of your choice, to the
    /// coordinator's operators file, then pass --operator-key-file FILE to
    /// publish, stage, staging and fleet. Keep operator keys off targets:
    /// a target's fleet key alone may publish, stage or list nothing.
    ///
    /// Example: convoy keygen ~/.config/convoy/operator.key
    Keygen {
        /// Where to write the key
        file: PathBuf,
    },
    /// Print the completion script of convoy for SHELL (bash, zsh, fish,
    /// elvish, powershell)
    ///
    /// Example: convoy completions bash > ~/.local/share/bash-completion/completions/convoy
    Completions {
        /// The shell
        shell: convoy_daemon::manual::Shell,
    },
    /// Write convoy's man pages (convoy.1, convoy-pack.1, ...) into DIR
    Man {
        /// Where to write them (created)
        dir: PathBuf,
    },
    /// Run a local fleet and compare the distribution modes against the bound
    ///
    /// Starts a coordinator and N convoyd targets on loopback in a temporary
    /// directory, publishes a generated package of incompressible data
    /// (fresh content per mode), stages it in each mode in turn under the
    /// same caps, and reports per mode: completion time over the targets
    /// (p50, p99, max), origin egress, total bytes moved, cross-dc bytes,
    /// the Kumar-Ross bound and the ratio of p99 to it, targets verified,
    /// and the fleet's CPU seconds. rsync (when installed) pushes the same
    /// tree from an rsync daemon on loopback, K at a time, the K sharing
    /// the origin's cap as push does. Sizes and rates take binary suffixes;
    /// rates are bytes per second. Everything is stopped and removed at
    /// the end, also on Ctrl-C; killed outright, its daemons get SIGTERM
    /// from the kernel.
    ///
    /// Example: convoy bench --nodes 50 --size 16MiB --uplink 2MiB --modes swarm,push,pull --out results/
    Bench(bench::BenchArgs),
    /// Simulate a fleet of any size: what would N targets take in each mode?
    ///
    /// Runs the daemon's own distribution logic (its fetcher, seeder and
    /// pusher, and its glue: requests of up to four chunks, announcements on
    /// its 50/250 ms cadence, busy answers past 500 ms of upload backlog)
    /// for every target over a virtual network of capped uplinks with 1 ms
    /// latency, in virtual time, on one core. Chunk sizes come from the real
    /// chunker over generated files, as `convoy bench` makes them. Measured
    /// against real daemons (`convoy bench --modes swarm`, same caps), its
    /// swarm p99 and origin egress came within 7% at 10, 50 and 200
    /// targets. Not modelled: downlinks, CPU, disks, connection set-up,
    /// control traffic.
    ///
    /// Example: convoy sim --nodes 5000 --size 64MiB --uplink 10MiB --dcs 4 --modes swarm
    Sim(sim::SimArgs),
    /// Load one real coordinator with thousands of simulated targets
    ///
    /// For each fleet size, starts a coordinator and spreads the targets
    /// over a few worker processes: each target is a libp2p peer of its own
    /// (TLS, fleet proof) that reports on the coordinator's cadence, takes
    /// staging orders, peer lists and deliveries and reports them, but
    /// stores nothing. Prints the coordinator's CPU under steady heartbeats,
    /// its memory, how long staging orders and each roll-out wave's orders
    /// take to reach every target, and how fast `convoy fleet` and
    /// `GET /v1/fleet` answer.
    ///
    /// Example: convoy load-test --targets 1000,3000,10000 --out results/
    LoadTest(load::LoadArgs),
    /// One process of `convoy load-test`'s simulated targets (started by it)
    #[command(hide = true)]
    LoadWorker(load::worker::WorkerArgs),
    /// Run the whole product on a local fleet: distribution and three roll-outs
    ///
    /// Starts a coordinator and a fleet (12 targets in 3 data centres, half
    /// in the blue slice, half in the green) on loopback in a temporary
    /// directory; publishes a generated web app v1.0 and deploys it rolling
    /// in swarm mode; publishes v1.1, a small patch, and deploys it
    /// blue-green in push mode; publishes v1.2, whose validate hook fails,
    /// and shows the halt and the automatic rollback. Prints per
    /// deployment: strategy, mode, distribution and delivery time, bytes
    /// moved and result. Stops everything and removes the directory at the
    /// end (also on Ctrl-C) unless --keep. Exits 1 if a roll-out did not
    /// end as it should.
    ///
    /// Example: convoy demo --nodes 12 --json
    Demo(demo::DemoArgs),
    /// Make a release deployable to the next environment of its app's pipeline
    ///
    /// Allowed once a roll-out of the release succeeded in the environment
    /// before; the first environment of a pipeline needs no promotion.
    /// --force skips the order and is recorded in the app's history.
    ///
    /// Example: convoy promote web@1.4.2 --to production
    Promote {
        /// APP@VERSION, published
        release: String,
        /// The environment
        #[arg(long = "to", value_name = "ENV")]
        env: String,
        /// Promote even though the release has not succeeded in the
        /// environment before (recorded)
        #[arg(long)]
        force: bool,
    },
    /// Roll a release out to an environment: distribute, then deliver in waves
    ///
    /// Every target of the environment stages the release first (in the
    /// chosen mode); then waves activate it: live keeps targets in load,
    /// rolling drains each for the drain period, activates, validates and
    /// puts it back; blue-green activates the idle slice and swaps the
    /// slices at once. More failures than --max-failures halt the roll-out
    /// and roll back every target it delivered to. One roll-out runs per
    /// app and environment at a time.
    ///
    /// Example: convoy deploy web@1.4.2 --env production --strategy rolling --waves 1,10%,50%,100% --mode swarm --follow
    Deploy(operate::DeployArgs),
    /// Show one roll-out in full (targets, waves, notices), or list them all
    ///
    /// Example: convoy status 3
    Status {
        /// The deployment's id; all of them without it
        deployment: Option<u64>,
    },
    /// Pause a roll-out before its next wave (the running wave finishes)
    ///
    /// Example: convoy pause 3
    Pause {
        /// The deployment's id
        deployment: u64,
    },
    /// Resume a paused roll-out
    ///
    /// Example: convoy resume 3
    Resume {
        /// The deployment's id
        deployment: u64,
    },
    /// Abort a roll-out: every target it delivered to goes back to the
    /// release it ran before (blue-green: the slices swap back)
    ///
    /// Example: convoy abort 3
    Abort {
        /// The deployment's id
        deployment: u64,
    },
    /// Put an environment back on its previous release
    ///
    /// Each target activates the release it ran before (no hooks: they ran
    /// when it was active); a blue-green environment swaps its slices back,
    /// since the idle slice kept the previous release. Refused while a
    /// roll-out of the app runs there (abort it instead).
    ///
    /// Example: convoy rollback web --env production
    Rollback {
        /// The app
        app: String,
        /// The environment
        #[arg(long)]
        env: String,
    },
    /// Show every promotion, roll-out and rollback of an app, with who and when
    ///
    /// Example: convoy history web --json
    History {
        /// The app
        app: String,
    },
}

fn main() -> ExitCode {
    // SIGPIPE stays ignored, as Rust leaves it: a write to a socket its
    // peer closed must fail, not kill the process. With it at the default,
    // `convoy fleet` died of the signal, silently, when the coordinator
    // closed the connection of a client holding the wrong fleet key first.
    // A closed stdout is handled where output is written ([`Output::emit`]).
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("convoy: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("starting worker threads")?;
    }
    let out = Output { json: cli.json };
    let remote = remote::Remote {
        coordinator: cli.coordinator,
        fleet_key_file: cli.fleet_key_file,
        operator_key_file: cli.operator_key_file,
    };
    match cli.command {
        Command::Completions { shell } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            convoy_daemon::manual::completions(cmd, shell, &mut std::io::stdout())
                .context("cannot write the completion script")?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let cmd = <Cli as clap::CommandFactory>::command();
            let pages = convoy_daemon::manual::man_pages(cmd, &dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
            out.emit(serde_json::json!({ "pages": pages }), || {
                pages.iter().map(|p| format!("{}\n", p.display())).collect()
            });
            return Ok(ExitCode::SUCCESS);
        }
        Command::Keygen { file } => {
            let id = convoy_daemon::coordinator::operators::generate_key(&file)?;
            out.emit(
                serde_json::json!({"operator_id": id.to_string(), "key_file": file}),
                || format!("{id}\n"),
            );
            if !out.json {
                eprintln!(
                    "wrote an operator key to {}; list it in the coordinator's operators file as: NAME {id}",
                    file.display()
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Stage {
            release,
            targets,
            mode,
            wait,
            timeout,
        } => {
            return remote::stage(
                &remote,
                &out,
                &release,
                &targets,
                mode,
                wait,
                timeout.map(Duration::from_secs),
            )
        }
        Command::Fleet => return remote::fleet(&remote, &out),
        Command::Staging { id } => return remote::staging(&remote, &out, id),
        Command::Bench(args) => return bench::bench(args, &out),
        Command::Demo(args) => return demo::demo(args, &out),
        Command::Sim(args) => return sim::sim(args, &out).map(|()| ExitCode::SUCCESS),
        Command::LoadTest(args) => return load::load_test(args, &out),
        Command::LoadWorker(args) => return load::worker::worker(args).map(|()| ExitCode::SUCCESS),
        _ => {}
    }
    let api = operate::Api::new(cli.api, cli.api_token_file);
    match cli.command {
        Command::Promote {
            release,
            env,
            force,
        } => return operate::promote(&api, &out, &release, &env, force),
        Command::Deploy(args) => return operate::deploy(&api, &out, args),
        Command::Status { deployment } => return operate::status(&api, &out, deployment),
        Command::Pause { deployment } => return operate::steer(&api, &out, deployment, "pause"),
        Command::Resume { deployment } => return operate::steer(&api, &out, deployment, "resume"),
        Command::Abort { deployment } => return operate::steer(&api, &out, deployment, "abort"),
        Command::Rollback { app, env } => return operate::rollback(&api, &out, &app, &env),
        Command::History { app } => return operate::history(&api, &out, &app),
        _ => {}
    }
    let store_dir = match cli.store {
        Some(dir) => dir,
        None => default_store_dir()?,
    };
    let store = RocksStore::open(&store_dir)?;
    match cli.command {
        Command::Pack {
            dir,
            app,
            release_version,
            delta_bases,
        } => cmd_pack(&store, &out, &dir, &app, &release_version, delta_bases),
        Command::Inspect { release, summary } => cmd_inspect(&store, &out, &release, summary),
        Command::Diff { from, to } => cmd_diff(&store, &out, &from, &to),
        Command::Unpack {
            release,
            dest,
            force,
        } => cmd_unpack(&store, &out, &release, &dest, force),
        Command::Verify => cmd_verify(&store, &out),
        Command::Gc { keep } => cmd_gc(&store, &out, keep as usize),
        Command::List => cmd_list(&store, &out),
        Command::Publish {
            dir,
            release,
            wait_deltas,
            timeout,
        } => {
            let wait = wait_deltas.then(|| Duration::from_secs(timeout));
            remote::publish(&remote, &store, &out, &dir, &release, wait)
        }
        _ => unreachable!("handled above"),
    }
}

/// `$XDG_DATA_HOME/convoy`, else `~/.local/share/convoy`.
fn default_store_dir() -> Result<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("convoy"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| anyhow!("neither XDG_DATA_HOME nor HOME is set: pass --store DIR"))?;
    Ok(PathBuf::from(home).join(".local/share/convoy"))
}

struct Output {
    json: bool,
}

impl Output {
    /// Prints `value` as JSON, or `text()` for people.
    fn emit(&self, value: serde_json::Value, text: impl FnOnce() -> String) {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let written = if self.json {
            writeln!(stdout, "{value}")
        } else {
            write!(stdout, "{}", text())
        }
        .and_then(|()| stdout.flush());
        match written {
            Ok(()) => {}
            // Like other Unix tools: `convoy status | head` ends quietly,
            // by the signal, when head closes the pipe.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                // SAFETY: resetting a signal to its default and raising it
                // is valid at any time; the process ends here.
                unsafe {
                    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                    libc::raise(libc::SIGPIPE);
                }
            }
            Err(e) => {
                eprintln!("convoy: error: cannot write the output: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// Finds a release by `app@version`, full id, or unique id prefix.
fn find(store: &dyn Store, spec: &str) -> Result<(ReleaseId, Manifest)> {
    let id = if let Some((app, version)) = spec.split_once('@') {
        store.resolve(app, version)?.ok_or_else(|| {
            anyhow!("no release {spec} in the store; `convoy list` shows what it holds")
        })?
    } else if let Some(id) = ReleaseId::from_hex(spec) {
        id
    } else {
        let prefix = spec.to_ascii_lowercase();
        if prefix.len() < 4 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("{spec:?} is neither APP@VERSION nor a release id (or a prefix of at least 4 hex digits)");
        }
        let mut matches: Vec<ReleaseId> = store
            .releases()?
            .into_iter()
            .map(|r| r.id)
            .filter(|id| id.to_hex().starts_with(&prefix))
            .collect();
        matches.dedup();
        match matches.as_slice() {
            [id] => *id,
            [] => {
                bail!("no release id starts with {spec}; `convoy list` shows what the store holds")
            }
            _ => bail!(
                "{spec} matches {} releases; give more digits",
                matches.len()
            ),
        }
    };
    let manifest = store.get_manifest(&id)?.ok_or_else(|| {
        anyhow!("release {id} is not in the store; `convoy list` shows what it holds")
    })?;
    Ok((id, manifest))
}

/// Packs `dir` into `store` as `app@version`, with a progress bar: chunks
/// first, durably; only then the manifest that names them.
fn pack_release(
    store: &RocksStore,
    dir: &Path,
    app: &str,
    version: &str,
) -> Result<(Manifest, ReleaseId, IngestStats)> {
    let bar = Bar::bytes(&format!("packing {app}@{version}"));
    let ingest = Ingest::new(store);
    let manifest = pack(dir, app, version, &&ingest, &bar)?;
    bar.finish();
    store.flush()?;
    let id = store.put_release(&manifest)?;
    Ok((manifest, id, ingest.stats()))
}

fn cmd_pack(
    store: &RocksStore,
    out: &Output,
    dir: &Path,
    app: &str,
    version: &str,
    delta_bases: usize,
) -> Result<ExitCode> {
    let started = Instant::now();
    let (manifest, id, stats) = pack_release(store, dir, app, version)?;
    let seconds = started.elapsed().as_secs_f64();
    let deltas_started = Instant::now();
    let made = deltas::after_pack(store, &manifest, delta_bases)?;
    let delta_seconds = deltas_started.elapsed().as_secs_f64();
    let (files, bytes) = manifest.file_totals();
    let unique = manifest.unique_chunks();
    let hashes: Vec<_> = unique.iter().map(|c| c.hash).collect();
    let stored_bytes: u64 = store
        .chunk_info(&hashes)?
        .iter()
        .flatten()
        .map(|i| u64::from(i.stored_len))
        .sum();
    let chunks = manifest.chunk_refs().count();
    if !out.json {
        eprintln!(
            "packed {app}@{version}: {files} files, {}, {chunks} chunks ({} unique, {} new: {} stored as {}), {} in store, {seconds:.2}s",
            BinaryBytes(bytes),
            unique.len(),
            stats.new_chunks,
            BinaryBytes(stats.new_bytes),
            BinaryBytes(stats.new_stored_bytes),
            BinaryBytes(stored_bytes),
        );
        for m in &made {
            eprintln!("{}", m.line());
        }
    }
    out.emit(
        json!({
            "release_id": id.to_hex(),
            "deltas": made.iter().map(deltas::Made::json).collect::<Vec<_>>(),
            "delta_seconds": delta_seconds,
            "app": app,
            "version": version,
            "files": files,
            "bytes": bytes,
            "chunks": chunks,
            "unique_chunks": unique.len(),
            "unique_bytes": unique.iter().map(|c| u64::from(c.len)).sum::<u64>(),
            "stored_bytes": stored_bytes,
            "new_chunks": stats.new_chunks,
            "new_bytes": stats.new_bytes,
            "new_stored_bytes": stats.new_stored_bytes,
            "seconds": seconds,
            "threads": rayon::current_num_threads(),
        }),
        || format!("{id}\n"),
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_inspect(store: &RocksStore, out: &Output, spec: &str, summary: bool) -> Result<ExitCode> {
    let (id, m) = find(store, spec)?;
    let (files, bytes) = m.file_totals();
    let count = |f: fn(&EntryKind) -> bool| m.entries().iter().filter(|e| f(&e.kind)).count();
    let dirs = count(|k| matches!(k, EntryKind::Dir { .. }));
    let symlinks = count(|k| matches!(k, EntryKind::Symlink { .. }));
    let unique = m.unique_chunks();
    let unique_bytes: u64 = unique.iter().map(|c| u64::from(c.len)).sum();
    let hashes: Vec<_> = unique.iter().map(|c| c.hash).collect();
    let infos = store.chunk_info(&hashes)?;
    let stored_bytes: u64 = infos
        .iter()
        .flatten()
        .map(|i| u64::from(i.stored_len))
        .sum();
    let missing = infos.iter().filter(|i| i.is_none()).count();
    let chunk_refs = m.chunk_refs().count();
    let names = store.releases()?;
    let patches: Vec<(String, convoy_chunker::Patch)> = store
        .patches_to(&id)?
        .into_iter()
        .map(|p| {
            let base = names
                .iter()
                .find(|r| r.id == p.base())
                .map_or_else(|| p.base().to_hex(), |r| format!("{}@{}", r.app, r.version));
            (base, p)
        })
        .collect();
    let entries: Vec<serde_json::Value> = if summary {
        Vec::new()
    } else {
        m.entries()
            .iter()
            .map(|e| match &e.kind {
                EntryKind::Dir { mode } => json!({"path": e.path, "kind": "dir", "mode": format!("{mode:o}")}),
                EntryKind::File { mode, size, chunks } => json!({"path": e.path, "kind": "file", "mode": format!("{mode:o}"), "size": size, "chunks": chunks.len()}),
                EntryKind::Symlink { target } => json!({"path": e.path, "kind": "symlink", "target": target}),
            })
            .collect()
    };
    out.emit(
        json!({
            "release_id": id.to_hex(),
            "app": m.app(),
            "version": m.version(),
            "files": files,
            "dirs": dirs,
            "symlinks": symlinks,
            "bytes": bytes,
            "chunks": chunk_refs,
            "unique_chunks": unique.len(),
            "unique_bytes": unique_bytes,
            "stored_bytes": stored_bytes,
            "missing_chunks": missing,
            "deltas": patches.iter().map(|(base, p)| json!({
                "base": base,
                "patch_id": p.id().to_hex(),
                "files": p.files().len(),
                "delta_bytes": p.delta_bytes(),
            })).collect::<Vec<_>>(),
            "entries": entries,
        }),
        || {
            let ratio = if unique_bytes == 0 { 100.0 } else { 100.0 * stored_bytes as f64 / unique_bytes as f64 };
            let mut s = format!(
                "release   {id}\nname      {}@{}\nentries   {files} files ({}), {dirs} directories, {symlinks} symlinks\nchunks    {chunk_refs} in files, {} distinct ({}), stored as {} ({ratio:.0}%)\n",
                m.app(),
                m.version(),
                BinaryBytes(bytes),
                unique.len(),
                BinaryBytes(unique_bytes),
                BinaryBytes(stored_bytes),
            );
            if missing > 0 {
                s += &format!("missing   {missing} chunks are not in this store\n");
            }
            for (base, p) in &patches {
                s += &format!(
                    "deltas    from {base}: {} files, {}\n",
                    p.files().len(),
                    BinaryBytes(p.delta_bytes())
                );
            }
            if !summary {
                s.push('\n');
                for e in m.entries() {
                    s += &match &e.kind {
                        EntryKind::Dir { mode } => format!("d {mode:04o} {:>12} {}/\n", "-", e.path),
                        EntryKind::File { mode, size, chunks } => {
                            format!("f {mode:04o} {size:>12} {} ({} chunks)\n", e.path, chunks.len())
                        }
                        EntryKind::Symlink { target } => format!("l      {:>12} {} -> {target}\n", "-", e.path),
                    };
                }
            }
            s
        },
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_diff(store: &RocksStore, out: &Output, from: &str, to: &str) -> Result<ExitCode> {
    let (from_id, from_m) = find(store, from)?;
    let (to_id, to_m) = find(store, to)?;
    let diff = Diff::between(&from_m, &to_m);
    let hashes: Vec<_> = diff.new.iter().map(|c| c.hash).collect();
    let infos = store.chunk_info(&hashes)?;
    if infos.iter().any(|i| i.is_none()) {
        bail!("release {to} has chunks missing from the store; run `convoy verify`");
    }
    let wire: u64 = infos
        .iter()
        .flatten()
        .map(|i| u64::from(i.stored_len))
        .sum();
    let made = deltas::make(store, &from_m, &to_m)?;
    let plan = deltas::plan(store, &from_m, &to_m, &made.patch)?;
    let delta_bytes: u64 = plan.delta_chunks.iter().map(|c| u64::from(c.len)).sum();
    out.emit(
        json!({
            "from": from_id.to_hex(),
            "to": to_id.to_hex(),
            "chunks_total": diff.chunks_total,
            "chunks_new": diff.new.len(),
            "bytes_total": diff.bytes_total,
            "bytes_new": diff.bytes_new,
            "wire_bytes_new": wire,
            "wire_bytes_with_deltas": plan.wire_bytes,
            "delta_bytes": delta_bytes,
            "chunks_new_with_deltas": plan.chunks.len(),
            "delta_files": deltas::plan_files(&plan),
            "deltas_made": made.stats,
        }),
        || {
            let share = if diff.bytes_total == 0 {
                0.0
            } else {
                100.0 * diff.bytes_new as f64 / diff.bytes_total as f64
            };
            let saved = if wire == 0 {
                0.0
            } else {
                100.0 * (1.0 - plan.wire_bytes as f64 / wire as f64)
            };
            let mut s = format!(
                "{from} -> {to}: {} of {} chunks new, {} of {} ({share:.1}%), {} on the wire\n",
                diff.new.len(),
                diff.chunks_total,
                BinaryBytes(diff.bytes_new),
                BinaryBytes(diff.bytes_total),
                BinaryBytes(wire),
            );
            s += &format!(
                "with deltas: {} on the wire ({saved:.1}% less): {} files from deltas ({}), {} chunks ({})\n",
                BinaryBytes(plan.wire_bytes),
                plan.patched.len(),
                BinaryBytes(delta_bytes),
                plan.chunks.len(),
                BinaryBytes(plan.wire_bytes - delta_bytes),
            );
            if made.stats.is_some() {
                s += &format!("{}\n", made.line());
            }
            s
        },
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_unpack(
    store: &RocksStore,
    out: &Output,
    spec: &str,
    dest: &Path,
    force: bool,
) -> Result<ExitCode> {
    let started = Instant::now();
    let (id, m) = find(store, spec)?;
    let bar = Bar::bytes(&format!("unpacking {}@{}", m.app(), m.version()));
    materialise(&m, &StoreSource(store), dest, force, &bar)
        .with_context(|| format!("unpacking {spec} into {}", dest.display()))?;
    bar.finish();
    let (files, bytes) = m.file_totals();
    let seconds = started.elapsed().as_secs_f64();
    out.emit(
        json!({"release_id": id.to_hex(), "dest": dest, "files": files, "bytes": bytes, "seconds": seconds}),
        || format!("unpacked {}@{} into {}: {files} files, {}, {seconds:.2}s\n", m.app(), m.version(), dest.display(), BinaryBytes(bytes)),
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_verify(store: &RocksStore, out: &Output) -> Result<ExitCode> {
    let bar = Bar::bytes("verifying");
    let report = verify(store, &bar)?;
    bar.finish();
    let clean = report.is_clean();
    out.emit(json!({"ok": clean, "report": report}), || {
        let mut s = String::new();
        for c in &report.corrupt {
            s += &format!("corrupt chunk {}: {}\n", c.hash, c.reason);
        }
        for c in &report.missing {
            s += &format!("missing chunk {} (needed by {})\n", c.hash, c.release);
        }
        for name in &report.missing_manifests {
            s += &format!("missing manifest of {name}\n");
        }
        s += &format!(
            "checked {} chunks ({}) and {} releases: {}\n",
            report.chunks_checked,
            BinaryBytes(report.bytes_checked),
            report.releases_checked,
            if clean {
                "all good".to_string()
            } else {
                format!(
                    "{} corrupt, {} missing",
                    report.corrupt.len(),
                    report.missing.len()
                )
            },
        );
        s
    });
    if clean {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "convoy: error: the store has {} corrupt and {} missing chunks and {} names without a manifest; pack or fetch the releases concerned again (`convoy gc` drops unused chunks)",
            report.corrupt.len(),
            report.missing.len(),
            report.missing_manifests.len()
        );
        Ok(ExitCode::FAILURE)
    }
}

fn cmd_gc(store: &RocksStore, out: &Output, keep: usize) -> Result<ExitCode> {
    let report = gc(store, keep)?;
    out.emit(json!(report), || {
        let mut s = String::new();
        for r in &report.removed {
            s += &format!("removed {r}\n");
        }
        s += &format!(
            "kept {} releases, removed {} releases and {} chunks ({} stored)\n",
            report.kept.len(),
            report.removed.len(),
            report.chunks_removed,
            BinaryBytes(report.stored_bytes_removed),
        );
        s
    });
    Ok(ExitCode::SUCCESS)
}

fn cmd_list(store: &RocksStore, out: &Output) -> Result<ExitCode> {
    let mut releases = store.releases()?;
    releases.sort_by_key(|r| r.seq);
    out.emit(
        json!(releases
            .iter()
            .map(|r| json!({"app": r.app, "version": r.version, "release_id": r.id.to_hex()}))
            .collect::<Vec<_>>()),
        || {
            releases
                .iter()
                .map(|r| format!("{}  {}@{}\n", r.id, r.app, r.version))
                .collect()
        },
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
        for sub in Cli::command().get_subcommands_mut() {
            sub.clone().debug_assert();
        }
    }

    #[test]
    fn pack_takes_version_as_a_release_version() {
        use clap::Parser;
        let cli =
            Cli::try_parse_from(["convoy", "pack", "dir", "--app", "web", "--version", "1.0"])
                .unwrap();
        assert!(
            matches!(cli.command, super::Command::Pack { release_version, .. } if release_version == "1.0")
        );
    }
}
