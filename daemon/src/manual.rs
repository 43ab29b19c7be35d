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

/// Writes a man page for `cmd` and one for each of its visible
/// subcommands (`convoy.1`, `convoy-pack.1`, ...) into `dir`, which must
/// exist; returns their paths, `cmd`'s first.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    // As clap_mangen::generate_to does, keeping each page's path.
    fn write(cmd: clap::Command, dir: &Path, made: &mut Vec<PathBuf>) -> io::Result<()> {
        made.push(clap_mangen::Man::new(cmd.clone()).generate_to(dir)?);
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), dir, made)?;
        }
        Ok(())
    }
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut made = Vec::new();
    write(cmd, dir, &mut made)?;
    Ok(made)
}
