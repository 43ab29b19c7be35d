//! `convoy-demo-web`: the web app `convoy demo --lb` ships in its
//! releases, so that a load balancer has something real to send requests
//! to while the fleet rolls out.
//!
//! `convoy-demo-web serve --port P --version V --pidfile F` answers every
//! request with `web V` (HTTP/1.1, keep-alive) and writes its pid to `F`
//! once it listens, so the hook that started it knows when it is up.
//! `convoy-demo-web check --port P --version V` is a release's `validate`
//! hook: it asks the app on `P` and fails unless it answers `web V`.
//!
//! Deliberately small: the standard library only, a thread per connection.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: convoy-demo-web serve --port PORT --version VERSION [--pidfile FILE]
       convoy-demo-web check --port PORT --version VERSION";

/// The largest request head read; a longer one closes the connection.
const MAX_HEAD: usize = 16 * 1024;

struct Args {
    port: u16,
    version: String,
    pidfile: Option<PathBuf>,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut port, mut version, mut pidfile) = (None, None, None);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--port" => {
                let v = value()?;
                port = Some(v.parse().map_err(|_| format!("--port {v:?}: not a port"))?);
            }
            "--version" => version = Some(value()?),
            "--pidfile" => pidfile = Some(PathBuf::from(value()?)),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Args {
        port: port.ok_or("--port is required")?,
        version: version.ok_or("--version is required")?,
        pidfile,
    })
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let command = argv.next().unwrap_or_default();
    let result = parse(argv).and_then(|args| match command.as_str() {
        "serve" => serve(&args),
        "check" => check(&args),
        _ => Err(format!("unknown command {command:?}")),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("convoy-demo-web: {e}\n{USAGE}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &Args) -> Result<(), String> {
    // The release before may still be exiting (its hook was told to stop
    // it): its port frees within moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match TcpListener::bind((Ipv4Addr::LOCALHOST, args.port)) {
            Ok(l) => break l,
            Err(e) if e.kind() == ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("listening on port {}: {e}", args.port)),
        }
    };
    if let Some(pidfile) = &args.pidfile {
        // Written whole, then renamed: a reader never sees half a pid.
        let tmp = pidfile.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&tmp, pidfile))
            .map_err(|e| format!("writing {}: {e}", pidfile.display()))?;
    }
    let body: &'static str = Box::leak(format!("web {}\n", args.version).into_boxed_str());
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            let _ = answer(stream, body);
        });
    }
    Ok(())
}

/// Answers the requests of one connection until the client closes it.
fn answer(stream: TcpStream, body: &str) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    loop {
        // The request line, then headers up to the blank line.
        let (mut head, mut close, mut length) = (0usize, false, 0u64);
        let mut first = true;
        loop {
            line.clear();
            let n = reader.by_ref().take(MAX_HEAD as u64).read_line(&mut line)?;
            if n == 0 {
                return Ok(());
            }
            head += n;
            if head > MAX_HEAD {
                return Ok(());
            }
            let l = line.trim_end();
            if l.is_empty() {
                if first {
                    continue;
                }
                break;
            }
            if first {
                close = l.ends_with("HTTP/1.0");
                first = false;
            } else if let Some((name, value)) = l.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("connection") {
                    close = value.eq_ignore_ascii_case("close");
                } else if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().unwrap_or(0);
                }
            }
        }
        std::io::copy(&mut reader.by_ref().take(length), &mut std::io::sink())?;
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" },
        )?;
        if close {
            return Ok(());
        }
    }
}

fn check(args: &Args) -> Result<(), String> {
    let want = format!("web {}", args.version);
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, args.port))
        .map_err(|e| format!("connecting to port {}: {e}", args.port))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .map_err(|e| format!("asking port {}: {e}", args.port))?;
    let mut answer = String::new();
    stream
        .take(64 * 1024)
        .read_to_string(&mut answer)
        .map_err(|e| format!("reading port {}'s answer: {e}", args.port))?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b.trim());
    if answer.starts_with("HTTP/1.1 200") && body == want {
        Ok(())
    } else {
        Err(format!(
            "port {} answered {:?} with {body:?}, not {want:?}",
            args.port,
            answer.lines().next().unwrap_or("nothing")
        ))
    }
}
