//! Shell completions and man pages of a command line: what `convoy` and
//! `convoyd` write for packagers (`completions SHELL`, `man DIR`).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// Writes `shell`'s completion script for `cmd` to `out`; a reader that
/// went away (`| head`) is not an error.
pub fn completions(mut cmd: clap::Command, shell: Shell, out: &mut dyn Write) -> io::Result<()> {
    let name = cmd.get_name().to_string();
    // Made whole first: clap_complete panics on a failed write.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    match out.write_all(&script).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Writes a man page for `cmd` and one for each of its subcommands
/// (`convoy.1`, `convoy-pack.1`, ...) into `dir`, which must exist;
/// returns their paths.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let before: Vec<PathBuf> = pages_in(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    let mut made: Vec<PathBuf> = pages_in(dir)?
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    made.sort();
    Ok(made)
}

fn pages_in(dir: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect())
}
